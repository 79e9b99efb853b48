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


def test_decode_rows_equal_the_step_function(tmp_path):
    """The decode rows time the rule at T = 1 with a donated state; a kda step taken by that function equals
    rules.kda_step on the same token and state."""
    out = tmp_path / "k.json"
    argv = ["--seq-lens", "16", "--tokens-per-batch", "16", "--heads", "2", "--key", "16", "--value", "16"]
    argv += ["--dtype", "float32", "--rules", "kda", "--impls", "recurrent", "--decode-batch", "2"]
    kernels.main([*argv, "--decode-steps", "3", "--repeats", "2", "--warmup", "1", "--out", str(out)])
    (decode,) = [c for c in json.loads(out.read_text())["cases"] if c["T"] == 1]
    assert decode["fwd"]["steps_per_sync"] == 3 and decode["fwd"]["state_tb_per_s"] > 0

    fn = kernels.edarnn_fn("kda", "recurrent", None, True)
    q, k, v, g, beta = (jnp.full((2, 1, 2, 16), 0.1),) * 3 + (jnp.full((2, 1, 2, 16), -0.5), jnp.full((2, 1, 2), 0.5))
    state = jnp.ones((2, 2, 16, 16))
    o, new_state = fn(q, k, v, g, beta, state)
    expected_o, expected_state = rules.kda_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
    assert jnp.allclose(o[:, 0], expected_o, atol=1e-6) and jnp.allclose(new_state, expected_state, atol=1e-6)
