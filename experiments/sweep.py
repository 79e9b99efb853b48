"""A sweep of update rules at matched state size on a synthetic task: every (rule, setting, seed) trained from
scratch with edarnn.train, its last evaluation collected into one JSON file and plotted.

    python -m experiments.sweep --task mqar --rules eda,gdn2 --values 4,8 --seeds 0,1 --steps 400 \
        --out docs/results/mqar_sweep.json [--plot docs/results/mqar_sweep.png]
    python -m experiments.sweep --bars a.json b.json --plot bars.png      # a bar chart of finished sweeps

The model is configs/default.py's (2 layers, d_model 64, 2 heads of a 32 x 32 state, rows of 64 tokens; --head-dim
sets the state's K = V, with a --workdir of its own per state size),
the same for every rule (gates and erase projections add their few parameters); --task picks the task and
--values the setting swept: "mqar" the number of key-value pairs, "edit_rebind" / "edit_retract" the number of
keys, "edit_records" the number of records. Each run's work dir is <workdir>/<task>-<rule>-<value>-seed<seed>;
an existing result there is reused, so an interrupted sweep resumes (SIGTERM or Ctrl-C stops the sweep after
the current run's checkpoint, the run unrecorded).
"""

import argparse
import json
import os
from pathlib import Path

import ml_collections

from edarnn import config as config_lib
from edarnn import train

RULES = ("linear_attention", "gla", "delta_rule", "gated_delta_rule", "kda", "gdn2", "eda", "eda_channel")
"""The recurrent mixers of edarnn.model compared (gla: channel-wise decay)."""

SWEPT = {  # task -> (the field swept, the task's other settings for rows of 64 tokens)
    "mqar": ("num_pairs", dict(key_vocab_size=32, value_vocab_size=32, noise_vocab_size=16)),
    "edit_rebind": ("num_keys", dict(num_rebinds=2, key_vocab_size=32, value_vocab_size=32)),
    "edit_retract": ("num_keys", dict(key_vocab_size=32, value_vocab_size=32)),
    "edit_records": ("num_records", dict(num_fields=2, num_updates=4, record_vocab_size=32, value_vocab_size=32)),
}


