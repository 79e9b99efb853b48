"""edarnn.train: the schedule, the train step (gradient accumulation, loss going down), the default job end to
end, and a run stopped (SIGTERM), killed (SIGKILL) and resumed past a corrupted checkpoint that follows the
loss curve of an uninterrupted run exactly."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, fast_compile_environment
from flax import nnx
from test_configs import CONFIGS, load

from edarnn import config as config_lib
from edarnn import data, metrics, model, train

ROOT = CONFIGS.parent

TINY = {  # a model and task small enough to compile and run in seconds; these tests are of the training machinery,
    # and linear attention's step compiles in half eda's time (6 against 12 s); configs/default.py's eda runs below
    "model.layers": ("linear_attention",),
    "model.d_model": 16,
    "model.n_layers": 1,
    "model.n_heads": 1,
    "model.head_dim_k": 8,
    "model.head_dim_v": 8,
    "model.d_ff": 32,
    "model.chunk_size": 8,
    "data.seq_len": 16,
    "data.batch_size": 4,
    "data.mqar.num_pairs": 2,
    "data.mqar.key_vocab_size": 8,
    "data.mqar.value_vocab_size": 8,
    "data.mqar.noise_vocab_size": 4,
}


def tiny_config(**overrides):
    """configs/default.py with the TINY model and task, and `overrides` ({"train.steps": 5, ...})."""
    config = load("default")
    for path, value in {**TINY, **overrides}.items():
        section, name = path.rsplit(".", 1)
        node = config
        for part in section.split("."):
            node = node[part]
        node[name] = value
    return config


def test_schedule():
    """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    train_config = load("default").train
    train_config.update(steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    _, schedule = train.make_optimizer(train_config)
    lrs = np.array([schedule(i) for i in range(101)])
    np.testing.assert_allclose(lrs[[0, 5, 10, 55, 100]], [0.0, 5e-3, 1e-2, 1e-3 + 9e-3 * 0.5, 1e-3], rtol=1e-5)
    assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) < 0)


def _model_and_batch(seed: int = 0):
    config = config_lib.resolve(tiny_config(**{"data.batch_size": 8}))
    graphdef, params = nnx.split(model.LM(config.model, rngs=nnx.Rngs(seed)), nnx.Param)
    loader = data.make_loader(config.data, split="train", seed=seed, batch_size=8, seq_len=config.data.seq_len)
    batch = {name: jnp.asarray(x) for name, x in next(iter(loader)).items()}
    return graphdef, params, batch


def test_gradient_accumulation_equals_the_whole_batch():
    """One SGD step from the mean loss over the scored positions is the same whether the batch is taken whole or
    in 4 micro-batches (rows j, j + 4, ... per micro-batch); so are the logged loss and accuracy."""
    graphdef, params, batch = _model_and_batch()
    sgd = optax.sgd(1.0)
    whole, micro = (
        jax.jit(train.make_train_step(graphdef, sgd, accum))(params, sgd.init(params), batch) for accum in (1, 4)
    )
    new_params, _, step_metrics = whole
    assert_close(micro[0], new_params, 1e-5, "params after 4 micro-batches")
    assert_close(micro[2], step_metrics, 1e-5, "metrics of 4 micro-batches")
    changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_params, params)
    assert max(jax.tree.leaves(changed)) > 0


def test_train_steps_decrease_the_loss():
    graphdef, params, batch = _model_and_batch()
    optimizer, _ = train.make_optimizer(tiny_config(**{"train.lr": 1e-2, "train.warmup_steps": 0}).train)
    step = jax.jit(train.make_train_step(graphdef, optimizer, 1))
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(5):
        params, opt_state, step_metrics = step(params, opt_state, batch)
        losses.append(float(step_metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_bad_data_field_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match=r"data\.mqar\.num_pairs"):
        train.train(tiny_config(**{"data.mqar.num_pairs": 0}), str(tmp_path))


def test_default_job_end_to_end(tmp_path):
    """configs/default.py, shortened: metrics, evaluations, checkpoints, config.json and TensorBoard files."""
    config = load("default")
    config.train.update(steps=20, warmup_steps=2, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=10)
    last_eval = train.train(config, str(tmp_path))

    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    logged = [r for r in records if "loss" in r]
    evaluated = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert [r["step"] for r in evaluated] == [10, 20]
    assert set(logged[0]) == {"step", "loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "mfu"}
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and r["tokens_per_s"] > 0 for r in logged)
    assert last_eval == {k: v for k, v in evaluated[-1].items() if k != "step"}
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [10, 20]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 32 + 32 + 16 and saved["train"]["steps"] == 20
    assert any((tmp_path / "tensorboard").iterdir())


# ----------------------------------------------------------------------------------------------------------
# stop, kill, corrupt, resume: the same losses as an uninterrupted run
# ----------------------------------------------------------------------------------------------------------

STEPS = 40


def _overrides(**extra) -> dict:
    """The config overrides of the runs below: TINY, logging every step, async checkpoints every 5 steps."""
    return {
        **TINY,
        "train.steps": STEPS,
        "train.warmup_steps": 5,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.checkpoint_every": 5,
        "train.keep_last": 3,
        "train.async_checkpoints": True,
        **extra,
    }


def _command(workdir, **extra) -> list[str]:
    """The command line of a run in `workdir` with _overrides(**extra)."""
    return [
        sys.executable,
        "-m",
        "edarnn.train",
        f"--config={CONFIGS / 'default.py'}",
        f"--workdir={workdir}",
        *(f"--config.{path}={value}" for path, value in _overrides(**extra).items()),
    ]


def _environment(cache, devices=None) -> dict:
    """The CPU (`devices` simulated devices, else one) with the suite's fast compiles (compile time dominates these
    runs; they compare results), and a compilation cache shared by the runs (the same program, compiled once)."""
    env = fast_compile_environment(devices)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _logged_steps(workdir) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().split("\n")[:-1] if line]  # complete lines only
    return max((json.loads(line)["step"] for line in lines), default=0)


