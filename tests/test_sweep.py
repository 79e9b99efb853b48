"""experiments/sweep.py without training: records, resumption, the summary table."""

import json
import os

import pytest

from experiments import sweep


def test_sweep_records_each_run_reuses_finished_ones_and_stops_at_an_interrupted_one(tmp_path, monkeypatch):
    """A finished run's result.json is written and reused by the next sweep; a run stopped before its last step
    (train.train returns no evaluation) stops the sweep and leaves no result."""
    trained = []

    def train(config, workdir):
        trained.append(workdir)
        os.makedirs(workdir)
        return {} if "seed1" in workdir else {"eval_loss": 1.0, "eval_query_accuracy": 0.5 + config.seed}

    monkeypatch.setattr(sweep.train, "train", train)
    with pytest.raises(SystemExit, match="seed1: stopped before step 3"):
        sweep.run("mqar", ["eda"], [4], [0, 1], steps=3, workdir=str(tmp_path))
    assert not (tmp_path / "mqar-eda-4-seed1" / "result.json").exists()
    record = json.loads((tmp_path / "mqar-eda-4-seed0" / "result.json").read_text())
    assert record == {
        "task": "mqar",
        "rule": "eda",
        "field": "num_pairs",
        "value": 4,
        "seed": 0,
        "steps": 3,
        "head_dim": 32,
        "eval_loss": 1.0,
        "eval_query_accuracy": 0.5,
    }
    trained.clear()
    assert sweep.run("mqar", ["eda"], [4], [0], steps=3, workdir=str(tmp_path)) == [record]
    assert not trained
    assert "| eda | 0.500 ± 0.000 |" in sweep.markdown_table([record])
