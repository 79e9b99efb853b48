"""Launch-parameter and layout variants of the Pallas GPU chunkwise forward, timed in one process (one machine),
with flash-linear-attention's chunk ops in the same run for the ratio.

    python -m experiments.benchmarks.pallas_variants --variants fused_f32 split_bf16 --rules kda eda \\
        --fla --profile kda:split_bf16 --out $OUT/variants.json

A variant is a set of `pallas_kernels.gpu.chunk_fwd.Config` fields (VARIANTS below); the script swaps
chunk_fwd.DEFAULT_CONFIG and compiles a fresh jit per variant. Inputs are `experiments.benchmarks.rules
.make_inputs` (q, k, v in --dtype, gates float32), --input-sets sets cycled; times are medians of --repeats
synchronised calls after --warmup calls, host clock (as `kernels.py`). --profile RULE:VARIANT also records a JAX
profiler trace of one call to --out's folder (summarise with `python -m experiments.benchmarks.profile
summarize`). Prints one line per case as it goes and a table last.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch too

import argparse  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from edarnn import rules  # noqa: E402
from experiments.benchmarks import rules as rb  # noqa: E402
from pallas_kernels.gpu import chunk_fwd  # noqa: E402

F32 = {"low_inputs": False, "low_intermediates": False, "low_states": False}
VARIANTS = {
    "fused_f32": {"split": False, **F32},  # the layout before the split, float32 everywhere
    "fused_bf16": {"split": False},
    "split_f32": {"split": True, **F32},
    "split_bf16": {"split": True},
    "split_bf16_f32states": {"split": True, "low_states": False},
    "split_bf16_pair2": {"split": True, "pair_warps": (2, 2)},
    "split_bf16_pair8": {"split": True, "pair_warps": (8, 8)},
    "split_bf16_solve2": {"split": True, "solve_warps": (2, 4)},
    "split_bf16_solve8": {"split": True, "solve_warps": (8, 8)},
    "split_bf16_rowloads": {"split": True, "solve_row_loads": True},
    "split_bf16_solve16": {"split": True, "solve_block_rows": 16},
    "split_bf16_solve16_rowloads": {"split": True, "solve_block_rows": 16, "solve_row_loads": True},
    "split_bf16_state8": {"split": True, "state_warps": 8},
    "split_bf16_out32": {"split": True, "output_block_v": 32},
    "split_bf16_state32": {"split": True, "state_block_v": 32},
    "split_bf16_stages2": {"split": True, "state_stages": 2},
    "split_bf16_stages3": {"split": True, "state_stages": 3},
}


def timed(fn, input_sets, warmup, repeats):
    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*input_sets[(warmup + i) % len(input_sets)]))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def profile(fn, inputs, path):
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(fn(*inputs))
        (found,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        shutil.copy(found, path)


def fla_times(rule, input_sets, args):
    from experiments.benchmarks import kernels  # noqa: PLC0415  (imports torch)

    ops, _ = kernels.load_fla()
    if isinstance(ops, str) or isinstance(ops.get(rule), str) or rule not in ops:
        return None
    fwd = kernels.fla_fn(ops[rule]["fla_chunk"], rule, False)
    sets = kernels.to_torch([(xs, jnp.zeros((), xs[0].dtype)) for xs in input_sets])
    ns = argparse.Namespace(warmup=args.warmup, repeats=args.repeats, case_budget=1e9)
    phase = kernels.torch_phases(fwd)["fwd"]
    return kernels.measure_torch(lambda xs, do: phase(xs, do), sets, ns)["median_ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", nargs="+", default=["gated_delta_rule", "kda", "eda"])
    parser.add_argument("--variants", nargs="+", default=["fused_f32", "split_bf16"], choices=list(VARIANTS))
    parser.add_argument(
        "--shape", type=int, nargs=5, default=(4, 4096, 16, 128, 128), metavar=("B", "T", "H", "K", "V")
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--input-sets", type=int, default=2)
    parser.add_argument("--fla", action="store_true", help="time fla's chunk op too (gated_delta_rule, kda, gdn2)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="RULE:VARIANT")
    parser.add_argument("--out", default="variants.json")
    args = parser.parse_args(argv)
    report = {"device": str(jax.devices()[0]), "shape": args.shape, "dtype": args.dtype, "cases": []}
    out_dir = os.path.dirname(os.path.abspath(args.out))

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    for rule in args.rules:
        sets = [
            rb.make_inputs(rule, seed, tuple(args.shape), jnp.dtype(args.dtype))[0] for seed in range(args.input_sets)
        ]
        base = None
        for name in args.variants:
            chunk_fwd.DEFAULT_CONFIG = chunk_fwd.Config(**VARIANTS[name])
            fn = jax.jit(functools.partial(rules.RULES[rule], impl="pallas"))
            start = time.perf_counter()
            try:
                jax.block_until_ready(fn(*sets[0]))
                compile_s = time.perf_counter() - start
                median, best = timed(fn, sets, args.warmup, args.repeats)
            except Exception as exc:  # noqa: BLE001
                report["cases"].append({"rule": rule, "variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
                print(rule, name, "ERROR", str(exc)[:300], flush=True)
                save()
                continue
            base = base or median
            case = {"rule": rule, "variant": name, "median_ms": median, "min_ms": best, "compile_s": compile_s}
            report["cases"].append(case)
            print(f"{rule:18s} {name:24s} {median:8.3f} ms (min {best:.3f}, x{median / base:.2f} of first)", flush=True)
            if f"{rule}:{name}" in args.profile:
                profile(fn, sets[0], os.path.join(out_dir, f"{rule}-{name}.xplane.pb"))
            save()
        chunk_fwd.DEFAULT_CONFIG = chunk_fwd.Config()
        if args.fla:
            try:
                median = fla_times(rule, sets, args)
            except Exception as exc:  # noqa: BLE001
                median, report["fla_error_" + rule] = None, f"{type(exc).__name__}: {exc}"[:400]
            if median is not None:
                report["cases"].append({"rule": rule, "variant": "fla_chunk", "median_ms": median})
                print(f"{rule:18s} {'fla_chunk':24s} {median:8.3f} ms", flush=True)
            save()
    print("\nrule               variant                  median ms   x fla")
    fla = {c["rule"]: c["median_ms"] for c in report["cases"] if c["variant"] == "fla_chunk"}
    for c in report["cases"]:
        if "median_ms" in c:
            ratio = f"{c['median_ms'] / fla[c['rule']]:.2f}" if c["rule"] in fla else "-"
            print(f"{c['rule']:18s} {c['variant']:24s} {c['median_ms']:9.3f}   {ratio}")


if __name__ == "__main__":
    main()
