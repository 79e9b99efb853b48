"""Kernel shoot-out on one GPU: edarnn impl="pallas" and impl="chunk" against flash-linear-attention and cuDNN.

    python -m experiments.benchmarks.kernels --check                 # check at a small shape, then the full sweep
    python -m experiments.benchmarks.kernels --seq-lens 1024 4096    # a part of the sweep
    python -m experiments.benchmarks.kernels --seq-lens 64 128 --tokens-per-batch 256 --heads 2 --key 32 \\
        --value 32 --dtype float32 --repeats 2 --check              # CPU smoke test (Pallas in interpret mode)

Cases, per T in --seq-lens with B = max(1, --tokens-per-batch // T), H, K, V from the flags:
  gated_delta_rule, kda, gdn2, eda   edarnn impl="pallas" and impl="chunk"; fla's chunk_* op (not for eda)
  softmax_attention                  jax.nn.dot_product_attention(is_causal=True), cuDNN on GPU for 16-bit
and decode rows (T = 1, B = --decode-batch, a random [B, H, K, V] float32 initial state): edarnn impl="pallas" (the
token-by-token kernel) and impl="recurrent" (the default of `rules.<rule>_step`) against fla's fused_recurrent_*
op, forward only (fla has no backward for them). A decode row's time is per step of a burst of --decode-steps
steps run back to back as a compiled decoding loop runs them (each step's final state the next one's initial
state, each step on a different token, its output kept): in JAX one jitted `lax.scan`, the state donated, unrolled
by --decode-unroll (default: all steps); for fla the burst captured as a CUDA graph and replayed (eager where
capture fails). One synchronisation per burst (for fla no host launches at all; for JAX, none unrolled, else
XLA's loop condition read on the host every iteration); the note gives the state's bytes read and written per step
over that time (TB/s).

Inputs are `experiments.benchmarks.rules.make_inputs` (q, k, v, e in --dtype, k and e L2-normalised; gates and
log-decays float32); fla gets the same arrays through DLPack. fwd: the rule's output and final state. fwd+bwd: o and the
gradients of sum(o * do) w.r.t. every input, for a fixed random cotangent do (JAX: `jax.vjp`, as the rules benchmark, o
returned so that XLA computes the whole forward; torch: `o.backward(do)`). Times: median (and min, in the JSON) per call
of up to --repeats bursts of --burst calls after --warmup calls, each burst synchronised once (block_until_ready /
torch.cuda.synchronize) and timed on the host clock, cycling through --input-sets input sets (`rb.time_calls`; --burst
1, the default, times each call with its launch and synchronisation latency). Memory: JAX, the compiled executable's
temp + output bytes (XLA memory analysis); torch, torch.cuda.max_memory_allocated() over the timed calls minus what was
allocated before them (the inputs): both are the memory a call needs beyond its inputs.

--check first compares every selected implementation at B=2, T=--check-seq, H<=2 in float32 (XLA's matmuls at
float32 precision; Triton dots, fla's and edarnn's Pallas kernels' on the GPU, take float32 operands as TF32)
against edarnn impl="recurrent", with a random initial state: o, final state and the gradients w.r.t. every
input and the initial state; cuDNN (16-bit only) runs in --dtype against a float32 softmax; fla falls back to
--dtype where it refuses float32. Failures are reported, the sweep still runs, and the exit status is 1; a
refused backward with a matching forward (fla's, below) is reported as "ok*", no failure.

flash-linear-attention 0.6.0 (fla-core 0.6.0 holds every op; flash-linear-attention 0.6.0 adds fla.layers and
fla.models and needs transformers), as read from the wheels' sources:
  fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
      output_final_state=False, use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, ...,
      cu_seqlens=None, ..., chunk_size=64 via **kwargs) -> (o, final_state)
  fla.ops.kda.chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
      use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False, ...,
      safe_gate=False, lower_bound=None, ...) -> (o, final_state)
  fla.ops.gdn2.chunk_gdn2(q, k, v, g, b, w, scale=None, initial_state=None, output_final_state=False,
      use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, ...) -> (o, final_state)   [not re-exported by
      fla.ops; chunk_size must be 64]
  fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule(q, k, v, g=None, gk=None, gv=None, beta=None, ...)
  fla.ops.kda.fused_recurrent_kda(q, k, v, g, beta, A_log=None, dt_bias=None, scale=None, initial_state=None, ...)
  fla.ops.gdn2.fused_recurrent_gdn2(q, k, v, g, b, w, A_log=None, dt_bias=None, scale=None, ...)
      [the fused_recurrent ops are forward only: gated_delta_rule's backward raises NotImplementedError, kda's
      and gdn2's are no autograd functions at all; note A_log sits before scale: pass everything by keyword]
Conventions, all the same as edarnn's (read off fla's naive_recurrent_* references; --check tests them):
  layout [B, T, H, D] ("head_first" was removed; v may have HV > H heads (GVA), not used here); state
  [B, H, K, V] float32 (kda and gdn2 assert a float32 initial_state; state_v_first=False is the default);
  g is the natural-log decay (S <- exp(g) S; fla rescales to log2 internally), [B, T, H] for gated_delta_rule,
  [B, T, H, K] for kda and gdn2 (gdn2 accepts no scalar g, b or w: b [B, T, H, K], w [B, T, H, V]);
  beta is post-sigmoid (use_beta_sigmoid_in_kernel=False); the update is
  S <- Diag(exp g) S;  S <- S + k (w * v - S^T (b * k))^T  with b = w = beta for gated_delta_rule and kda;
  o = scale * q^T S with scale K^-0.5 by default (we pass it explicitly); q, k are not L2-normalised unless
  use_qk_l2norm_in_kernel=True (we pass False; make_inputs normalises k itself, as edarnn's normalize_qk=False).
Known refusal: with Triton >= 3.4 and < 3.7.1 on Hopper, chunk_gated_delta_rule's backward raises RuntimeError
(fla.ops.common.chunk_o.chunk_bwd_dqkwg, fla issue #640) unless tilelang is installed; it becomes an error row.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to torch too

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from edarnn import rules  # noqa: E402
from experiments.benchmarks import rules as rb  # noqa: E402  (the rules benchmark: inputs, timing, machine)

RULES = ("gated_delta_rule", "kda", "gdn2", "eda")
SOFTMAX = rb.SOFTMAX
IMPLS = ("pallas", "chunk", "fla_chunk", "recurrent", "fla_recurrent", "softmax")
FLA_OPS = {  # rule -> (module, chunk op, fused recurrent op); gates go by keyword, named as in rb.INPUTS
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "kda": ("fla.ops.kda", "chunk_kda", "fused_recurrent_kda"),
    "gdn2": ("fla.ops.gdn2", "chunk_gdn2", "fused_recurrent_gdn2"),
}


def load_fla():
    """({rule: {"fla_chunk": op, "fla_recurrent": op} or reason}, versions) or (reason, versions)."""
    try:
        import fla
        import torch
        import triton

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
    except Exception as exc:  # noqa: BLE001
        return f"fla not importable: {type(exc).__name__}: {exc}", {}
    versions = {"torch": torch.__version__, "triton": triton.__version__, "fla": fla.__version__}
    versions["torch_gpu"] = torch.cuda.get_device_name(0)
    ops = {}
    for rule, (module, chunk, recurrent) in FLA_OPS.items():
        try:
            mod = importlib.import_module(module)
            ops[rule] = {"fla_chunk": getattr(mod, chunk), "fla_recurrent": getattr(mod, recurrent)}
        except Exception as exc:  # noqa: BLE001  (a missing op, or a module that fails to import)
            ops[rule] = f"no {module}.{chunk} in this fla: {short(exc)}"
    return ops, versions


def edarnn_fn(rule, impl, chunk_size, with_state):
    """(q, k, v, *gates[, h0]) -> (o, final_state)."""
    if rule == SOFTMAX:
        return rb.forward_fn(rule, impl, chunk_size)
    fn = functools.partial(rules.RULES[rule], impl=impl, chunk_size=chunk_size)
    return (lambda *x: fn(*x[:-1], initial_state=x[-1])) if with_state else fn


def fla_fn(op, rule, with_state):
    """The fla op with edarnn's calling convention: (q, k, v, *gates[, h0]) -> (o, final_state)."""
    gates = [name for name, _ in rb.INPUTS[rule]]

    def fwd(*x):
        h0 = x[-1] if with_state else None
        q, k, v, *g = x[:-1] if with_state else x
        return op(
            q,
            k,
            v,
            **dict(zip(gates, g, strict=True)),
            scale=q.shape[-1] ** -0.5,
            initial_state=h0,
            output_final_state=True,
            use_qk_l2norm_in_kernel=False,
        )

    return fwd