def _run_until(workdir, env, stop_at: int, sig: int) -> int:
    """Starts a run, sends it `sig` once it has logged step `stop_at`; returns its exit code."""
    log_path = workdir.parent / f"{workdir.name}.log"
    with open(log_path, "a") as log:
        process = subprocess.Popen(_command(workdir), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while _logged_steps(workdir) < stop_at:
            assert process.poll() is None, f"the run ended before step {stop_at}: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach the step in time"
            time.sleep(0.01)
        process.send_signal(sig)
        return process.wait(timeout=120)


def _losses(workdir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


def test_stopped_killed_and_resumed_run_follows_the_same_losses(tmp_path):
    """A run stopped by SIGTERM saves its step and exits cleanly; resumed, then killed by SIGKILL (possibly in the
    middle of an async save), its newest checkpoint then garbled, and resumed again, it logs at every step exactly
    the loss of an uninterrupted run (same program, same data; the resumed runs re-log the steps after the
    checkpoint they resumed from)."""
    env = _environment(tmp_path / "cache")
    reference = tmp_path / "reference"
    subprocess.run(_command(reference), cwd=ROOT, env=env, check=True, capture_output=True)
    expected = dict(_losses(reference))
    assert sorted(expected) == list(range(1, STEPS + 1))

    run = tmp_path / "run"
    assert _run_until(run, env, 12, signal.SIGTERM) == 0
    stopped_at = _logged_steps(run)
    checkpoints = run / "checkpoints"
    assert stopped_at in {int(p.name) for p in checkpoints.iterdir()}, "no checkpoint at the step SIGTERM stopped"

    assert _run_until(run, env, stopped_at + 12, signal.SIGKILL) == -signal.SIGKILL
    complete = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    newest = checkpoints / str(complete[-1])
    for path in (p for p in newest.rglob("*") if p.is_file()):
        path.write_bytes(b"garbage")

    result = subprocess.run(_command(run), cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/{complete[-2]}" in result.stdout, result.stdout
    assert [p.name.split("-")[0] for p in (run / "corrupt_checkpoints").iterdir()] == [str(complete[-1])]

    logged = _losses(run)
    assert {step for step, _ in logged} == set(expected)
    for step, loss in logged:
        assert loss == expected[step], f"step {step}: {loss} != {expected[step]} uninterrupted"


def test_sharded_run_matches_one_device(tmp_path):
    """8 simulated CPU devices as data x fsdp x tensor = 2 x 2 x 2, with 2 micro-batches per step: the losses of
    one device, to float32 rounding (both runs in subprocesses, at once, so that both have jax's defaults)."""
    sharded = {"train.steps": 6, "train.grad_accum": 2, "data.batch_size": 8, "train.checkpoint_every": 0}
    runs = {1: {}, 8: {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}}
    processes = {}
    for devices, mesh in runs.items():
        env = _environment(tmp_path / f"cache{devices}", devices)
        command = _command(tmp_path / f"devices{devices}", **sharded, **mesh)
        processes[devices] = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for devices, process in processes.items():
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-3000:]
        assert f"over {devices} cpu device(s)" in output
    losses = {devices: _losses(tmp_path / f"devices{devices}") for devices in runs}
    assert [step for step, _ in losses[8]] == list(range(1, 7))
    np.testing.assert_allclose([loss for _, loss in losses[8]], [loss for _, loss in losses[1]], rtol=1e-5)
