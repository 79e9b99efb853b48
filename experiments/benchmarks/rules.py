"""Time every update rule of `edarnn.rules` in each of its forms, forward and forward+backward.

    python -m experiments.benchmarks.rules                       # full shape, default backend
    python -m experiments.benchmarks.rules --seq 1024 --check    # verify against impl="recurrent" first

Each case is a (rule, impl) pair. Besides the seven rules there are two peers: `common_style_gdn` (the chunked
gated delta rule as plain-JAX ports commonly write it, see common_style_gdn.py; the baseline the ratio columns
divide by) and `softmax_attention` (`jax.nn.dot_product_attention`, causal; cuDNN on GPU for 16-bit inputs).

Forward is the jitted rule (output and final state); fwd+bwd is the output o and the gradients of sum(o * do) with a
fixed random cotangent `do`, w.r.t. every input (`jax.vjp`: o is returned, so the forward is all computed). Functions
are compiled ahead of time; warm-up calls are not timed; each timed call cycles through --input-sets different random
inputs. Times are medians and minima per call over --repeats bursts of --burst calls (`time_calls`: launched back to
back, synchronised once; 1, the default, times each call with its launch and synchronisation latency), cut short once a
phase has spent --case-budget seconds (the number actually run is recorded).

Memory: `temp MiB` is the compiled fwd+bwd executable's scratch size (XLA memory analysis, per case). The
device's `peak_bytes_in_use` is recorded too where the backend reports it; JAX cannot reset it, so it is the
cumulative peak of the whole run up to that case.

--check first runs every selected case at a small float32 shape and compares its output (o and final state)
and its gradients with impl="recurrent" (a float32 softmax for softmax_attention), matmuls at float32
precision; it exits with status 1 if any relative error (‖a − b‖ / ‖b‖) exceeds 1e-3.
"""

import argparse
import functools
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from edarnn import rules
from experiments.benchmarks.common_style_gdn import chunk_gated_delta_rule_common

BASELINE = "common_style_gdn"
SOFTMAX = "softmax_attention"
ALL_RULES = (*rules.RULES, BASELINE, SOFTMAX)
DELTA_FAMILY = {"delta_rule", "gated_delta_rule", "kda", "gdn2", "eda"}
CHECK_TOL = 1e-3
MAX_RECURRENT_T = 1024  # longer sequences leave impl="recurrent" out unless --impls names it
MAX_SCAN_BYTES = 2 * 2**30  # skip impl="scan" when its per-token [B, T, H, K, K or V] array would be larger

# The inputs after (q, k, v) of each rule, in call order. Letters give the shape; the kind the distribution.
INPUTS = {
    "linear_attention": (),
    "gla": (("g", "BTHK"),),  # channel-wise decay (GLA proper)
    "delta_rule": (("beta", "BTH"),),
    "gated_delta_rule": (("g", "BTH"), ("beta", "BTH")),
    "kda": (("g", "BTHK"), ("beta", "BTH")),
    "gdn2": (("g", "BTHK"), ("b", "BTHK"), ("w", "BTHV")),
    "eda": (("e", "BTHK"), ("g", "BTHK"), ("beta", "BTH"), ("gamma", "BTH")),
    BASELINE: (("g", "BTH"), ("beta", "BTH")),
    SOFTMAX: (),
}


def _l2_normalize(t):
    return t * jax.lax.rsqrt(jnp.sum(t * t, axis=-1, keepdims=True) + 1e-6)


def token_steps(tokens, steps):
    """Each step's token inputs, stacked: [steps, B, ...] per input of tokens ([B, ...] each); step i takes the
    batch rolled by i (every step a different token, as in decoding, so that no step's work is loop-invariant)."""
    return [jnp.stack([jnp.roll(x, i, axis=0) for i in range(steps)]) for x in tokens]


def burst_unroll(unroll: int, steps: int) -> int:
    """The scan unroll of a decoding burst of `steps` steps asked for as `unroll` (0: all steps), at most steps."""
    if unroll < 0:
        raise ValueError(f"the decode unroll must be >= 0 (0: all steps); got {unroll}")
    return min(unroll or steps, steps)


def decode_loop(step, unroll=1):
    """A decoding loop (tokens, state) -> (final state, outputs stacked): step(state, token) -> (o, state) applied
    to each step's token of `token_steps` in a `lax.scan`, every output kept. unroll: the scan's (an int, or True
    for all steps). XLA runs a GPU loop's condition on the host, a round trip per iteration (JAX issue 2491; the
    likely cause of the 11 µs of gaps a step in session 11's decode trace, not yet measured apart); a fully
    unrolled scan compiles to no loop, its steps back to back, as a CUDA graph of the steps runs them."""

    def loop(tokens, state):
        def one(s, token):
            o, s = step(s, token)
            return s, o

        return jax.lax.scan(one, state, tokens, unroll=unroll)

    return loop