def torch_phases(fwd):
    """As rb.phases, for torch: {'fwd': (inputs, do) -> (o, state), 'fwd_bwd': (inputs, do) -> grads}."""
    import torch

    def forward(inputs, do):
        with torch.no_grad():
            return fwd(*inputs)

    def fwd_bwd(inputs, do):
        o = fwd(*inputs)[0]
        o.backward(do)
        grads = [x.grad for x in inputs]
        for x in inputs:
            x.grad = None
        return [o.detach(), *grads]

    return {"fwd": forward, "fwd_bwd": fwd_bwd}


def to_torch(input_sets):
    """JAX ((inputs, do), ...) -> torch tensors on the same memory (DLPack), inputs requiring grad."""
    import torch

    jax.block_until_ready(input_sets)
    return [(tuple(torch.from_dlpack(x).requires_grad_() for x in xs), torch.from_dlpack(do)) for xs, do in input_sets]


def measure_torch(fn, input_sets, args):
    """rb.measure for torch: warm up, then `rb.time_calls` (args: warmup, repeats, burst, case_budget); peak
    memory beyond the inputs."""
    import torch

    synchronize = lambda _: torch.cuda.synchronize()  # noqa: E731
    for i in range(args.warmup):
        synchronize(fn(*input_sets[i % len(input_sets)]))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    record = rb.time_calls(
        fn, input_sets, synchronize, warmup=0, repeats=args.repeats, burst=args.burst, budget=args.case_budget
    )
    return {**record, "memory_bytes": torch.cuda.max_memory_allocated() - base}


