"""CPU tests of the benchmarks' shared timing (experiments/benchmarks/rules.py's `time_calls`) and of the rules
benchmark's --burst."""

import json

import pytest

from experiments.benchmarks import rules as rb


class FakeClock:
    """time.perf_counter stand-in that only calls advance: each call takes `per_call` seconds."""

    def __init__(self, per_call):
        self.now, self.per_call = 0.0, per_call

    def __call__(self):
        return self.now

    def tick(self, result):
        self.now += self.per_call
        return result


def test_time_calls_times_bursts_synchronised_once_and_divides_by_the_burst(monkeypatch):
    """warmup calls each synchronised, then `repeats` bursts of `burst` calls cycling through the input sets in
    order, synchronised once after each burst's last call; the times are per call and include the wait for the
    device (here each call takes 0.25 s to launch and each synchronisation 1 s)."""
    clock = FakeClock(per_call=0.25)
    monkeypatch.setattr(rb.time, "perf_counter", clock)
    calls, synced = [], []

    def synchronize(result):
        synced.append(result)
        clock.now += 1.0

    record = rb.time_calls(
        lambda x: clock.tick(calls.append(x) or x), [(0,), (1,), (2,)], synchronize, warmup=2, repeats=3, burst=4
    )
    assert calls == [i % 3 for i in range(2 + 3 * 4)]
    assert synced == [0, 1, 5 % 3, 9 % 3, 13 % 3]
    assert record == {"median_ms": 500.0, "min_ms": 500.0, "repeats": 3, "burst": 4}  # (4 x 0.25 + 1) / 4 s


def test_time_calls_stops_once_the_budget_is_spent_by_whole_bursts(monkeypatch):
    """The budget counts every call of the bursts (2 s a burst here): 7 s allow 4 bursts; at least 3 always."""
    clock = FakeClock(per_call=1.0)
    monkeypatch.setattr(rb.time, "perf_counter", clock)
    sync = lambda _: None  # noqa: E731
    record = rb.time_calls(clock.tick, [(0,)], sync, warmup=0, repeats=50, burst=2, budget=7.0)
    assert record["repeats"] == 4
    assert rb.time_calls(clock.tick, [(0,)], sync, warmup=0, repeats=50, burst=2, budget=0.0)["repeats"] == 3


def test_rules_benchmark_records_its_burst(tmp_path):
    """A CPU run of the rules benchmark with --burst 3: every timed phase records it."""
    out = tmp_path / "r.json"
    argv = ["--batch", "1", "--seq", "16", "--heads", "1", "--key", "8", "--value", "8", "--rules", "delta_rule"]
    rb.main([*argv, "--impls", "chunk", "--repeats", "2", "--warmup", "1", "--burst", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    phases = [p for case in report["cases"] for p in case.values() if isinstance(p, dict) and "median_ms" in p]
    assert phases and all(p["burst"] == 3 and p["repeats"] == 2 for p in phases)


@pytest.mark.parametrize("burst", [0, -1])
def test_a_burst_below_one_is_refused(burst):
    with pytest.raises(SystemExit):
        rb.parse_args(["--burst", str(burst)])


def test_fwd_bwd_returns_the_output_with_the_gradients():
    """fwd+bwd returns o as well as the gradients of sum(o * do), so that its timing includes the whole forward, as
    in training (the gradients alone let XLA drop the forward's output)."""
    import jax
    import jax.numpy as jnp

    inputs, do = rb.make_inputs("gated_delta_rule", 0, (1, 9, 2, 4, 4), jnp.float32)
    forward = lambda *xs: rb.rules.gated_delta_rule(*xs, impl="recurrent")  # noqa: E731
    o, grads = jax.jit(rb.phases(forward)["fwd_bwd"])(inputs, do)
    assert jnp.allclose(o, forward(*inputs)[0])
    expected = jax.grad(lambda xs: jnp.sum(forward(*xs)[0] * do))(inputs)
    assert all(jnp.allclose(a, b) for a, b in zip(grads, expected, strict=True))