def make_inputs(rule, seed, shape, dtype):
    """((q, k, v, *gates), do) of random data. q, k, v, e and do in `dtype`; gates and log-decays float32."""
    dims = dict(zip("BTHKV", shape, strict=True))
    keys = iter(jax.random.split(jax.random.key(seed), 12))
    normal = lambda letters: jax.random.normal(next(keys), tuple(dims[c] for c in letters))  # noqa: E731
    draw = {
        "g": lambda s: jnp.maximum(-0.5 * jax.nn.softplus(normal(s)), -5.0),  # log-decay, mean -0.4, >= -5
        "e": lambda s: _l2_normalize(normal(s)).astype(dtype),
        "beta": lambda s: jax.nn.sigmoid(normal(s)),  # every other gate (b, w, gamma) too
    }
    q = normal("BTHK").astype(dtype)
    k = _l2_normalize(normal("BTHK")).astype(dtype)
    v = normal("BTHV").astype(dtype)
    gates = tuple(draw.get(name, draw["beta"])(letters) for name, letters in INPUTS[rule])
    return (q, k, v, *gates), normal("BTHV").astype(dtype)


def softmax_implementation(dtype):
    return "cudnn" if jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 else "xla"


def forward_fn(rule, impl, chunk_size):
    """(q, k, v, *gates) -> o or (o, final_state)."""
    if rule == BASELINE:
        return functools.partial(chunk_gated_delta_rule_common, chunk_size=chunk_size or rules.CHUNK_ROWS)
    if rule == SOFTMAX:
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return functools.partial(rules.RULES[rule], impl=impl, chunk_size=chunk_size)


def reference_fn(rule):
    """What --check compares `rule` with: impl="recurrent", or a plain float32 softmax attention."""
    if rule == SOFTMAX:

        def softmax_attention(q, k, v):
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
            s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
            return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

        return softmax_attention
    return functools.partial(rules.RULES["gated_delta_rule" if rule == BASELINE else rule], impl="recurrent")


def phases(fwd):
    """{'fwd': (inputs, do) -> outputs, 'fwd_bwd': (inputs, do) -> (o, d sum(o * do) / d inputs)}. fwd_bwd returns
    o so that its forward is live, as in training, where o feeds the next layer: returning the gradients alone let
    XLA drop the forward's output (and, where the backward recomputes, the whole forward; before session 14)."""
    output = lambda inputs: (lambda out: out[0] if isinstance(out, tuple) else out)(fwd(*inputs))  # noqa: E731

    def fwd_bwd(inputs, do):
        o, pullback = jax.vjp(output, inputs)
        return o, pullback(do.astype(o.dtype))[0]

    return {"fwd": lambda inputs, do: fwd(*inputs), "fwd_bwd": fwd_bwd}


def plan(args):
    """[(rule, impl, skip reason or None)]; the baseline first, so that every later row can show its ratio."""
    batch, length, heads, key, value = args.shape
    cases = []
    for rule in sorted(args.rules, key=lambda r: r != BASELINE):
        if rule == BASELINE:
            cases.append((rule, "common", None))
            continue
        if rule == SOFTMAX:
            cases.append((rule, softmax_implementation(args.dtype), None))
            continue
        for impl in args.impls or ("chunk", "recurrent"):
            reason = None
            if impl == "recurrent" and args.impls is None and length > MAX_RECURRENT_T:
                reason = f"T > {MAX_RECURRENT_T} is slow token by token; pass --impls recurrent to force"
            if impl == "scan":
                width = max(key, value) if rule in DELTA_FAMILY else value
                size = batch * length * heads * key * width * 4
                if size > MAX_SCAN_BYTES:
                    reason = f"scan would materialise [B,T,H,{key},{width}] f32 = {size / 2**30:.1f} GiB"
            cases.append((rule, impl, reason))
    return cases


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(cases, args):
    """Compare each case with its reference at a small float32 shape: {(rule, impl): max relative error}."""
    shape = (1, 4 * (args.chunk_size or rules.CHUNK_ROWS), min(args.shape[2], 2), args.shape[3], args.shape[4])
    errors, references = {}, {}
    run_all = lambda fwd, inputs: {n: jax.jit(f)(*inputs) for n, f in phases(fwd).items()}  # noqa: E731
    with jax.default_matmul_precision("float32"):
        for rule, impl, reason in cases:
            if reason is not None:
                continue
            inputs = make_inputs(rule, 1234, shape, jnp.float32)
            try:
                if rule not in references:
                    references[rule] = run_all(reference_fn(rule), inputs)
                want = references[rule]
                impl_here = "xla" if rule == SOFTMAX else impl  # cuDNN takes no float32
                got = run_all(forward_fn(rule, impl_here, args.chunk_size), inputs)
                pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
                errors[(rule, impl)] = max(relative_error(a, b) for a, b in pairs)
            except Exception as exc:  # noqa: BLE001
                errors[(rule, impl)] = float("nan")
                print(f"check {rule}/{impl}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
    return shape, errors


def time_calls(call, input_sets, synchronize, *, warmup, repeats, burst=1, budget=float("inf")):
    """Host-clock time per call of call(*inputs), cycling through input_sets: `warmup` calls, then up to `repeats`
    bursts of `burst` calls launched back to back and synchronised once (synchronize(last result) waits for the
    device), stopped once `budget` seconds of bursts are spent (at least 3 bursts). burst 1 times every call
    with its launch and synchronisation latency; longer bursts overlap the host's launch of each call with the
    device's work on the ones before, as a training loop runs them (session 12, H200: a synchronised kda forward
    took 1.82-1.98 ms on the host clock for 1.475 ms of kernels). Returns {median_ms, min_ms, repeats, burst},
    per call."""
    for i in range(warmup):
        synchronize(call(*input_sets[i % len(input_sets)]))
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        for c in range(burst):
            result = call(*input_sets[(warmup + r * burst + c) % len(input_sets)])
        synchronize(result)
        times.append((time.perf_counter() - start) / burst)
        if sum(times) * burst > budget and len(times) >= 3:
            break
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "repeats": len(times),
        "burst": burst,
    }