def time_bursts(burst, state, synchronize, state_bytes, args):
    """Per-step device times of a decoding loop: burst(state) runs --decode-steps steps back to back (each step's
    final state the next one's initial state) as one compiled unit; after --warmup bursts, up to --repeats
    synchronised bursts are timed. Returns the median and min per step and the state traffic the median implies
    (read and written once per step: 2 state_bytes)."""
    for _ in range(args.warmup):
        state = burst(state)
    synchronize(state)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state = burst(state)
        synchronize(state)
        times.append((time.perf_counter() - start) / args.decode_steps)
        if sum(times) * args.decode_steps > args.case_budget and len(times) >= 3:
            break
    median = statistics.median(times)
    return {
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(times),
        "repeats": len(times),
        "steps_per_burst": args.decode_steps,
        "state_tb_per_s": 2 * state_bytes / median / 1e12,
    }


def measure_decode(fn, input_sets, args):
    """time_bursts for fn(q, k, v, *gates, h0) -> (o, state) in JAX: the burst is one jitted `rb.decode_loop` over
    the steps (as a jitted generation loop runs), unrolled by --decode-unroll (0: all steps), each step on its own
    token (`rb.token_steps`), its output kept, the state donated."""
    (inputs, _), *_ = input_sets
    tokens, state = rb.token_steps(inputs[:-1], args.decode_steps), jnp.array(inputs[-1])  # a copy: bursts donate it
    unroll = rb.burst_unroll(args.decode_unroll, args.decode_steps)
    burst = rb.decode_loop(lambda s, token: fn(*token, s), unroll=unroll)
    compiled = jax.jit(burst, donate_argnums=1).lower(tokens, state).compile()
    record = time_bursts(lambda s: compiled(tokens, s)[0], state, jax.block_until_ready, state.nbytes, args)
    return {**record, "loop": f"jit scan, unroll {unroll}"}


