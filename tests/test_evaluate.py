"""edarnn.evaluate: a checkpoint evaluated from its work dir gives the numbers the training loop logged at its
step; per-query accuracy counts runs of scored positions; bad work dirs fail clearly."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_train import tiny_config

from edarnn import evaluate, metrics, train


def test_query_sums_group_consecutive_scored_positions():
    """Queries are the runs of scored positions in a row; one wrong position fails its whole query, and runs do not
    continue into the next row."""
    scored = np.array([[0, 1, 1, 0, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 1, 1]], bool)
    right = np.array([[1, 1, 0, 1, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0, 1, 1, 0]], bool)
    queries, correct = train.query_sums(jnp.asarray(scored), jnp.asarray(right))
    assert (float(queries), float(correct)) == (5.0, 3.0)  # row 0: [wrong, right, right]; row 1: [right, wrong]
    queries, correct = train.query_sums(jnp.asarray(scored), jnp.ones_like(jnp.asarray(right)))
    assert (float(queries), float(correct)) == (5.0, 5.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny MQAR run of 6 steps, evaluated and checkpointed at steps 3 and 6, ranked by eval_accuracy. Two pairs
    per row with two-token answers would need another task: the tiny MQAR has one scored position per query."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(
        **{
            "train.steps": 6,
            "train.warmup_steps": 1,
            "train.log_every": 3,
            "train.eval_every": 3,
            "train.checkpoint_every": 3,
            "train.eval_batches": 2,
            "train.keep_last": 2,
            "train.keep_best": "eval_accuracy",
            "train.async_checkpoints": False,
        }
    )
    train.train(config, str(workdir))
    return workdir


def _logged(workdir, step):
    return next(r for r in metrics.read_jsonl(str(workdir / "metrics.jsonl")) if r["step"] == step and "eval_loss" in r)


def test_evaluation_equals_the_logged_one(run_dir):
    record = evaluate.evaluate_run(str(run_dir))
    logged = _logged(run_dir, 6)
    assert record["step"] == 6 and record["batches"] == 2 and record["seq_len"] == 16
    for name in ("loss", "accuracy", "query_accuracy"):
        assert record["metrics"][name] == pytest.approx(logged[f"eval_{name}"], rel=1e-6, abs=1e-9), name
    written = json.loads((run_dir / "eval_eval_step6_len16.json").read_text())
    assert written == record
    # one scored position per MQAR query: both accuracies are the same count
    assert record["metrics"]["query_accuracy"] == pytest.approx(record["metrics"]["accuracy"])


def test_best_checkpoint_is_the_logged_best(run_dir):
    logged = {step: _logged(run_dir, step) for step in (3, 6)}
    best = max((3, 6), key=lambda step: logged[step]["eval_accuracy"])
    record = evaluate.evaluate_run(str(run_dir), which="best")
    assert record["step"] == best
    assert record["metrics"]["loss"] == pytest.approx(logged[best]["eval_loss"], rel=1e-6)


def test_other_split_and_length(run_dir):
    """Another split, batch count and row length evaluate other batches: finite numbers, another file."""
    record = evaluate.evaluate_run(str(run_dir), split="train", batches=1, seq_len=24)
    assert record["seq_len"] == 24 and record["split"] == "train"
    assert all(np.isfinite(v) for v in record["metrics"].values())
    assert (run_dir / "eval_train_step6_len24.json").exists()
    assert "accuracy" in evaluate.format_table(record)


def test_bad_work_dirs(tmp_path, run_dir):
    with pytest.raises(ValueError, match="no config.json"):
        evaluate.evaluate_run(str(tmp_path))
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="no checkpoints"):
        evaluate.evaluate_run(str(tmp_path))
    with pytest.raises(ValueError, match="which must be one of"):
        evaluate.evaluate_run(str(run_dir), which="first")
