"""CPU smoke tests of the kernel benchmark (experiments/benchmarks/kernels.py): its decode rows."""

import json
import types

import jax
import jax.numpy as jnp
import pytest

from edarnn import rules
from experiments.benchmarks import kernels


def test_time_bursts_times_whole_bursts_and_feeds_the_state_forward():
    """--warmup bursts, then up to --repeats bursts, one synchronisation after each; each burst gets the state the
    one before returned; times and state traffic per step (a burst is --decode-steps steps)."""
    args = types.SimpleNamespace(warmup=2, repeats=3, decode_steps=5, case_budget=1e9)
    seen, synced = [], []

    def burst(state):
        seen.append(state)
        return state + 1

    record = kernels.time_bursts(burst, 0, synced.append, state_bytes=10, args=args)
    assert seen == list(range(2 + 3))
    assert synced == [2, 3, 4, 5]
    assert record["repeats"] == 3 and record["steps_per_burst"] == 5
    assert record["state_tb_per_s"] == pytest.approx(20 / (record["median_ms"] / 1e3) / 1e12)


@pytest.mark.parametrize("unroll", [0, 1, 2])
def test_measure_decode_bursts_are_steps_of_the_rule(monkeypatch, unroll):
    """The jitted burst of measure_decode runs --decode-steps steps, each on the state the one before returned and
    on its own token (the batch rolled by the step's index), whatever the loop's unroll (0: all steps)."""
    args = types.SimpleNamespace(warmup=0, repeats=1, decode_steps=3, decode_unroll=unroll, case_budget=1e9)
    fn = kernels.edarnn_fn("kda", "recurrent", None, True)
    keys = iter(jax.random.split(jax.random.key(0), 5))
    normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    token = (normal(2, 1, 2, 16), normal(2, 1, 2, 16), normal(2, 1, 2, 16), -jnp.abs(normal(2, 1, 2, 16)))
    token += (jax.nn.sigmoid(normal(2, 1, 2)),)
    state = jnp.ones((2, 2, 16, 16), jnp.float32)
    final = []
    monkeypatch.setattr(kernels, "time_bursts", lambda burst, s, *_: final.append(burst(s)) or {})
    assert kernels.measure_decode(fn, [((*token, state), None)], args) == {"loop": f"jit scan, unroll {unroll or 3}"}
    expected = state
    for i in range(3):
        expected = rules.kda_step(expected, *(jnp.roll(x, i, axis=0)[:, 0] for x in token))[1]
    assert jnp.allclose(final[0], expected, atol=1e-5)


def test_decode_rows_alone_time_one_token_steps_of_the_rule(tmp_path):
    """--seq-lens with no value: the decode rows only, each with its burst length and state traffic; the function
    they time is one decoding step of the rule (equal to rules.kda_step on the same token and state)."""
    out = tmp_path / "k.json"
    argv = ["--seq-lens", "--heads", "2", "--key", "16", "--value", "16", "--dtype", "float32", "--rules", "kda"]
    argv += ["--impls", "recurrent", "--decode-batch", "2", "--decode-steps", "3", "--repeats", "2", "--warmup", "1"]
    kernels.main([*argv, "--out", str(out)])
    (decode,) = json.loads(out.read_text())["cases"]
    assert decode["T"] == 1 and decode["B"] == 2
    assert decode["fwd"]["steps_per_burst"] == 3 and decode["fwd"]["state_tb_per_s"] > 0

    fn = kernels.edarnn_fn("kda", "recurrent", None, True)
    q, k, v, g, beta = (jnp.full((2, 1, 2, 16), 0.1),) * 3 + (jnp.full((2, 1, 2, 16), -0.5), jnp.full((2, 1, 2), 0.5))
    state = jnp.ones((2, 2, 16, 16))
    o, new_state = fn(q, k, v, g, beta, state)
    expected_o, expected_state = rules.kda_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
    assert jnp.allclose(o[:, 0], expected_o, atol=1e-6) and jnp.allclose(new_state, expected_state, atol=1e-6)


def test_a_negative_decode_unroll_is_refused():
    with pytest.raises(SystemExit):
        kernels.parse_args(["--decode-unroll", "-1"])


def test_decode_steps_below_one_is_refused():
    with pytest.raises(SystemExit):
        kernels.parse_args(["--decode-steps", "0"])


def test_sequence_rows_check_time_and_plot(tmp_path):
    """The sweep's rows (here T = 64 at 64 tokens per batch; Pallas in interpret mode and XLA softmax attention):
    each checked against impl='recurrent' (the Pallas chunk kernels at --check-seq 80, two chunks), timed forward
    and forward+backward with its compiled memory, written as JSON and plotted."""
    out = tmp_path / "k.json"
    argv = ["--seq-lens", "64", "--tokens-per-batch", "64", "--heads", "2", "--key", "16", "--value", "16"]
    argv += ["--dtype", "float32", "--rules", "kda", "softmax_attention", "--impls", "pallas", "softmax"]
    argv += ["--decode-batch", "0", "--repeats", "1", "--warmup", "1", "--input-sets", "1", "--case-budget", "1"]
    kernels.main([*argv, "--check", "--check-seq", "80", "--out", str(out)])
    cases = {(case["rule"], case["impl"]): case for case in json.loads(out.read_text())["cases"]}
    assert set(cases) == {("kda", "pallas"), ("softmax_attention", "xla")}
    for case in cases.values():
        assert (case["T"], case["B"], case["check_status"]) == (64, 1, "ok") and case["check_error"] < 1e-5
        for phase in ("fwd", "fwd_bwd"):
            assert case[phase]["median_ms"] > 0 and case[phase]["memory_bytes"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