def measure_decode_torch(fn, input_sets, args):
    """time_bursts for fla's op (fn as `fla_fn` makes it), each step on its own token (`rb.token_steps`, shared
    through DLPack): the burst captured once as a CUDA graph and replayed (no host launch cost, as a serving
    engine runs it; each replay restarts from the captured initial state), or, where capture fails, run eagerly
    (the record says which)."""
    import torch

    (inputs, _), *_ = input_sets
    stacked = rb.token_steps([jnp.from_dlpack(x.detach()) for x in inputs[:-1]], args.decode_steps)
    jax.block_until_ready(stacked)
    tokens, state = [torch.from_dlpack(x) for x in stacked], inputs[-1].detach().clone()

    def steps(s):
        with torch.no_grad():
            for i in range(args.decode_steps):
                s = fn(*(x[i] for x in tokens), s)[1]
        return s

    nbytes = state.numel() * state.element_size()
    synchronize = lambda _: torch.cuda.synchronize()  # noqa: E731
    steps(state)  # compiles (and autotunes) fla's kernels outside the capture
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            steps(state)
    except Exception as exc:  # noqa: BLE001  (an op that cannot be captured)
        torch.cuda.synchronize()
        return {**time_bursts(steps, state, synchronize, nbytes, args), "loop": f"eager ({short(exc)})"}

    def replay(s):
        graph.replay()
        return s

    return {**time_bursts(replay, state, synchronize, nbytes, args), "loop": "CUDA graph"}


def short(exc):
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:240]}"


def run_case(phases, measure, input_sets, args, names):
    """{phase: timing record or {'error': ...}} for the phases named."""
    record = {}
    for name in names:
        try:
            record[name] = measure(phases[name], input_sets, args)
        except Exception as exc:  # noqa: BLE001  (out of memory, refusals, ...): a row with the error
            record[name] = {"error": short(exc)}
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()
        if "temp_bytes" in record[name]:  # JAX: what the call needs beyond its inputs
            record[name]["memory_bytes"] = record[name]["temp_bytes"] + record[name]["output_bytes"]
    return record


def family(impl):
    return "fla" if impl.startswith("fla") else "cudnn" if impl == "cudnn" else "edarnn"


def plan(rule, args, fla, decode):
    """[(impl, skip reason or None)] for one rule at the training shapes or (decode=True) the decode shape."""
    if rule == SOFTMAX:
        return [] if decode or "softmax" not in args.impls else [(rb.softmax_implementation(args.dtype), None)]
    own = ("pallas", "recurrent") if decode else ("pallas", "chunk")
    cases = [(impl, None) for impl in own if impl in args.impls]
    peer = "fla_recurrent" if decode else "fla_chunk"
    if rule in FLA_OPS and peer in args.impls:
        reason = fla if isinstance(fla, str) else fla[rule] if isinstance(fla[rule], str) else None
        cases.append((peer, reason))
    return cases


def with_state(input_sets, seed=99):
    """Append a random float32 [B, H, K, V] initial state to each input set."""
    out = []
    for i, (xs, do) in enumerate(input_sets):
        (b, _, h, k), v = xs[0].shape, xs[2].shape[-1]
        out.append(((*xs, 0.1 * jax.random.normal(jax.random.key(seed + i), (b, h, k, v))), do))
    return out


def tolerance(impl, dtype):
    """Relative error allowed at --check: XLA in float32 1e-3; Triton dots (edarnn's Pallas kernels on the GPU
    and fla) take float32 operands as TF32 by default, 1e-2; 16-bit inputs 3e-2."""
    return 3e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-2 if impl == "pallas" or family(impl) == "fla" else 1e-3


def to_16bit(sets, dtype):
    """q, k, v and do in `dtype` (16-bit); gates and the initial state stay float32."""
    return [((*(x.astype(dtype) for x in xs[:3]), *xs[3:]), do.astype(dtype)) for xs, do in sets]


