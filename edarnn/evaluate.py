"""Evaluates a checkpoint of a training run: every metric of its task, the same numbers the training loop logs.

    python -m edarnn.evaluate --workdir runs/NAME [--checkpoint latest|best] [--split eval|train] [--batches N]
                              [--seq-len L]

Reads the run's config (<workdir>/config.json, written by edarnn.train), restores its newest readable checkpoint
(or, with --checkpoint best, the one with the best train.keep_best metric in metrics.jsonl) with
edarnn.train.init_or_restore, and runs edarnn.train.evaluate on train.eval_batches (or N) batches of the split,
the batches the training loop evaluates on. --seq-len evaluates on rows of another length (length
extrapolation; a synthetic task must fit in it). Metrics:

    loss             mean cross-entropy over the scored positions (nats per token)
    accuracy         the fraction of scored positions predicted right (argmax)
    query_accuracy   the fraction of queries whose every answer position is right (consecutive scored positions
                     of a row form one query; for text, a row's whole run of positions)
    bits_per_byte    byte-level text only: loss / ln 2 (the targets include each document's EOS)

Prints a table and writes <workdir>/eval_<split>_step<step>_len<L>.json:
{"step", "split", "seq_len", "batches", "checkpoint", "metrics": {name: value}}.
"""

import argparse
import itertools
import json
import math
import os
from pathlib import Path

import jax
import ml_collections
from absl import logging

from edarnn import checkpoint, data, metrics, sharding, train
from edarnn import config as config_lib

CHECKPOINTS = ("latest", "best")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` trained with (its config.json), checked for this process's devices."""
    path = Path(workdir, "config.json")
    if not path.is_file():
        raise ValueError(f"workdir={workdir!r}: no config.json (not a work dir of edarnn.train)")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    return config_lib.resolve(config, jax.device_count(), jax.process_count())


def best_step(workdir: str, steps, metric: str) -> int:
    """Of the checkpoint `steps`, the one whose evaluation in metrics.jsonl is best by `metric` (an entry of
    edarnn.config.EVAL_METRICS; the later record of a step counts)."""
    logged = {r["step"]: r[metric] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if metric in r}
    ranked = [step for step in steps if step in logged]
    if not ranked:
        raise ValueError(f"workdir={workdir!r}: no checkpoint of steps {sorted(steps)} has a logged {metric}")
    sign = 1 if config_lib.EVAL_METRICS[metric] == "max" else -1
    return max(ranked, key=lambda step: sign * logged[step])


def restore(workdir: str, which: str = "latest"):
    """Checkpoint `which` ("latest" or "best") of the run in `workdir`: (config, step, mesh, graphdef, params),
    the parameters laid out on the mesh (nnx.merge(graphdef, params) is the model)."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {CHECKPOINTS}; got {which!r}")
    config = load_config(workdir)
    mesh = sharding.make_mesh(config.mesh)
    optimizer, _ = train.make_optimizer(config.train)
    manager = checkpoint.make_manager(os.path.join(os.path.abspath(workdir), "checkpoints"), config.train)
    steps = list(manager.all_steps())
    if not steps:
        raise ValueError(f"workdir={workdir!r}: no checkpoints")
    if which == "best":
        if not config.train.keep_best:
            raise ValueError(f"which='best': the run in {workdir!r} ranks no checkpoints (train.keep_best is '')")
        steps = [best_step(workdir, steps, config.train.keep_best)]
    train_iterator = iter(train.make_loader(config, "train"))  # its position is restored with the state
    graphdef, _, state, step = train.init_or_restore(config, mesh, optimizer, manager, train_iterator, steps)
    manager.close()
    if not step:
        raise ValueError(f"workdir={workdir!r}: no readable checkpoint among steps {sorted(steps)}")
    return config, step, mesh, graphdef, state["params"]


def evaluate_run(
    workdir: str,
    *,
    split: str = "eval",
    batches: int | None = None,
    seq_len: int | None = None,
    which: str = "latest",
) -> dict:
    """Evaluates checkpoint `which` ("latest" or "best") of the run in `workdir` on `batches` (default
    train.eval_batches) batches of `split` at rows of `seq_len` (default data.seq_len) tokens; returns the
    record written to the work dir (see the module docstring)."""
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be a positive int; got {batches!r}")
    config, step, mesh, graphdef, params = restore(workdir, which)
    batches = batches or config.train.eval_batches
    seq_len = seq_len or config.data.seq_len
    with jax.set_mesh(mesh):
        eval_step = jax.jit(lambda params, batch: train.eval_sums(params, graphdef, batch))
        batch_sharding = sharding.batch_sharding(mesh)
        local = itertools.islice(train.make_loader(config, split, seq_len), batches)
        results = train.evaluate(
            lambda batch: eval_step(params, batch), (train.to_global(b, batch_sharding) for b in local)
        )
    results = {name.removeprefix("eval_"): value for name, value in results.items()}
    if config.data.source == "bytes" and not config.data.bytes.tokenizer:
        results["bits_per_byte"] = results["loss"] / math.log(2)
    record = {"step": step, "split": split, "seq_len": seq_len, "batches": batches, "checkpoint": which}
    record["metrics"] = results
    if jax.process_index() == 0:
        Path(workdir, f"eval_{split}_step{step}_len{seq_len}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def format_table(record: dict) -> str:
    """The record as a two-column text table."""
    head = f"step {record['step']} ({record['checkpoint']}), {record['split']} split, {record['batches']} batches "
    head += f"of rows of {record['seq_len']} tokens"
    width = max(len(name) for name in record["metrics"])
    return "\n".join([head, *(f"  {name:<{width}}  {value:.6g}" for name, value in record["metrics"].items())])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluates a checkpoint of a training run (edarnn.evaluate).")
    parser.add_argument("--workdir", required=True, help="the work dir of a training run")
    parser.add_argument("--split", default="eval", choices=data.SPLITS, help="the data split evaluated")
    parser.add_argument("--batches", type=int, help="batches evaluated (default: the run's train.eval_batches)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: the run's data.seq_len)")
    parser.add_argument("--checkpoint", default="latest", choices=CHECKPOINTS, help="which checkpoint is evaluated")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they read at INFO
    record = evaluate_run(
        args.workdir, split=args.split, batches=args.batches, seq_len=args.seq_len, which=args.checkpoint
    )
    print(format_table(record))


if __name__ == "__main__":
    main()
