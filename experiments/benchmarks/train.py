"""Training throughput of the ~125M language models of configs/lm_125m.py: tokens/s, step time, MFU and memory.

    python -m experiments.benchmarks.train                                    # 4 architectures x T = 2k, 8k, 32k
    python -m experiments.benchmarks.train --seq-lens 32768 --rule-impl chunk --out t32k.json
    python -m experiments.benchmarks.train --seq-lens 2048 --archs gdn2 --without-rule --profile $OUT
    python -m experiments.benchmarks.train --tiny --out /tmp/train.json       # CPU smoke test (seconds)

Cases: every architecture of configs/lm_125m.py (--archs; "attention" first, the baseline of the `x attn` column)
at every T of --seq-lens, with B = max(1, --tokens-per-batch // T) rows, i.e. about the same tokens per step at
every T. The model is the config's (bf16 compute, float32 parameters, remat per block, sliding windows of 1024
in the hybrid) with model.rule_impl = --rule-impl for the recurrent layers; --tiny swaps in a tiny model of the
same layer patterns (TINY_MODEL) and T = 64, 128 for a CPU run.

Each case builds the training job's own train step (edarnn.train: AdamW, clipping, the mesh from config.mesh,
all devices data parallel by default; the state donated) and feeds it synthetic batches: uniform random token
ids, next-token targets, every position scored, one document per row (no segment_ids, so attention runs without
a mask: cuDNN's causal / sliding-window flash attention on a GPU). After --warmup steps, --steps steps are timed
one by one (jax.block_until_ready on the new state and metrics, host clock); the step time is their median.
tokens/s = B T / median step time; MFU = edarnn.model.flops_per_token x tokens/s / the devices' bf16 peak
(edarnn.metrics.PEAK_BF16_FLOPS; none on the CPU).

Diagnostics: --profile DIR records a JAX profiler trace of one more step per case to DIR/ARCH-T.xplane.pb
(summarise with `python -m experiments.benchmarks.profile summarize`). --without-rule is an ablation, not a model:
every recurrent layer's rule is replaced by `rule_stand_in` (o = v plus a per-token sum of every other rule input,
so that no projection or gate is dead code), which times everything around the rules; the step time with the
rules minus this is what the rules cost inside the model.

Memory: `step GiB` is the compiled step's footprint from XLA's memory analysis (arguments + outputs - donated
aliases + scratch), exact per case; `peak GiB` the device's peak_bytes_in_use where the backend reports it, which
JAX cannot reset: it is the peak of the process so far (run one case per process for a per-case peak). A case that
fails (out of memory, a refused shape, an invalid config) becomes an error row and the sweep goes on.
"""

import argparse
import gc
import importlib.util
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edarnn import config as config_lib
from edarnn import metrics, model, rules, sharding, train
from experiments.benchmarks import rules as rb  # the rules benchmark: machine(), print_cells()
from experiments.benchmarks.profile import trace_to

CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "lm_125m.py"
BASELINE = "attention"
TINY_MODEL = dict(d_model=32, n_layers=4, n_heads=2, head_dim_k=16, head_dim_v=16, d_ff=64, window=32, chunk_size=16)
"""--tiny: model fields set over configs/lm_125m.py's (4 layers: the hybrid keeps its sliding-window layer)."""
TINY_SEQ_LENS, TINY_TOKENS_PER_BATCH = (64, 128), 256
SEQ_LENS, TOKENS_PER_BATCH = (2048, 8192, 32768), 65536