def sweep_config(
    rule: str,
    task: str,
    value: int,
    seed: int,
    *,
    steps: int,
    seq_len: int = 64,
    batch_size: int = 32,
    head_dim: int = 32,
) -> ml_collections.ConfigDict:
    """The config of one run: configs/default.py's model with `rule` in every layer and a head_dim x head_dim state
    per head (2 heads), `task` with its swept field at `value`, `steps` updates (warmup a tenth), evaluation only at
    the end, one checkpoint at the end."""
    if task not in SWEPT:
        raise ValueError(f"task must be one of {tuple(SWEPT)}; got {task!r}")
    field, settings = SWEPT[task]
    config = config_lib.defaults()
    config.seed = seed
    config.model.update(
        d_model=64,
        n_layers=2,
        layers=(rule,),
        n_heads=2,
        head_dim_k=head_dim,
        head_dim_v=head_dim,
        d_ff=128,
        chunk_size=32,
    )
    config.data.update(source=task, seq_len=seq_len, batch_size=batch_size)
    config.data[task].update({**settings, field: value})
    if task == "edit_retract":
        config.data[task].num_retractions = value // 2
    config.train.update(
        steps=steps,
        lr=3e-3,
        warmup_steps=max(steps // 10, 1),
        log_every=max(steps // 4, 1),
        eval_every=0,
        eval_batches=8,
        checkpoint_every=0,
        keep_last=1,
        async_checkpoints=False,
    )
    return config


def run(task: str, rules, values, seeds, *, steps: int, workdir: str, **setting) -> list[dict]:
    """Trains every (rule, value, seed) (sweep_config; `setting`: its seq_len, batch_size, head_dim) under `workdir`;
    returns one record per run: {"task", "rule", "field", "value", "seed", "steps", "head_dim", <the last
    evaluation>}."""
    results = []
    for rule in rules:
        for value in values:
            for seed in seeds:
                run_dir = Path(workdir, f"{task}-{rule}-{value}-seed{seed}")
                done = run_dir / "result.json"
                if done.exists():
                    results.append(json.loads(done.read_text()))
                    continue
                config = sweep_config(rule, task, value, seed, steps=steps, **setting)
                metrics = train.train(config, str(run_dir))
                if not metrics:  # stopped by SIGTERM / Ctrl-C before its evaluation at the last step
                    raise SystemExit(f"{run_dir}: stopped before step {steps}; the same command resumes the sweep")
                record = {"task": task, "rule": rule, "field": SWEPT[task][0], "value": value, "seed": seed}
                results.append({**record, "steps": steps, "head_dim": config.model.head_dim_k, **metrics})
                done.write_text(json.dumps(results[-1]) + "\n")
    return results


def summary(results: list[dict], metric: str = "eval_query_accuracy") -> dict[str, dict[int, tuple[float, float]]]:
    """{rule: {value: (mean, min-to-max half range) of `metric` over the seeds}}."""
    grouped: dict[str, dict[int, list[float]]] = {}
    for r in results:
        grouped.setdefault(r["rule"], {}).setdefault(r["value"], []).append(r[metric])
    return {
        rule: {value: (sum(xs) / len(xs), (max(xs) - min(xs)) / 2) for value, xs in sorted(by_value.items())}
        for rule, by_value in grouped.items()
    }


def markdown_table(results: list[dict], metric: str = "eval_query_accuracy") -> str:
    """A markdown table: a row per rule, a column per swept value, mean ± half range over the seeds."""
    table = summary(results, metric)
    values = sorted({r["value"] for r in results})
    seeds = len({r["seed"] for r in results})
    field = results[0]["field"]
    lines = [
        f"| rule \\ {field} | " + " | ".join(str(v) for v in values) + " |",
        "|---|" + "---|" * len(values),
    ]
    for rule, by_value in table.items():
        cells = [f"{by_value[v][0]:.3f} ± {by_value[v][1]:.3f}" if v in by_value else "" for v in values]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n({metric}, mean ± half the range over {seeds} seed(s))"


def plot(results: list[dict], ax=None, metric: str = "eval_query_accuracy"):
    """Accuracy against the swept value, a line per rule (mean over seeds, error bars: the range); returns the
    matplotlib Axes."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (only for plots)

    ax = ax or plt.figure(figsize=(6, 4)).gca()
    for rule, by_value in summary(results, metric).items():
        values = list(by_value)
        means, spreads = zip(*by_value.values(), strict=True)
        ax.errorbar(values, means, yerr=spreads, marker="o", capsize=3, label=rule)
    ax.set_xlabel(results[0]["field"])
    ax.set_ylabel(metric)
    ax.set_title(results[0]["task"])
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    return ax


def bars(results_per_task: list[list[dict]], metric: str = "eval_query_accuracy"):
    """A bar per rule and task (mean over seeds and swept values, error bars: the seeds' range), the tasks side by
    side; returns the matplotlib Axes."""
    import matplotlib.pyplot as plt  # noqa: PLC0415  (only for plots)

    rules = list(dict.fromkeys(r["rule"] for results in results_per_task for r in results))
    ax = plt.figure(figsize=(1.2 * len(rules) + 2, 4)).gca()
    width = 0.8 / len(results_per_task)
    for i, results in enumerate(results_per_task):
        table = summary(results, metric)
        means = [sum(m for m, _ in table[rule].values()) / len(table[rule]) if rule in table else 0 for rule in rules]
        spreads = [max(h for _, h in table[rule].values()) if rule in table else 0 for rule in rules]
        label = f"{results[0]['task']} ({results[0]['field']} {', '.join(str(v) for v in sorted(table[rules[0]]))})"
        ax.bar([j + i * width for j in range(len(rules))], means, width, yerr=spreads, capsize=3, label=label)
    middle = width * (len(results_per_task) - 1) / 2
    ax.set_xticks([j + middle for j in range(len(rules))], rules, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return ax


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mqar", choices=tuple(SWEPT))
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated mixers of edarnn.model")
    parser.add_argument("--values", type=_ints, default=[8], help="comma-separated values of the swept field")
    parser.add_argument("--seeds", type=_ints, default=[0, 1])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=32, help="K = V of each head's state (2 heads per layer)")
    parser.add_argument("--workdir", default="runs/sweep", help="the runs' work dirs go under it")
    parser.add_argument("--out", help="JSON file of the results")
    parser.add_argument("--plot", help="PNG file of the accuracy curves")
    parser.add_argument("--bars", nargs="+", help="no training: a bar chart (--plot) of these result files")
    args = parser.parse_args()
    if args.bars:
        results_per_task = [json.loads(Path(path).read_text()) for path in args.bars]
        bars(results_per_task).figure.savefig(args.plot, dpi=120, bbox_inches="tight")
        return
    if not args.out:
        parser.error("--out is required (unless --bars)")
    results = run(
        args.task,
        args.rules.split(","),
        args.values,
        args.seeds,
        steps=args.steps,
        workdir=args.workdir,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        head_dim=args.head_dim,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(markdown_table(results))
    if args.plot:
        plot(results).figure.savefig(args.plot, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
