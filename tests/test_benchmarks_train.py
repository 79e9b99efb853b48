"""CPU smoke tests of the training benchmark (experiments/benchmarks/train.py) and the data x fsdp check
(experiments/multi_device_check.py), at tiny sizes."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import fast_compile_environment
from test_configs import CONFIGS

from experiments import multi_device_check
from experiments.benchmarks import train as train_benchmark

ROOT = CONFIGS.parent


def test_train_benchmark_writes_a_row_per_case_and_an_error_row(tmp_path, monkeypatch, capsys):
    """Every (T, arch) case gets a row, attention first; a failing case becomes an error row and the sweep goes
    on; measured rows carry step time, tokens/s = B T / step time, memory and the ratio to attention."""
    measure = train_benchmark.run_case

    def run_case(config, args, trace_path):
        if config.model.layers == ("gdn2",):
            raise MemoryError("RESOURCE_EXHAUSTED: pretend")
        return measure(config, args, trace_path)

    monkeypatch.setattr(train_benchmark, "run_case", run_case)
    out = tmp_path / "train.json"
    argv = ["--tiny", "--archs", "hybrid", "gdn2", "attention", "--seq-lens", "64", "--steps", "2", "--warmup", "1"]
    train_benchmark.main([*argv, "--out", str(out)])

    report = json.loads(out.read_text())
    assert report["config"]["tiny"] and report["config"]["tokens_per_batch"] == 256
    assert report["config"]["without_rule"] is False
    assert {"backend", "device_kind", "jax", "flax"} <= set(report["machine"])
    cases = report["cases"]
    assert [(c["arch"], c["seq_len"]) for c in cases] == [("attention", 64), ("hybrid", 64), ("gdn2", 64)]
    attention, hybrid, gdn2 = cases
    assert gdn2["error"] == "MemoryError: RESOURCE_EXHAUSTED: pretend" and "median_ms" not in gdn2
    for case in (attention, hybrid):
        assert case["batch_size"] == 4 and case["steps_timed"] == 2 and case["params"] > 0
        assert 0 < case["min_ms"] <= case["median_ms"]
        assert math.isclose(case["tokens_per_s"], 4 * 64 / (case["median_ms"] / 1e3))
        assert case["flops_per_token"] > 0 and case["mfu"] is None  # no peak FLOP/s for the CPU
        assert case["step_bytes"] > 0 and math.isfinite(case["last_loss"])
    assert math.isclose(hybrid["vs_attention"], hybrid["tokens_per_s"] / attention["tokens_per_s"])
    table = capsys.readouterr().out
    assert "RESOURCE_EXHAUSTED" in table and "x attn" in table


def test_train_benchmark_without_rule_traces_a_step_and_restores_the_rules(tmp_path, monkeypatch):
    """--without-rule (the ablation) runs the model with rule_stand_in in place of its rule, recorded in the
    report, no MFU, and leaves edarnn.rules.RULES as it was; --profile writes one trace per case."""
    rules_before = dict(train_benchmark.rules.RULES)
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("impl"))
        return stand_in(*args, **kwargs)

    stand_in = train_benchmark.rule_stand_in
    monkeypatch.setattr(train_benchmark, "rule_stand_in", counted)
    out, traces = tmp_path / "train.json", tmp_path / "traces"
    argv = ["--tiny", "--archs", "gdn2", "--seq-lens", "64", "--steps", "1", "--warmup", "0", "--without-rule"]
    train_benchmark.main([*argv, "--profile", str(traces), "--out", str(out)])
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert report["config"]["without_rule"] is True and "error" not in case and case["mfu"] is None
    assert calls  # traced into the step (once per distinct layer trace, not per step)
    assert case["trace"] == str(traces / "gdn2-64.xplane.pb") and (traces / "gdn2-64.xplane.pb").stat().st_size > 0
    assert train_benchmark.rules.RULES == rules_before


def test_no_remat_turns_remat_off_and_keeps_the_rest_of_the_config():
    args = train_benchmark.parse_args(["--tiny", "--archs", "gdn2", "--seq-lens", "64"])
    with_remat = train_benchmark.case_config("gdn2", 64, args)
    args = train_benchmark.parse_args(["--tiny", "--archs", "gdn2", "--seq-lens", "64", "--no-remat"])
    without = train_benchmark.case_config("gdn2", 64, args)
    assert with_remat.model.remat and not without.model.remat
    assert {**without.model.to_dict(), "remat": True} == with_remat.model.to_dict()


def test_rule_stand_in_reads_every_input():
    """rule_stand_in, called as the model calls a rule (everything by keyword, eda's beta None, segment ids): its
    output depends on q, k, v, e and every gate (so that no projection is dead code in the ablation), in q's
    dtype, with a zero state of the rule's shape [B, H, K, V]."""
    shapes = {"q": (2, 5, 3, 4), "k": (2, 5, 3, 4), "v": (2, 5, 3, 6), "e": (2, 5, 3, 4), "g": (2, 5, 3),
              "b": (2, 5, 3, 4), "w": (2, 5, 3, 6), "gamma": (2, 5, 3)}  # fmt: skip
    inputs = {name: jnp.ones(shape, jnp.bfloat16 if name in "qkve" else jnp.float32) for name, shape in shapes.items()}
    options = dict(beta=None, initial_state=None, segment_ids=jnp.zeros((2, 5), jnp.int32), impl="chunk",
                   chunk_size=16, normalize_qk=True)  # fmt: skip

    def total(inputs):
        o, _ = train_benchmark.rule_stand_in(**inputs, **options)
        return jnp.sum(o.astype(jnp.float32))

    o, state = train_benchmark.rule_stand_in(**inputs, **options)
    assert o.dtype == jnp.bfloat16 and o.shape == (2, 5, 3, 6)
    assert state.shape == (2, 3, 4, 6) and state.dtype == jnp.float32 and not state.any()
    grads = jax.grad(total)(inputs)
    assert all(jnp.abs(grads[name].astype(jnp.float32)).min() > 0 for name in shapes)


@pytest.mark.slow  # about a minute (three training runs); test_train's sharded run covers the sharding itself
def test_multi_device_check_agrees_on_two_simulated_devices(tmp_path):
    """1 device, data=1 x fsdp=2 and data=2 on two simulated CPU devices: the same losses (float32) to 1e-5,
    exit status 0, and a JSON of the curves."""
    env = fast_compile_environment(devices=2)  # compile time dominates; the check compares results
    tiny = {"model.d_model": 16, "model.n_layers": 1, "model.layers": "('gdn2',)", "model.n_heads": 1,
            "model.head_dim_k": 8, "model.head_dim_v": 8, "model.d_ff": 32, "model.chunk_size": 8,
            "data.seq_len": 32, "data.batch_size": 4}  # fmt: skip
    out = tmp_path / "check.json"
    command = [sys.executable, "-m", "experiments.multi_device_check", "--steps", "6", "--tolerance", "1e-5",
               "--out", str(out), "--", f"--config={CONFIGS / 'default.py'}",
               *(f"--config.{path}={value}" for path, value in tiny.items())]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and set(report["losses"]) == set(multi_device_check.MESHES)
    reference = report["losses"]["1 device"]
    assert len(reference) == 6 and reference[-1] < reference[0]  # it trained
    assert set(report["max_relative_difference"]) == {"fsdp=2", "data=2"}
    assert all(0 <= d <= 1e-5 for d in report["max_relative_difference"].values())


def test_multi_device_check_fails_beyond_the_tolerance(tmp_path, monkeypatch):
    """Curves that differ by more than --tolerance (relative, per step) give exit status 1; within it, 0."""
    curves = {"1 device": [2.0, 1.0], "fsdp=2": [2.0, 1.0], "data=2": [2.0, 1.01]}
    monkeypatch.setattr(multi_device_check, "run", lambda name, workdir, steps, train_args: curves[name])
    argv = ["--steps", "2", "--out", str(tmp_path / "check.json")]
    assert multi_device_check.main([*argv, "--tolerance", "5e-3"]) == 1
    report = json.loads((tmp_path / "check.json").read_text())
    assert not report["passed"] and math.isclose(report["max_relative_difference"]["data=2"], 0.01)
    assert report["max_relative_difference"]["fsdp=2"] == 0.0
    assert multi_device_check.main([*argv, "--tolerance", "2e-2"]) == 0
