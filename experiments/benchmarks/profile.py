"""Per-kernel device time of one rule call: record a JAX profiler trace, then sum its kernels by name.

    # on the GPU machine: one call of the forward (or --backward) after warm-up, trace copied to OUT_DIR
    python -m experiments.benchmarks.profile record --rule kda --impl chunk --out-dir $OUT
    # a decoding loop instead: 32 one-token steps (`rules.kda_step`) in one jitted scan, B = 64
    python -m experiments.benchmarks.profile record --rule kda --impl pallas --decode 32 --shape 64 1 16 128 128
    # anywhere with `pip install xprof` (it parses the trace; not a project dependency)
    python -m experiments.benchmarks.profile summarize $OUT/kda-chunk-fwd.xplane.pb --top 25

The trace is the profiler's own XSpace file; `summarize` reads the device planes (/device:GPU:N, or /host:CPU
when there is no device) and prints each kernel's total time, count and share, largest first.
"""

import argparse
import collections
import glob
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp

from edarnn import rules
from edarnn.check_forms import random_inputs
from experiments.benchmarks.rules import burst_unroll, decode_loop, token_steps


def record(
    rule: str,
    impl: str,
    backward: bool,
    shape: tuple[int, ...],
    dtype: str,
    out_dir: str,
    decode: int = 0,
    decode_unroll: int = 0,
) -> str:
    """Trace one jitted call (after a warm-up) and copy the XSpace file to out_dir; returns its path. decode > 0:
    the call is a decoding loop instead (`decode_loop`, as kernels.py's decode rows time it): `decode` one-token
    steps of `rules.<rule>_step` from a random float32 state, each on its own token (`token_steps`), outputs kept
    (T of the shape unused); the loop unrolled by decode_unroll (0: all steps; 1: XLA's loop)."""
    batch, seq, heads, key, value = shape
    inputs = [x.astype(dtype) if i < 3 else x for i, x in enumerate(random_inputs(rule, batch, seq, heads, key, value))]
    call = lambda *a: rules.RULES[rule](*a, impl=impl)  # noqa: E731
    if decode:
        step = getattr(rules, f"{rule}_step")
        tokens = token_steps([x[:, 0] for x in inputs], decode)
        inputs = [tokens, jax.random.normal(jax.random.key(1), (batch, heads, key, value))]
        decode_unroll = burst_unroll(decode_unroll, decode)
        fn = jax.jit(decode_loop(lambda s, token: step(s, *token, impl=impl), unroll=decode_unroll))
    elif backward:
        loss = lambda *a: jnp.sum(call(*a)[0].astype(jnp.float32))  # noqa: E731
        fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))
    else:
        fn = jax.jit(call)
    jax.block_until_ready(fn(*inputs))
    phase = f"decode{decode}-unroll{decode_unroll}" if decode else "fwd_bwd" if backward else "fwd"
    return trace_to(os.path.join(out_dir, f"{rule}-{impl}-{phase}.xplane.pb"), lambda: fn(*inputs))


def trace_to(path, call):
    """Run call() once under the JAX profiler (waiting for its results) and copy the trace's XSpace file to path
    (its folder made if missing); returns path."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(call())
        (found,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        shutil.copy(found, path)
    return path


def summarize(path: str, top: int) -> None:
    """Print the kernels of the trace's device planes by total time."""
    from xprof.profile_data import ProfileData  # noqa: PLC0415  (optional: pip install xprof)

    data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:")] or [
        p for p in data.planes if p.name == "/host:CPU"
    ]
    for plane in planes:
        totals, counts = collections.Counter(), collections.Counter()
        for line in plane.lines:
            if line.name in ("XLA Modules", "XLA Ops", "Steps", "Source", "XLA TraceMe"):
                continue  # summaries of the kernels, not kernels
            for event in line.events:
                totals[event.name] += event.duration_ns / 1e3
                counts[event.name] += 1
        total = sum(totals.values())
        print(f"{plane.name}: {total / 1e3:.3f} ms in {sum(counts.values())} events")
        for name, micros in totals.most_common(top):
            print(f"{micros:10.1f} us {counts[name]:5d}x {100 * micros / max(total, 1e-9):5.1f}%  {name[:100]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    rec = verbs.add_parser("record")
    rec.add_argument("--rule", default="gated_delta_rule", choices=list(rules.RULES))
    rec.add_argument("--impl", default="chunk", choices=[i for i in rules.IMPLS if i != "auto"])
    rec.add_argument("--backward", action="store_true", help="trace forward+backward instead of the forward")
    rec.add_argument("--shape", type=int, nargs=5, default=(4, 4096, 16, 128, 128), metavar=("B", "T", "H", "K", "V"))
    rec.add_argument("--dtype", default="bfloat16")
    rec.add_argument("--decode", type=int, default=0, metavar="STEPS", help="trace a loop of STEPS decoding steps")
    rec.add_argument("--decode-unroll", type=int, default=0, help="the loop's unroll (0: all steps, as kernels.py)")
    rec.add_argument("--out-dir", default=".")
    summ = verbs.add_parser("summarize")
    summ.add_argument("trace")
    summ.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.verb == "record":
        shape = tuple(args.shape)
        print(
            record(
                args.rule, args.impl, args.backward, shape, args.dtype, args.out_dir, args.decode, args.decode_unroll
            )
        )
    else:
        summarize(args.trace, args.top)


if __name__ == "__main__":
    main()