def _lm_125m():
    spec = importlib.util.spec_from_file_location("configs_lm_125m", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LM_125M = _lm_125m()
ARCHITECTURES = tuple(LM_125M.ARCHITECTURES)


def case_config(arch: str, seq_len: int, args):
    """configs/lm_125m.py:<arch> at T = seq_len with B = max(1, tokens per batch // T), --rule-impl, remat off
    with --no-remat, and the tiny model with --tiny; checked by edarnn.config.resolve for this machine's devices."""
    config = LM_125M.get_config(arch)
    config.model.update(rule_impl=args.rule_impl, remat=config.model.remat and not args.no_remat)
    if args.tiny:
        config.model.update(TINY_MODEL)
    config.data.update(seq_len=seq_len, batch_size=max(1, args.tokens_per_batch // seq_len))
    return config_lib.resolve(config, jax.device_count(), jax.process_count())


def rule_stand_in(q, k, v, *gates, initial_state=None, **options):
    """--without-rule's stand-in for a rule of edarnn.rules (same call, any rule): o = v + the sum over every
    other input (q, k, the gates, e) of its per-token, per-head sum, so that every projection and gate stays live
    at about the cost of reading them; state: initial_state, or zeros [B, H, K, V] float32. An ablation that times
    the model around its rules; it computes nothing meaningful."""
    batch, _, heads, key = q.shape
    others = [q, k, *(t for t in gates if t is not None), *(t for t in options.values() if isinstance(t, jax.Array))]
    total = sum(t.astype(jnp.float32).reshape(*t.shape[:3], -1).sum(-1, keepdims=True) for t in others if t.ndim >= 3)
    state = jnp.zeros((batch, heads, key, v.shape[-1]), jnp.float32) if initial_state is None else initial_state
    return (v.astype(jnp.float32) + total).astype(q.dtype), state


def synthetic_batches(count: int, batch_size: int, seq_len: int, vocab_size: int, batch_sharding) -> list[dict]:
    """`count` batches {inputs, targets, loss_mask} [B, T] on the devices: random token ids, targets the next id,
    every position scored."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(count):
        tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch_size, seq_len))}
        batches.append(
            {name: jax.device_put(x.astype(train.BATCH_DTYPES[name]), batch_sharding) for name, x in batch.items()}
        )
    return batches


def step_bytes(compiled) -> int | None:
    """The compiled step's device footprint by XLA's memory analysis: arguments + outputs - aliases + scratch."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )


def run_case(config, args, trace_path: Path | None = None) -> dict:
    """Compile the training job's step for `config`, run --warmup steps, time --steps: the measurements; with a
    trace_path, also a profiler trace of one more step there."""
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    mesh = sharding.make_mesh(config.mesh)
    optimizer, _ = train.make_optimizer(config.train)
    graphdef, shardings, state, _ = train.init_or_restore(config, mesh, optimizer)
    batch_sharding = sharding.batch_sharding(mesh)
    batches = synthetic_batches(2, batch_size, seq_len, config.model.vocab_size, batch_sharding)
    batch_shapes = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for name, x in batches[0].items()}
    record = {"params": model.count_params(nnx.merge(graphdef, state["params"]))}
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        step = train.compile_train_step(graphdef, optimizer, config.train.grad_accum, shardings, state, batch_shapes)
        record.update(compile_s=round(time.perf_counter() - start, 2), step_bytes=step_bytes(step))
        params, opt_state = state["params"], state["opt_state"]
        del state  # donated to the first step
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            params, opt_state, step_metrics = step(params, opt_state, batches[i % len(batches)])
            jax.block_until_ready((params, opt_state, step_metrics))
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        if trace_path is not None:
            batch = batches[len(times) % len(batches)]
            try:  # a failed trace costs the trace, not the timings
                record["trace"] = str(trace_to(trace_path, lambda: step(params, opt_state, batch)))
            except Exception as exc:  # noqa: BLE001
                record["trace_error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    median = statistics.median(times)
    tokens_per_s = batch_size * seq_len / median
    flops_per_token = model.flops_per_token(config.model, seq_len)
    device_kind = jax.devices()[0].device_kind
    record.update(
        median_ms=1e3 * median,
        min_ms=1e3 * min(times),
        steps_timed=len(times),
        tokens_per_s=tokens_per_s,
        flops_per_token=flops_per_token,
        # the rules' FLOPs are counted in flops_per_token: no MFU for the ablation, which skips them
        mfu=None if args.without_rule else metrics.mfu(flops_per_token, tokens_per_s, device_kind, jax.device_count()),
        last_loss=float(step_metrics["loss"]),
    )
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    if peak is not None:
        record["device_peak_bytes"] = int(peak)
    return record


COLUMNS = (
    ("arch", 10),
    ("T", 6),
    ("B", 4),
    ("params M", 9),
    ("step ms (min)", 18),
    ("tokens/s", 10),
    ("x attn", 7),
    ("MFU %", 6),
    ("step GiB", 9),
    ("peak GiB", 9),
    ("note", 0),
)


def print_row(case=None):
    """One table line for a case record (the header when none)."""
    if case is None:
        rb.print_cells([name for name, _ in COLUMNS], COLUMNS)
        return
    gib = lambda name: "" if case.get(name) is None else f"{case[name] / 2**30:.2f}"  # noqa: E731
    timed = "median_ms" in case
    cells = [
        case["arch"],
        case["seq_len"],
        case.get("batch_size", ""),
        f"{case['params'] / 1e6:.1f}" if "params" in case else "",
        f"{case['median_ms']:.1f} ({case['min_ms']:.1f})" if timed else "error",
        f"{case['tokens_per_s']:.0f}" if timed else "",
        f"{case['vs_attention']:.2f}" if case.get("vs_attention") else "",
        f"{100 * case['mfu']:.1f}" if case.get("mfu") is not None else "",
        gib("step_bytes"),
        gib("device_peak_bytes"),
        case.get("error", ""),
    ]
    rb.print_cells(cells, COLUMNS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--archs",
        nargs="+",
        default=list(ARCHITECTURES),
        choices=ARCHITECTURES,
        metavar="ARCH",
        help=f"architectures of configs/lm_125m.py, any of {', '.join(ARCHITECTURES)} (default: all)",
    )
    p.add_argument(
        "--seq-lens", nargs="+", type=int, default=None, help=f"T (default {SEQ_LENS}; --tiny: {TINY_SEQ_LENS})"
    )
    p.add_argument(
        "--tokens-per-batch",
        type=int,
        default=None,
        help=f"tokens per step, B x T (default {TOKENS_PER_BATCH}; --tiny: {TINY_TOKENS_PER_BATCH})",
    )
    p.add_argument("--rule-impl", default="auto", choices=rules.IMPLS, help="model.rule_impl of the recurrent layers")
    p.add_argument(
        "--without-rule",
        action="store_true",
        help="ablation: the recurrent layers' rules replaced by rule_stand_in (times everything around them)",
    )
    p.add_argument(
        "--no-remat",
        action="store_true",
        help="model.remat off: every block's activations kept for the backward (the rules keep their chunk states)",
    )
    p.add_argument("--profile", metavar="DIR", help="record a profiler trace of one step per case to DIR")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case after compiling")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same patterns (TINY_MODEL), for the CPU")
    p.add_argument("--out", default="train_benchmark.json")
    args = p.parse_args(argv)
    args.seq_lens = args.seq_lens or list(TINY_SEQ_LENS if args.tiny else SEQ_LENS)
    args.tokens_per_batch = args.tokens_per_batch or (TINY_TOKENS_PER_BATCH if args.tiny else TOKENS_PER_BATCH)
    if min(args.seq_lens) < 1 or args.tokens_per_batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--seq-lens, --tokens-per-batch and --steps must be positive, --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    info = rb.machine()
    archs = sorted(args.archs, key=lambda arch: arch != BASELINE)
    settings = {
        key: getattr(args, key)
        for key in ("archs", "seq_lens", "tokens_per_batch", "rule_impl", "no_remat", "without_rule", "steps", "warmup")
    }
    report = {"machine": info, "config": {**settings, "tiny": args.tiny}, "notes": NOTES, "cases": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    print(
        f"# {info['backend']} / {info['device_kind']} x {info['device_count']}; jax {info['jax']}, "
        f"jaxlib {info['jaxlib']}, flax {info['flax']}, python {info['python']}"
    )
    print(
        f"# configs/lm_125m.py{' (--tiny model)' * args.tiny}, {args.tokens_per_batch} tokens per step, "
        f"rule_impl {args.rule_impl}; median (min) of {args.steps} steps after {args.warmup}; x attn = tokens/s / "
        f"{BASELINE}'s at the same T"
    )
    print_row()
    start = time.perf_counter()
    stand_ins = dict.fromkeys(rules.RULES, rule_stand_in) if args.without_rule else {}
    with mock.patch.dict(rules.RULES, stand_ins):  # the model looks its rule up in rules.RULES
        for seq_len in args.seq_lens:
            baseline = None
            for arch in archs:
                case = {"arch": arch, "seq_len": seq_len}
                try:
                    config = case_config(arch, seq_len, args)
                    case.update(batch_size=config.data.batch_size, rule_impl=config.model.rule_impl)
                    trace_path = Path(args.profile) / f"{arch}-{seq_len}.xplane.pb" if args.profile else None
                    case.update(run_case(config, args, trace_path))
                except Exception as exc:  # noqa: BLE001  (out of memory, refused shape, bad config): report, go on
                    case["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                gc.collect()
                if arch == BASELINE:
                    baseline = case.get("tokens_per_s")
                elif baseline and "tokens_per_s" in case:
                    case["vs_attention"] = case["tokens_per_s"] / baseline
                report["cases"].append(case)
                print_row(case)
                save()  # after every case, so that an interrupted sweep keeps what it measured
    print(f"# {len(report['cases'])} cases in {time.perf_counter() - start:.0f} s; wrote {args.out}")


NOTES = (
    "median_ms/min_ms: step time over steps_timed steps after warmup; tokens_per_s = batch_size * seq_len / "
    "median; mfu against edarnn.metrics.PEAK_BF16_FLOPS (null on the CPU); vs_attention: tokens_per_s / the "
    "attention model's at the same seq_len; step_bytes: XLA memory analysis of the compiled step (arguments + "
    "outputs - aliases + temp); device_peak_bytes: peak_bytes_in_use of the process so far (not reset per case)"
)

if __name__ == "__main__":
    main()