def add_burst_argument(parser):
    """--burst, the calls per timed burst of `time_calls` (the benchmarks share it)."""

    def at_least_one(text):
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
        return int(text)

    help_ = "calls per timed burst, launched back to back and synchronised once (1: each call synchronised)"
    parser.add_argument("--burst", type=at_least_one, default=1, help=help_)


def measure(fn, input_sets, args):
    """Compile `fn` for the inputs, then `time_calls` (args: warmup, repeats, burst, case_budget)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*input_sets[0]).compile()
    result = {"compile_s": round(time.perf_counter() - start, 2)}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        result["temp_bytes"] = int(analysis.temp_size_in_bytes)
        result["output_bytes"] = int(analysis.output_size_in_bytes)
    result.update(
        time_calls(
            compiled,
            input_sets,
            jax.block_until_ready,
            warmup=args.warmup,
            repeats=args.repeats,
            burst=args.burst,
            budget=args.case_budget,
        )
    )
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["cumulative_peak_bytes"] = int(stats["peak_bytes_in_use"])
    return result


def run_case(rule, impl, args):
    shape, record = tuple(args.shape), {}
    input_sets = [make_inputs(rule, seed, shape, args.dtype) for seed in range(args.input_sets)]
    for name, fn in phases(forward_fn(rule, impl, args.chunk_size)).items():
        try:
            record[name] = measure(fn, input_sets, args)
        except Exception as exc:  # noqa: BLE001  (out of memory, unsupported shape, ...): report, go on
            record[name] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
    return record


COLUMNS = (
    ("rule", 18),
    ("impl", 9),
    ("fwd ms", 17),
    ("fwd+bwd ms", 17),
    ("fwd x", 7),
    ("f+b x", 7),
    ("temp MiB", 9),
    ("check", 8),
    ("note", 0),
)


def case_note(case) -> str:
    """The note column of a case record: why it was skipped, or the errors of its phases."""
    if "skipped" in case:
        return f"skipped ({case['skipped']})"
    return "; ".join(
        f"{name}: {case[name]['error']}" for name in ("fwd", "fwd_bwd") if "error" in (case.get(name) or {})
    )


def print_cells(cells, columns):
    """One left-aligned table line: cells in columns of (name, width)."""
    print(" ".join(f"{c!s:<{w}}" for c, (_, w) in zip(cells, columns, strict=True)).rstrip(), flush=True)


def print_row(case=None):
    """One table line for a case record (the header when none)."""
    if case is None:
        cells = [name for name, _ in COLUMNS]
    else:
        phase = lambda name: case.get(name) or {}  # noqa: E731
        ms = lambda r: f"{r['median_ms']:.2f} ({r['min_ms']:.2f})" if "median_ms" in r else "error" * bool(r)  # noqa: E731
        ratio = lambda name: f"{case[name]:.2f}" if case.get(name) else ""  # noqa: E731
        temp, err = phase("fwd_bwd").get("temp_bytes"), case.get("check_error")
        note = case_note(case)
        cells = [
            case["rule"],
            case["impl"],
            ms(phase("fwd")),
            ms(phase("fwd_bwd")),
            ratio("ratio_fwd"),
            ratio("ratio_fwd_bwd"),
            "" if temp is None else f"{temp / 2**20:.0f}",
            "" if err is None else f"{err:.1e}",
            note,
        ]
    print_cells(cells, COLUMNS)


def machine():
    import jaxlib

    try:
        import flax

        flax_version = flax.__version__
    except ImportError:
        flax_version = None
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("batch", 4), ("seq", 4096), ("heads", 16), ("key", 128), ("value", 128)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--chunk-size", type=int, help="default: 64 sub-steps (32 tokens for eda; 64 for the baseline)")
    p.add_argument(
        "--rules",
        nargs="+",
        default=list(ALL_RULES),
        choices=ALL_RULES,
        metavar="RULE",
        help=f"any of {', '.join(ALL_RULES)} (default: all)",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=None,
        choices=("chunk", "recurrent", "scan"),
        help=f"forms of the edarnn rules (default: chunk; recurrent if T <= {MAX_RECURRENT_T})",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    add_burst_argument(p)
    p.add_argument("--input-sets", type=int, default=3, help="random input sets timed calls cycle through")
    p.add_argument(
        "--case-budget",
        type=float,
        default=10.0,
        help="stop repeating a phase after this many seconds of timed calls (at least 3 calls)",
    )
    p.add_argument(
        "--matmul-precision",
        default=None,
        choices=("default", "high", "highest", "bfloat16", "tensorfloat32", "float32"),
        help="jax.default_matmul_precision of the timed runs (default: the backend's default, "
        "TF32 for float32 matmuls on recent NVIDIA GPUs)",
    )
    p.add_argument("--check", action="store_true", help="verify every case against impl='recurrent' first")
    p.add_argument("--out", default="results.json")
    args = p.parse_args(argv)
    args.shape = (args.batch, args.seq, args.heads, args.key, args.value)
    args.dtype = jnp.dtype(args.dtype)
    return args


def main(argv=None):
    args = parse_args(argv)
    info, cases = machine(), plan(args)
    config = {
        "shape": dict(zip(("batch", "seq", "heads", "key", "value"), args.shape, strict=True)),
        "dtype": args.dtype.name,
        "gate_dtype": "float32",
        "chunk_size": args.chunk_size,  # None: CHUNK_ROWS sub-steps per chunk (rules.chunk_tokens)
        "chunk_rows_default": rules.CHUNK_ROWS,
        "repeats": args.repeats,
        "burst": args.burst,
        "warmup": args.warmup,
        "input_sets": args.input_sets,
        "case_budget_s": args.case_budget,
        "matmul_precision": args.matmul_precision,
    }
    report = {"machine": info, "config": config, "notes": NOTES, "cases": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    print(
        f"# {info['backend']} / {info['device_kind']}; jax {info['jax']}, jaxlib {info['jaxlib']}, "
        f"flax {info['flax']}, python {info['python']}"
    )
    print(
        f"# B,T,H,K,V = {args.shape}, {args.dtype.name}, chunk {args.chunk_size or 'default'}; "
        f"median (min) ms per call of up to {args.repeats} bursts of {args.burst}; x = time / {BASELINE}'s"
    )

    check_errors = {}
    if args.check:
        start = time.perf_counter()
        shape, check_errors = check(cases, args)
        failed = {f"{r}/{i}": e for (r, i), e in check_errors.items() if not e <= CHECK_TOL}
        report["check"] = {
            "shape": shape,
            "tolerance": CHECK_TOL,
            "failed": failed,
            "errors": {f"{r}/{i}": e for (r, i), e in check_errors.items()},
        }
        passed = f"{len(check_errors) - len(failed)}/{len(check_errors)}"
        print(
            f"# check at B,T,H,K,V = {shape}, float32: {passed} within {CHECK_TOL:g} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        if failed:
            save()
            for name, err in failed.items():
                print(f"CHECK FAILED: {name}: relative error {err:.3e} > {CHECK_TOL:g}", file=sys.stderr)
            sys.exit(1)

    print_row()
    baseline, start = {}, time.perf_counter()
    for rule, impl, reason in cases:
        case = {"rule": rule, "impl": impl}
        if reason is not None:
            case["skipped"] = reason
        else:
            with jax.default_matmul_precision(args.matmul_precision):
                case.update(run_case(rule, impl, args))
            if (rule, impl) in check_errors:
                case["check_error"] = check_errors[(rule, impl)]
            for name in ("fwd", "fwd_bwd"):
                median = case[name].get("median_ms")
                if rule == BASELINE and median:
                    baseline[name] = median
                if median and name in baseline:
                    case[f"ratio_{name}"] = median / baseline[name]
        report["cases"].append(case)
        print_row(case)
        save()  # after every case, so that an interrupted run keeps what it measured
    print(f"# {len(cases)} cases in {time.perf_counter() - start:.0f} s; wrote {args.out}")


NOTES = (
    "times in ms; temp_bytes: XLA's scratch size of the compiled executable; cumulative_peak_bytes: the "
    "device's peak_bytes_in_use since the process started (JAX cannot reset it between cases)"
)

if __name__ == "__main__":
    main()
