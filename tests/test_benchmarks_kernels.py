"""CPU smoke tests of the kernel benchmark (experiments/benchmarks/kernels.py): its decode rows."""

import json
import types

import jax.numpy as jnp
import pytest

from edarnn import rules
from experiments.benchmarks import kernels


def test_time_bursts_runs_each_burst_back_to_back_and_feeds_the_state_forward():
    """--warmup steps, then bursts of --decode-steps steps, one synchronisation per burst; each step gets the
    state the one before returned; state traffic 2 state bytes per step."""
    args = types.SimpleNamespace(warmup=2, repeats=3, decode_steps=5, case_budget=1e9)
    seen, synced = [], []

    def step(state):
        seen.append(state)
        return state + 1

    record = kernels.time_bursts(step, 0, synced.append, state_bytes=10, args=args)
    assert seen == list(range(2 + 3 * 5))
    assert synced == [2, 7, 12, 17]
    assert record["repeats"] == 3 and record["steps_per_sync"] == 5
    assert record["state_tb_per_s"] == pytest.approx(20 / (record["median_ms"] / 1e3) / 1e12)


def test_decode_rows_alone_time_one_token_steps_of_the_rule(tmp_path):
    """--seq-lens with no value: the decode rows only, each with its burst length and state traffic; the function
    they time is one decoding step of the rule (equal to rules.kda_step on the same token and state)."""
    out = tmp_path / "k.json"
    argv = ["--seq-lens", "--heads", "2", "--key", "16", "--value", "16", "--dtype", "float32", "--rules", "kda"]
    argv += ["--impls", "recurrent", "--decode-batch", "2", "--decode-steps", "3", "--repeats", "2", "--warmup", "1"]
    kernels.main([*argv, "--out", str(out)])
    (decode,) = json.loads(out.read_text())["cases"]
    assert decode["T"] == 1 and decode["B"] == 2
    assert decode["fwd"]["steps_per_sync"] == 3 and decode["fwd"]["state_tb_per_s"] > 0

    fn = kernels.edarnn_fn("kda", "recurrent", None, True)
    q, k, v, g, beta = (jnp.full((2, 1, 2, 16), 0.1),) * 3 + (jnp.full((2, 1, 2, 16), -0.5), jnp.full((2, 1, 2), 0.5))
    state = jnp.ones((2, 2, 16, 16))
    o, new_state = fn(q, k, v, g, beta, state)
    expected_o, expected_state = rules.kda_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
    assert jnp.allclose(o[:, 0], expected_o, atol=1e-6) and jnp.allclose(new_state, expected_state, atol=1e-6)


def test_decode_steps_below_one_is_refused():
    with pytest.raises(SystemExit):
        kernels.parse_args(["--decode-steps", "0"])