def check(args, fla):
    """{(rule, impl): {"dtype": inputs' dtype, "errors": {output: relative error}} or {"error": message}},
    against edarnn impl="recurrent" (a float32 softmax for softmax_attention) on float32 inputs."""
    shape = (2, args.check_seq, min(args.heads, 2), args.key, args.value)
    results = {}
    with jax.default_matmul_precision("float32"):
        for rule in args.rules:
            state = rule != SOFTMAX
            sets = [rb.make_inputs(rule, 1234, shape, jnp.float32)]
            sets = with_state(sets) if state else sets
            names = ["q", "k", "v", *(n for n, _ in rb.INPUTS[rule]), *(["h0"] if state else [])]
            labels = {"fwd": ["o", "state"] if state else ["o"], "fwd_bwd": ["o", *(f"d{n}" for n in names)]}
            ref_fn = rb.reference_fn(rule) if rule == SOFTMAX else edarnn_fn(rule, "recurrent", 64, True)
            want = None
            for impl, reason in plan(rule, args, fla, False) + plan(rule, args, fla, True):
                if reason is not None or impl == "recurrent":
                    continue
                try:
                    if want is None:
                        want = {p: jax.tree.leaves(jax.jit(f)(*sets[0])) for p, f in rb.phases(ref_fn).items()}
                    got, dtype = check_one(rule, impl, sets, args, fla)
                    errors = {
                        name: rb.relative_error(a, b)
                        for p in got
                        if not isinstance(got[p], str)
                        for name, a, b in zip(labels[p], got[p], want[p], strict=True)
                    }
                    refused = "; ".join(m for m in got.values() if isinstance(m, str))
                    results[(rule, impl)] = {
                        "dtype": dtype,
                        "errors": errors,
                        **({"error": refused} if refused else {}),
                    }
                except Exception as exc:  # noqa: BLE001
                    results[(rule, impl)] = {"error": short(exc)}
    return shape, results


def check_one(rule, impl, sets, args, fla):
    """({'fwd': [arrays], 'fwd_bwd': [arrays]}, inputs' dtype) of one implementation at the check shape: float32
    inputs, or --dtype for cuDNN (16-bit only) and for fla where its kernels refuse float32."""
    if family(impl) != "fla":
        dtype = args.dtype if impl == "cudnn" else jnp.float32
        sets = to_16bit(sets, dtype) if impl == "cudnn" else sets
        phases = rb.phases(edarnn_fn(rule, impl, args.chunk_size, rule != SOFTMAX))
        return {p: jax.tree.leaves(jax.jit(f)(*sets[0])) for p, f in phases.items()}, jnp.dtype(dtype).name
    phases = torch_phases(fla_fn(fla[rule][impl], rule, True))
    wanted = ("fwd", "fwd_bwd") if impl == "fla_chunk" else ("fwd",)

    def run(sets):  # a refused backward (a message in place of the arrays) keeps the forward's comparison
        (inputs, do), *_ = to_torch(sets)
        host = lambda ts: [np.nan if t is None else t.detach().float().cpu().numpy() for t in ts]  # noqa: E731
        got = {}
        for p in wanted:
            try:
                got[p] = host(phases[p](tuple(x.detach().clone().requires_grad_() for x in inputs), do))
            except Exception as exc:
                if p == "fwd":
                    raise
                got[p] = f"{p}: {short(exc)}"
        return got

    try:
        return run(sets), "float32"
    except Exception as exc:
        if jnp.dtype(args.dtype).itemsize != 2:
            raise
        return run(to_16bit(sets, args.dtype)), f"{args.dtype.name} (float32 refused: {short(exc)})"


COLUMNS = (
    ("rule", 17),
    ("impl", 14),
    ("T", 6),
    ("B", 5),
    ("fwd ms", 9),
    ("fwd+bwd ms", 11),
    ("fwd MiB", 8),
    ("f+b MiB", 8),
    ("check", 8),
    ("note", 0),
)


def print_row(case=None):
    """One table line (the header when no case)."""
    if case is None:
        cells = [name for name, _ in COLUMNS]
    else:
        phase = lambda name: case.get(name) or {}  # noqa: E731
        ms = lambda r: f"{r['median_ms']:.3f}" if "median_ms" in r else ("error" if r else "")  # noqa: E731
        mib = lambda r: f"{r['memory_bytes'] / 2**20:.0f}" if "memory_bytes" in r else ""  # noqa: E731
        err, status = case.get("check_error"), case.get("check_status")
        note = rb.case_note(case)
        if "state_tb_per_s" in phase("fwd"):
            decode = phase("fwd")
            note = "; ".join(filter(None, [f"state {decode['state_tb_per_s']:.2f} TB/s, {decode['loop']}", note]))
        cells = [
            case["rule"],
            case["impl"],
            case["T"],
            case["B"],
            ms(phase("fwd")),
            ms(phase("fwd_bwd")),
            mib(phase("fwd")),
            mib(phase("fwd_bwd")),
            "" if err is None else f"{err:.1e}" + {"ok": "", "ok*": "*"}.get(status, "!"),
            note,
        ]
    rb.print_cells(cells, COLUMNS)


