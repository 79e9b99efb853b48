"""Launch-parameter and layout variants of the Pallas GPU chunkwise forward and backward, timed in one process (one
machine), with flash-linear-attention's chunk ops in the same run for the ratio.

    python -m experiments.benchmarks.pallas_variants --variants f32 bf16 state8 --rules kda eda \\
        --fla --profile kda:bf16 --out $OUT/variants.json
    python -m experiments.benchmarks.pallas_variants --variants bf16 --backward fwd xla kernels kernels_key4 \\
        --fla --profile kda:bf16/kernels --out $OUT/bwd.json

A variant is a set of `pallas_kernels.gpu.chunk_fwd.Config` fields (VARIANTS below); the script swaps
chunk_fwd.DEFAULT_CONFIG and compiles a fresh jit per variant. --backward times each variant per backward (BACKWARDS
below): "fwd" the forward only, else forward and backward (o and the gradients of sum(o * do) w.r.t. q, k, v and the
gates, do random, as `kernels.py`'s fwd+bwd) with the plain-JAX chunk form's VJP ("xla") or the backward kernels
(`forms.BACKWARD_KERNELS["gpu"]` swapped, and `chunk_bwd.Config` fields); such cases are named VARIANT/BACKWARD, and
fla's case is then its fwd+bwd. Inputs are `experiments.benchmarks.rules.make_inputs` (q, k, v in --dtype, gates
float32), --input-sets sets cycled; times are medians per call of --repeats bursts of --burst calls after --warmup
calls, host clock (`rules.measure`, as `kernels.py`), with XLA's compiled memory beyond the inputs (temp_bytes:
temporaries, e.g. what a forward keeps for its backward; output_bytes). --profile RULE:VARIANT also records a JAX
profiler trace of one call to --out's folder (summarise with `python -m experiments.benchmarks.profile summarize`).
Prints one line per case as it goes and a table last.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from edarnn import rules  # noqa: E402
from experiments.benchmarks import rules as rb  # noqa: E402
from experiments.benchmarks.profile import trace_to  # noqa: E402
from pallas_kernels import forms  # noqa: E402
from pallas_kernels.gpu import chunk_bwd, chunk_fwd  # noqa: E402

VARIANTS = {  # name: chunk_fwd.Config fields ("bf16": the default, 16-bit storage with 16-bit inputs)
    "bf16": {},
    "f32": {"low_inputs": False, "low_intermediates": False, "low_states": False},  # float32 everywhere
    "f32states": {"low_states": False},
    "pair1": {"pair_warps": (1, 1)},  # one warp: the reference rows' reductions by shuffles, no shared memory
    "pair4": {"pair_warps": (4, 4)},
    "pair8": {"pair_warps": (8, 8)},
    "solve1": {"solve_warps": (1, 1)},
    "solve2": {"solve_warps": (2, 4)},
    "solve8": {"solve_warps": (8, 8)},
    "state8": {"state_warps": 8},
    "out32": {"output_block_v": 32},
    # the state passes' V blocks as given, whatever B x H (state_programs 1: no narrowing; the backward's
    # kernels_stategrad* below then set state_grad's exactly too); "bf16" narrows them by Config.state_programs
    "programs1": {"state_programs": 1},  # blocks of 64
    "state32": {"state_block_v": 32, "state_programs": 1},
    "state16": {"state_block_v": 16, "state_programs": 1},
    "stages1": {"state_stages": 1},  # no software pipelining of the state kernel's loop
    "stages3": {"state_stages": 3},
    "auto_output": {"output_backend": "auto"},  # the output kernel on Mosaic GPU where it applies (gpu/mosaic.py)
    "solve32": {"solve_block": (16, 32)},  # eda's solve in diagonal blocks of 32 rows, the pair's (default: 16)
    "xla_cumsum": {"cumsum_kernel": False},  # the chunk-local cumulative log-decay by XLA, not the Pallas kernel
}

BACKWARDS = {  # name: None (forward only), or (forms.BACKWARD_KERNELS["gpu"], chunk_bwd.Config fields)
    "fwd": None,
    "xla": (False, {}),
    "kernels": (True, {}),
    "kernels_f32grads": (True, {"low_grads": False}),
    "kernels_score8": (True, {"score_grad_warps": 8}),
    "kernels_key1": (True, {"key_grad_warps": 1}),
    "kernels_key4": (True, {"key_grad_warps": 4}),
    "kernels_products8": (True, {"state_products_warps": 8}),
    "kernels_bk32": (True, {"block_k": 32}),
    "kernels_state8": (True, {"state_grad_warps": 8}),
    "kernels_stategrad32": (True, {"state_grad_block_v": 32}),
    "kernels_stategrad16": (True, {"state_grad_block_v": 16}),
    "kernels_stages1": (True, {"state_grad_stages": 1}),  # no software pipelining of the state_grad kernel's loop
    "kernels_recompute": (True, {}),  # the chunk states recomputed in the backward (rules.recompute_chunk_states)
}


def case_fn(rule, backward, chunk_size=None):
    """A fresh jit of the case: (q, k, v, *gates) -> (o, final_state) for "fwd", else (q, k, v, *gates, do) ->
    (o, the gradients of sum(o * do) w.r.t. q, k, v and the gates), under `backward`'s choice of backward;
    chunk_size: tokens per chunk (None: the rule's default)."""
    call = functools.partial(rules.RULES[rule], impl="pallas", chunk_size=chunk_size)
    if BACKWARDS[backward] is None:
        return jax.jit(call)

    def forward(*inputs):
        recompute = rules.recompute_chunk_states() if backward == "kernels_recompute" else contextlib.nullcontext()
        with recompute:
            return call(*inputs)

    kernels, fields = BACKWARDS[backward]
    forms.BACKWARD_KERNELS["gpu"] = kernels
    chunk_bwd.DEFAULT_CONFIG = chunk_bwd.Config(**fields)

    fwd_bwd = rb.phases(forward)["fwd_bwd"]
    return jax.jit(lambda *args: fwd_bwd(args[:-1], args[-1]))


def with_cotangents(sets, seed=7):
    """Each input set with a random do [B, T, H, V] in v's dtype appended."""
    v = sets[0][2]
    return [(*xs, jax.random.normal(jax.random.key(seed + i), v.shape, v.dtype)) for i, xs in enumerate(sets)]


def fla_times(rule, input_sets, args, phase_name="fwd"):
    """fla's chunk op on input_sets (with do appended for phase_name "fwd_bwd"): the median ms, or None."""
    from experiments.benchmarks import kernels  # noqa: PLC0415  (imports torch)

    ops, _ = kernels.load_fla()
    if isinstance(ops, str) or isinstance(ops.get(rule), str) or rule not in ops:
        return None
    fwd = kernels.fla_fn(ops[rule]["fla_chunk"], rule, False)
    if phase_name == "fwd":
        input_sets = [(*xs, jnp.zeros((), xs[0].dtype)) for xs in input_sets]
    sets = kernels.to_torch([(xs[:-1], xs[-1]) for xs in input_sets])
    ns = argparse.Namespace(warmup=args.warmup, repeats=args.repeats, burst=args.burst, case_budget=float("inf"))
    phase = kernels.torch_phases(fwd)[phase_name]
    return kernels.measure_torch(lambda xs, do: phase(xs, do), sets, ns)["median_ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", nargs="+", default=["gated_delta_rule", "kda", "eda"])
    parser.add_argument("--variants", nargs="+", default=["bf16"], choices=list(VARIANTS))
    parser.add_argument(
        "--shape", type=int, nargs=5, default=(4, 4096, 16, 128, 128), metavar=("B", "T", "H", "K", "V")
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--chunk-size", type=int, help="tokens per chunk (default: the rules', 64 sub-steps; fla keeps its own)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    rb.add_burst_argument(parser)
    parser.add_argument("--input-sets", type=int, default=2)
    parser.add_argument("--backward", nargs="+", default=["fwd"], choices=list(BACKWARDS))
    parser.add_argument("--fla", action="store_true", help="time fla's chunk op too (gated_delta_rule, kda, gdn2)")
    parser.add_argument("--profile", nargs="*", default=[], metavar="RULE:VARIANT")
    parser.add_argument("--out", default="variants.json")
    args = parser.parse_args(argv)
    report = {"device": str(jax.devices()[0]), "shape": args.shape, "dtype": args.dtype, "cases": []}
    report.update(warmup=args.warmup, repeats=args.repeats, burst=args.burst, input_sets=args.input_sets)
    report["chunk_rows"] = rules.CHUNK_ROWS  # the rules' default chunks: 64 sub-steps (rules.chunk_tokens)
    report["chunk_size"] = args.chunk_size
    default_backward = forms.BACKWARD_KERNELS["gpu"]
    timing = argparse.Namespace(warmup=args.warmup, repeats=args.repeats, burst=args.burst, case_budget=float("inf"))
    out_dir = os.path.dirname(os.path.abspath(args.out))

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    for rule in args.rules:
        sets = [
            rb.make_inputs(rule, seed, tuple(args.shape), jnp.dtype(args.dtype))[0] for seed in range(args.input_sets)
        ]
        base = None
        grad_sets = with_cotangents(sets) if any(b != "fwd" for b in args.backward) else None
        for variant, backward in ((v, b) for v in args.variants for b in args.backward):
            name = variant if backward == "fwd" else f"{variant}/{backward}"
            chunk_fwd.DEFAULT_CONFIG = chunk_fwd.Config(**VARIANTS[variant])
            fn = case_fn(rule, backward, args.chunk_size)
            case_sets = sets if backward == "fwd" else grad_sets
            try:
                record = rb.measure(fn, case_sets, timing)
            except Exception as exc:  # noqa: BLE001
                report["cases"].append({"rule": rule, "variant": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
                print(rule, name, "ERROR", str(exc)[:300], flush=True)
                save()
                continue
            median, best = record["median_ms"], record["min_ms"]
            base = base or median
            case = {"rule": rule, "variant": name, **record}
            report["cases"].append(case)
            print(f"{rule:18s} {name:32s} {median:8.3f} ms (min {best:.3f}, x{median / base:.2f} of first)", flush=True)
            if f"{rule}:{name}" in args.profile:
                path = os.path.join(out_dir, f"{rule}-{name.replace('/', '-')}.xplane.pb")
                jax.block_until_ready(fn(*case_sets[0]))  # compiled outside the trace
                trace_to(path, lambda: fn(*case_sets[0]))  # noqa: B023  (called here, within the iteration)
            save()
        chunk_fwd.DEFAULT_CONFIG, chunk_bwd.DEFAULT_CONFIG = chunk_fwd.Config(), chunk_bwd.Config()
        forms.BACKWARD_KERNELS["gpu"] = default_backward
        phases = [("fwd", sets, "fla_chunk")] if "fwd" in args.backward else []
        phases += [("fwd_bwd", grad_sets, "fla_chunk/fwd_bwd")] if grad_sets else []
        for phase, fla_sets, name in phases if args.fla else []:
            try:
                median = fla_times(rule, fla_sets, args, phase)
            except Exception as exc:  # noqa: BLE001
                median, report[f"fla_error_{rule}_{phase}"] = None, f"{type(exc).__name__}: {exc}"[:400]
            if median is not None:
                report["cases"].append({"rule": rule, "variant": name, "median_ms": median})
                print(f"{rule:18s} {name:32s} {median:8.3f} ms", flush=True)
            save()
    print(f"\n{'rule':18s} {'variant':32s} median ms   x fla (fwd, or fwd+bwd for VARIANT/BACKWARD)")
    fla = {(c["rule"], "/" in c["variant"]): c["median_ms"] for c in report["cases"] if "fla_chunk" in c["variant"]}
    for c in report["cases"]:
        if "median_ms" in c:
            key = (c["rule"], "/" in c["variant"])
            ratio = f"{c['median_ms'] / fla[key]:.2f}" if key in fla else "-"
            print(f"{c['rule']:18s} {c['variant']:32s} {c['median_ms']:9.3f}   {ratio}")


if __name__ == "__main__":
    main()