def plot(cases, path):
    """fwd+bwd ms against T, one panel per rule, one line per implementation (softmax dashed in each panel)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# no plot: matplotlib is not importable (would have written {path})")
        return
    series = {}
    for c in cases:
        if c["T"] > 1 and "median_ms" in (c.get("fwd_bwd") or {}):
            series.setdefault(c["rule"], {}).setdefault(c["impl"], []).append((c["T"], c["fwd_bwd"]["median_ms"]))
    panels = [r for r in series if r != SOFTMAX]
    if not panels:
        print("# no plot: no fwd+bwd timings")
        return
    softmax = {f"softmax ({impl})": points for impl, points in series.get(SOFTMAX, {}).items()}
    colors = {}  # one colour per implementation across the panels
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, rule in zip(axes[0], panels, strict=True):
        for impl, points in {**series[rule], **softmax}.items():
            color = colors.setdefault(impl, f"C{len(colors)}")
            style = "--" if impl.startswith("softmax") else "-o"
            ax.plot(*zip(*points, strict=True), style, color=color, label=impl)
        ax.set(title=rule, xlabel="T (B = tokens per batch / T)", ylabel="fwd+bwd ms", yscale="log")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seq-lens", type=int, nargs="*", default=[1024, 4096, 16384, 65536], help="none: the decode rows only"
    )
    p.add_argument("--tokens-per-batch", type=int, default=16384, help="B = max(1, this // T)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--key", type=int, default=128)
    p.add_argument("--value", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument(
        "--chunk-size", type=int, help="edarnn's; default: 64 sub-steps (32 tokens for eda), fla's ops use 64"
    )
    p.add_argument("--rules", nargs="+", default=[*RULES, SOFTMAX], choices=[*RULES, SOFTMAX])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="default: all")
    p.add_argument("--decode-batch", type=int, default=64, help="B of the T=1 decode rows; 0: none")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps per timed burst (a decode row)")
    p.add_argument(
        "--decode-unroll",
        type=int,
        default=0,
        help="unroll of the JAX decode burst's scan (0: all steps, no host round trip between steps, as fla's CUDA "
        "graph; 1: XLA's loop, its condition on the host every step)",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    rb.add_burst_argument(p)
    p.add_argument("--input-sets", type=int, default=3)
    p.add_argument("--case-budget", type=float, default=10.0, help="seconds of timed calls per phase (>= 3 calls)")
    p.add_argument("--check", action="store_true", help="compare every implementation with impl='recurrent' first")
    p.add_argument("--check-seq", type=int, default=256, help="T of the --check shape")
    p.add_argument("--out", default="kernels.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args(argv)
    if args.decode_steps < 1:
        p.error(f"--decode-steps must be >= 1; got {args.decode_steps}")
    try:
        rb.burst_unroll(args.decode_unroll, args.decode_steps)
    except ValueError as exc:
        p.error(f"--decode-unroll: {exc}")
    args.dtype = jnp.dtype(args.dtype)
    args.plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    return args


def main(argv=None):
    args = parse_args(argv)
    fla, versions = load_fla() if {"fla_chunk", "fla_recurrent"} & set(args.impls) else ("not selected", {})
    info = {**rb.machine(), "gpu": versions.get("torch_gpu", jax.devices()[0].device_kind), **versions}
    config = {k: v for k, v in vars(args).items() if k not in ("dtype",)} | {"dtype": args.dtype.name}
    config["chunk_rows_default"] = rules.CHUNK_ROWS  # chunk_size None: 64 sub-steps (rules.chunk_tokens)
    fla_state = fla if isinstance(fla, str) else {r: op if isinstance(op, str) else "ok" for r, op in fla.items()}
    report = {"machine": info, "config": config, "fla": fla_state, "cases": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    print(
        f"# {info['backend']} / {info['gpu']}; jax {info['jax']}; torch {info.get('torch')}, "
        f"triton {info.get('triton')}, fla {info.get('fla')}" + (f" ({fla})" if isinstance(fla, str) else "")
    )
    timing = f"{args.repeats} calls" if args.burst == 1 else f"{args.repeats} bursts of {args.burst} calls, per call"
    print(
        f"# H={args.heads} K={args.key} V={args.value} {args.dtype.name}, gates f32, edarnn chunk "
        f"{args.chunk_size or 'default'}; median ms of up to {timing}; MiB beyond the inputs; check: the "
        "largest relative error at --check (! = over its tolerance or nothing compared, * = a phase refused)"
    )

    check_errors, failed = {}, []
    if args.check:
        start = time.perf_counter()
        shape, results = check(args, fla)
        print(
            f"# check at B,T,H,K,V = {shape} against impl='recurrent' in float32 "
            f"({time.perf_counter() - start:.0f} s): relative errors, inputs' dtype"
        )
        for (rule, impl), result in results.items():
            errors = result.get("errors", {})
            worst = max(errors.values(), default=float("nan"))
            tol = tolerance(impl, result.get("dtype", "float32").split()[0])
            ok = bool(errors) and worst <= tol  # a refused backward alone (fla's, see above) is no failure
            status = "FAIL" if not ok else "ok*" if "error" in result else "ok"
            check_errors[(rule, impl)], failed = (worst, status), failed + ([] if ok else [f"{rule}/{impl}"])
            detail = " ".join([*(f"{k} {v:.1e}" for k, v in errors.items()), result.get("error", "")])
            dtype = result.get("dtype", "")
            print(f"#   {rule:<17} {impl:<14} {status:<4} (tol {tol:g}) {dtype}: {detail}")
            result.update(tolerance=tol, status=status)
        report["check"] = {
            "shape": shape,
            "failed": failed,
            "results": {f"{r}/{i}": v for (r, i), v in results.items()},
        }

    print_row()
    shapes = [((max(1, args.tokens_per_batch // t), t), False) for t in args.seq_lens]
    shapes += [((args.decode_batch, 1), True)] if args.decode_batch > 0 else []
    start = time.perf_counter()
    for (batch, length), decode in shapes:
        for rule in args.rules:
            cases = plan(rule, args, fla, decode)
            if not cases:
                continue
            shape = (batch, length, args.heads, args.key, args.value)
            sets = [rb.make_inputs(rule, seed, shape, args.dtype) for seed in range(args.input_sets)]
            sets = with_state(sets) if decode else sets
            phases_wanted = ("fwd",) if decode else ("fwd", "fwd_bwd")
            for impl, reason in cases:
                case = {"rule": rule, "impl": impl, "T": length, "B": batch}
                if reason is not None:
                    case["skipped"] = reason
                elif family(impl) == "fla":
                    torch_sets = to_torch(sets)
                    fn = fla_fn(fla[rule][impl], rule, decode)
                    phases, measure = (
                        ({"fwd": fn}, measure_decode_torch) if decode else (torch_phases(fn), measure_torch)
                    )
                    case.update(run_case(phases, measure, torch_sets, args, phases_wanted))
                    del torch_sets
                else:
                    fn = edarnn_fn(rule, impl, args.chunk_size, decode)
                    phases, measure = ({"fwd": fn}, measure_decode) if decode else (rb.phases(fn), rb.measure)
                    case.update(run_case(phases, measure, sets, args, phases_wanted))
                if (rule, impl) in check_errors:
                    case["check_error"], case["check_status"] = check_errors[(rule, impl)]
                report["cases"].append(case)
                print_row(case)
                save()  # after every case: an interrupted run keeps what it measured
    print(f"# {len(report['cases'])} cases in {time.perf_counter() - start:.0f} s; wrote {args.out}")
    plot(report["cases"], args.plot)
    if failed:
        print(f"CHECK FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
