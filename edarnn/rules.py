"""The public functional API: one function per update rule, all with one calling convention.

    o, final_state = rules.<rule>(q, k, v, <gates...>, *, scale=None, initial_state=None, segment_ids=None,
                                  impl="chunk", chunk_size=None, normalize_qk=False)

Layout: q, k: [B, T, H, K]; v: [B, T, H, V]; per-token scalar gates [B, T, H]; key-channel gates [B, T, H, K];
value-channel gates [B, T, H, V]; state [B, H, K, V] in float32 (float64 for float64 inputs); the output
[B, T, H, V] in q's dtype (with impl="pallas", 16-bit q, k, v (and e) are also the kernels' storage dtype). `g` is
always a log-decay (<= 0; exp(g) is the decay). Grouped values: v may have a multiple H of the H_k heads of q, k
and e; each key head then serves H / H_k consecutive value heads, and the gates and the state are per value head.

Each rule maps its inputs onto the sub-steps of `edarnn.core` (DESIGN.md §1):

    rule               decay exp(g)      sub-steps per token (x, y, z)
    linear_attention   1                 (k, 0, v)
    gla                scalar or [K]     (k, 0, v)
    delta_rule         1                 (k, beta k, beta v)
    gated_delta_rule   scalar            (k, beta k, beta v)
    kda                [K]               (k, beta k, beta v)
    gdn2               scalar or [K]     (k, b * k, w * v)
    eda                scalar or [K]     erase (e, gamma e, 0), then write (k, beta k, beta v)  [or (k, b k, w v)]

impl: "recurrent" (token by token, the definition), "scan" (associative scan), "chunk" (chunkwise WY form),
"pallas" (Pallas kernels for GPU and TPU: chunkwise, or token by token below one chunk; on the CPU the GPU
kernels in interpret mode, for checking), "auto" ("pallas" on a GPU for the shapes its kernels were tested and
timed at, "chunk" otherwise; see `resolve_impl`).

The step functions `<rule>_step(state, ...)` take one token ([B, H, D] inputs, [B, H] scalar gates) and return
(o [B, H, V], new_state); they equal `recurrent`.
"""

import contextlib
import contextvars
import inspect

import jax
import jax.numpy as jnp

from edarnn import core

Array = jax.Array

IMPLS = ("auto", "recurrent", "scan", "chunk", "pallas")
CHUNK_ROWS = 64  # sub-steps per chunk when chunk_size is None: 64 tokens, 32 for eda's two sub-steps per token


def chunk_tokens(chunk_size: int | None, per_token: int) -> int:
    """The chunk size in tokens: chunk_size, or for None CHUNK_ROWS sub-steps (per_token sub-steps per token).
    Measured (H200, B=4, T=4096, H=16, K=V=128, bf16, session 8): eda's Pallas kernels at chunks of 32 tokens
    4.46 / 9.01 ms forward / fwd+bwd against 5.78 / 14.61 at 64 (the intra-chunk work grows with the rows
    squared); its plain-JAX chunk form on a 2-core CPU (B=2, T=1024, H=4, K=V=64, float32) 41 / 144 ms against
    59 / 209."""
    return max(1, CHUNK_ROWS // per_token) if chunk_size is None else chunk_size


_FORMS = {"recurrent": core.recurrent, "scan": core.associative_scan}


# True within `recompute_chunk_states()`: impl="pallas" keeps only its inputs for the backward.
_RECOMPUTE_CHUNK_STATES = contextvars.ContextVar("edarnn_recompute_chunk_states", default=False)


@contextlib.contextmanager
def recompute_chunk_states():
    """Within this context, impl="pallas" on a GPU keeps only its inputs for the backward pass, which recomputes the
    chunk states (three kernels); outside it, the forward keeps them (faster, at a few hundred KB per chunk and
    head alive until the backward: `pallas_kernels.forms.chunkwise` has the measurement). Use it around code
    differentiated under rematerialisation (jax.checkpoint, nnx.remat) that saves the rule's output, as the model
    does with config.remat: there the kept states are not saved, so the forward kernels would run again in the
    backward. Read when the rule is traced."""
    token = _RECOMPUTE_CHUNK_STATES.set(True)
    try:
        yield
    finally:
        _RECOMPUTE_CHUNK_STATES.reset(token)


def _pallas(q, steps, state, segment_ids, chunk_size, storage=None):
    """The Pallas kernels of the default backend (GPU or TPU): the token-by-token kernel for sequences shorter than
    one chunk (decoding, short prefills), the chunkwise kernels otherwise; on the CPU the GPU kernels in interpret
    mode (for checking)."""
    from pallas_kernels import forms  # noqa: PLC0415  (imports Pallas only when asked for)

    backend = jax.default_backend()
    key, value = q.shape[-1], steps.z.shape[-1]
    if backend not in ("gpu", "cpu", "tpu"):
        raise ValueError(f'impl="pallas" has GPU and TPU kernels (and interpret mode on the CPU); got {backend}')
    if backend != "tpu" and value > 64 and value % 64:
        raise ValueError(f'impl="pallas": V must be at most 64 or a multiple of 64; got V = {value}')
    if backend == "gpu":
        for name, size in (("K", key), ("V", value), ("chunk_size", chunk_size)):
            if size < 16 or not core.is_power_of_two(size):
                raise ValueError(f'impl="pallas" on a GPU: {name} must be a power of two >= 16; got {size}')
    platform, interpret = ("tpu", False) if backend == "tpu" else ("gpu", backend == "cpu")
    if q.shape[1] < chunk_size:
        return forms.recurrent(q, steps, state, segment_ids, interpret, platform)
    keep = not _RECOMPUTE_CHUNK_STATES.get()
    return forms.chunkwise(q, steps, state, segment_ids, chunk_size, interpret, platform, storage, keep)


def resolve_impl(
    impl: str, key: int = 0, value: int = 0, chunk_size: int = 64, compute=jnp.float32, length: int = 0
) -> str:
    """The concrete form for `impl` on the default backend. "auto": "pallas" on a GPU for what its chunkwise
    kernels were tested and timed at (head sizes `key` and `value` powers of two from 16 to 128, `chunk_size` 16 to
    64, float32 `compute`, at least one chunk of `length` tokens: shorter sequences would take the token-by-token
    kernel, whose backward keeps every state), "chunk" otherwise (the TPU kernels are unmeasured).
    On an H200 (B=4, T=4096, H=16, K=V=128, bf16; docs/performance.md, "impl=auto": session 4's kernels, eda at
    chunks of 64 tokens) the kernels' forward is faster
    than the chunk form's (gated_delta_rule 1.8 against 3.0 ms), their forward + backward about even with it
    (gated_delta_rule, kda) to 1.2x slower (eda); the training job (remat) does not recompute the kernels' forward,
    where it recomputes the chunk form's."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl != "auto":
        return impl
    heads_fit = all(16 <= n <= 128 and core.is_power_of_two(n) for n in (key, value))
    chunk_fits = 16 <= chunk_size <= 64 and length >= chunk_size
    on_gpu = jax.default_backend() == "gpu" and jnp.dtype(compute) == jnp.float32
    return "pallas" if on_gpu and heads_fit and chunk_fits else "chunk"


# ----------------------------------------------------------------------------------------------------------
# validation at the boundary
# ----------------------------------------------------------------------------------------------------------


# True while a one-token step (`<rule>_step`) runs its rule on a length-1 sequence: the shape messages then speak
# of the step's arguments, without the time axis the step inserted.
_ONE_TOKEN = contextvars.ContextVar("edarnn_one_token", default=False)


def _as_given(shape: tuple) -> tuple:
    """A shape as the caller gave it (a step's arguments: without the time axis at 1)."""
    return shape[:1] + shape[2:] if _ONE_TOKEN.get() and len(shape) > 1 else shape


class _Shapes:
    """Checks every argument of one call against the dimensions B, T, H, K, V read off q and v."""

    def __init__(self, rule: str, q, k, v):
        self.rule = rule
        for name, t in (("q", q), ("k", k), ("v", v)):
            if jnp.ndim(t) != 4:
                rank, layout = (3, "[B, H, D]") if _ONE_TOKEN.get() else (4, "[B, T, H, D]")
                shape = _as_given(jnp.shape(t))
                raise ValueError(f"{rule}: `{name}` must have rank {rank}, {layout}; got shape {shape}")
        b, t, key_heads, kd = jnp.shape(q)
        self.dims = {"B": b, "T": t, "h": key_heads, "H": jnp.shape(v)[2], "K": kd, "V": jnp.shape(v)[-1]}
        if min(self.dims.values()) < 1:
            raise ValueError(f"{rule}: every dimension of q and v must be >= 1; got {self._named(self.dims)}")
        self.check("q", q, "BThK")
        self.check("k", k, "BThK")
        if self.dims["H"] % key_heads:
            raise ValueError(
                f"{rule}: `v` has {self.dims['H']} heads; with grouped values that must be a multiple of the "
                f"H_k = {key_heads} heads of q and k"
            )
        self.check("v", v, "BTHV")

    @staticmethod
    def _named(dims):
        """Dimension letters as the messages spell them ("h", the heads of q and k, is H_k)."""
        return {("H_k" if c == "h" else c): n for c, n in dims.items()}

    def _expected(self, letters: str) -> str:
        letters = letters.replace("T", "") if _ONE_TOKEN.get() else letters
        named = self._named({c: self.dims[c] for c in letters})
        return f"[{', '.join(named)}] = {tuple(named.values())}"

    def expand(self, t: Array) -> Array:
        """A key-side [B, T, H_k, D] array repeated over the value heads that share each key head: [B, T, H, D]."""
        groups = self.dims["H"] // self.dims["h"]
        return t if groups == 1 else jnp.repeat(t, groups, axis=2)

    def check(self, name: str, t, *layouts: str):
        """Raise unless `t` has one of `layouts` (strings of dimension letters, e.g. "BTHK")."""
        shape = tuple(jnp.shape(t))
        if any(shape == tuple(self.dims[c] for c in lay) for lay in layouts):
            if not jnp.issubdtype(jnp.result_type(t), jnp.floating):
                raise ValueError(f"{self.rule}: `{name}` must be a floating-point array; got {jnp.result_type(t)}")
            return
        wanted = " or ".join(self._expected(lay) for lay in layouts)
        raise ValueError(f"{self.rule}: `{name}` must have shape {wanted}; got {_as_given(shape)}")


def _check_options(rule, shapes, *, scale, initial_state, segment_ids, impl, chunk_size, normalize_qk):
    d = shapes.dims
    resolve_impl(impl)
    static = "(a static Python value: under jax.jit mark it static, e.g. static_argnames)"
    if chunk_size is not None and not core.is_power_of_two(chunk_size):
        raise ValueError(f"{rule}: `chunk_size` must be a positive power of two or None; got {chunk_size!r} {static}")
    if type(normalize_qk) is not bool:
        raise ValueError(f"{rule}: `normalize_qk` must be True or False; got {normalize_qk!r} {static}")
    if scale is not None and (jnp.ndim(scale) != 0 or not jnp.issubdtype(jnp.result_type(scale), jnp.number)):
        raise ValueError(f"{rule}: `scale` must be a real scalar or None; got {scale!r}")
    if initial_state is not None and tuple(jnp.shape(initial_state)) != (d["B"], d["H"], d["K"], d["V"]):
        raise ValueError(
            f"{rule}: `initial_state` must have shape [B, H, K, V] = {(d['B'], d['H'], d['K'], d['V'])}; "
            f"got {tuple(jnp.shape(initial_state))}"
        )
    if segment_ids is not None:
        if tuple(jnp.shape(segment_ids)) != (d["B"], d["T"]):
            raise ValueError(
                f"{rule}: `segment_ids` must have shape [B, T] = {(d['B'], d['T'])}; "
                f"got {tuple(jnp.shape(segment_ids))}"
            )
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(f"{rule}: `segment_ids` must be integers; got {jnp.result_type(segment_ids)}")


def _l2_normalize(t: Array) -> Array:
    """t / |t| over the last axis, computed in float32 at least (the result keeps that precision)."""
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    return t * jax.lax.rsqrt(jnp.sum(t * t, axis=-1, keepdims=True) + 1e-6)


def _query_and_keys(shapes, opts, v, q, *keys):
    """((q's dtype, the common dtype of q, keys and v), q, *keys): the dtypes `_run` takes, from the caller's
    inputs; q and the key-side inputs (k, and EDA's e) L2-normalised if opts' normalize_qk (popped) and expanded to
    the value heads."""
    dtypes = (q.dtype, jnp.result_type(q, v, *keys))
    if opts.pop("normalize_qk"):
        q, *keys = (_l2_normalize(t) for t in (q, *keys))
    return (dtypes, *(shapes.expand(t) for t in (q, *keys)))


def _as_decay(g: Array) -> Array:
    """[B, T, H] or [B, T, H, K] log-decay -> [B, T, H, D] with D = 1 or K."""
    return g[..., None] if g.ndim == 3 else g


def _gate(gate: Array, like: Array) -> Array:
    """A scalar [B, T, H] or channel [B, T, H, D] gate, broadcastable against `like` [B, T, H, D]."""
    return gate[..., None] * like if gate.ndim == 3 else gate * like


def _run(shapes, q, steps, out_dtype, input_dtype, *, scale, initial_state, segment_ids, impl, chunk_size):
    """Scale q, promote to the compute dtype, call the chosen form, cast the output to out_dtype (the caller's q
    dtype, taken before any normalisation). input_dtype: the common dtype of the caller's q, k, v (and e), the
    Pallas kernels' storage dtype when it is 16-bit (they store in float32 otherwise)."""
    d = shapes.dims
    leaves = [q, *(t for t in steps if t is not None)]
    compute = jnp.result_type(jnp.float32, *leaves)
    scale = d["K"] ** -0.5 if scale is None else scale
    q = q.astype(compute) * scale
    steps = core.Substeps(*(None if t is None else t.astype(compute) for t in steps))
    if initial_state is None:
        state = jnp.zeros((d["B"], d["H"], d["K"], d["V"]), compute)
    else:
        state = jnp.asarray(initial_state).astype(compute)
    chunk_size = chunk_tokens(chunk_size, steps.x.shape[1] // d["T"])
    impl = resolve_impl(impl, d["K"], d["V"], chunk_size, compute, d["T"])
    if impl == "pallas":
        o, final_state = _pallas(q, steps, state, segment_ids, chunk_size, storage=input_dtype)
    elif impl == "chunk":
        o, final_state = core.chunkwise(q, steps, state, segment_ids, chunk_size)
    else:
        o, final_state = _FORMS[impl](q, steps, state, segment_ids)
    return o.astype(out_dtype), final_state


def _stack(*per_substep: Array) -> Array:
    """Sub-step tensors [B, T, H, D], in the order they apply -> [B, T P, H, D] (token t's at rows t P ...)."""
    if len(per_substep) == 1:
        return per_substep[0]
    return _interleave(*per_substep)


def _concatenated(*per_substep: Array) -> Array:
    """`_stack` by `jnp.stack` (a concatenation)."""
    stacked = jnp.stack(per_substep, axis=2)
    return stacked.reshape(stacked.shape[0], -1, *stacked.shape[3:])


@jax.custom_jvp
def _interleave(*per_substep: Array) -> Array:
    """`_stack` for P > 1 as a select over the broadcast inputs, which XLA on a GPU makes one loop fusion (the
    concatenation fusion `jnp.stack` becomes ran at 40% of the memory bandwidth: eda's two interleavings of e and k,
    180 against 98 us each at B=4, T=4096, H=16, K=128 bf16 on an H200, session 17); its tangent (and so its
    transpose, the gradient's strided slices) is `jnp.stack`'s, since the select's transpose fused into a
    reduction 4x slower than what it replaced in eda's backward. The tensors share one shape and are floating
    point (the rules' arrays): a select would broadcast other shapes, and integers have no tangent to stack."""
    sub_step = jnp.arange(len(per_substep)).reshape(-1, 1, 1)
    stacked = per_substep[-1][:, :, None]
    for p in reversed(range(len(per_substep) - 1)):
        stacked = jnp.where(sub_step == p, per_substep[p][:, :, None], stacked)
    return stacked.reshape(stacked.shape[0], -1, *stacked.shape[3:])


@_interleave.defjvp
def _interleave_jvp(primals, tangents):
    return _interleave(*primals), _concatenated(*tangents)


_COMMON_DOC = """
    Common keyword arguments:
        scale: multiplies q; default K ** -0.5.
        initial_state: [B, H, K, V] state before the first token; default zeros.
        segment_ids: [B, T] int; the state restarts from zero where the id changes (packed sequences).
        impl: "recurrent", "scan", "chunk", "pallas" or "auto".
        chunk_size: tokens per chunk of the chunk and pallas forms, a power of two; None: 64 sub-steps (64
            tokens; 32 for eda, whose tokens take two sub-steps), see `chunk_tokens`.
        normalize_qk: L2-normalise q, k (and e) over the last axis first.
    Range: log-decays g must be finite (restart the state with segment_ids, not g = -inf); in the "chunk" and
    "pallas" forms a channel-wise g must be >= -10 per token (beyond, exponents inside a chunk overflow float32).
    impl, chunk_size and normalize_qk are static: under jax.jit pass them through functools.partial or
    static_argnames.
    Returns (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32, float64 for float64 inputs)."""


def _public(fn):
    fn.__doc__ = (fn.__doc__ or "") + _COMMON_DOC
    return fn


def _additive(rule, q, k, v, g, opts):
    """Rules without an erase: S <- Diag(exp g) S + k v^T; g [B, T, H] or [B, T, H, K]."""
    shapes = _Shapes(rule, q, k, v)
    shapes.check("g", g, "BTH", "BTHK")
    _check_options(rule, shapes, **opts)
    dtypes, q, k = _query_and_keys(shapes, opts, v, q, k)
    steps = (_stack(_as_decay(g)), _stack(k), None, _stack(v))
    return _run(shapes, q, steps, *dtypes, **opts)


def _delta(rule, q, k, v, g, b, w, gates, opts):
    """The gated delta family: S <- Diag(exp g) S; S <- S + k (w * v - S^T (b * k))^T.

    gates: {argument name: allowed layouts} of the rule's own gate arguments, checked in order; the
    scalar-gated rules pass beta as both b and w and name it once."""
    shapes = _Shapes(rule, q, k, v)
    for (name, layouts), t in zip(gates.items(), (g, b, w), strict=False):
        shapes.check(name, t, *layouts)
    _check_options(rule, shapes, **opts)
    dtypes, q, k = _query_and_keys(shapes, opts, v, q, k)
    steps = (_stack(_as_decay(g)), _stack(k), _stack(_gate(b, k)), _stack(_gate(w, v)))
    return _run(shapes, q, steps, *dtypes, **opts)


def _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk):
    return dict(
        scale=scale,
        initial_state=initial_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
        normalize_qk=normalize_qk,
    )


@_public
def linear_attention(
    q, k, v, *, scale=None, initial_state=None, segment_ids=None, impl="chunk", chunk_size=None, normalize_qk=False
):
    """Linear attention: S <- S + k v^T (Katharopoulos et al. 2020)."""
    opts = _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk)
    return _additive("linear_attention", q, k, v, jnp.zeros(jnp.shape(v)[:3], jnp.float32), opts)


@_public
def gla(
    q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, impl="chunk", chunk_size=None, normalize_qk=False
):
    """Gated linear attention: S <- Diag(exp g) S + k v^T.

    g: log-decay, [B, T, H] (one per head: Mamba-2 / SSD style) or [B, T, H, K] (per key channel: GLA)."""
    opts = _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk)
    return _additive("gla", q, k, v, g, opts)


@_public
def delta_rule(
    q,
    k,
    v,
    beta,
    *,
    scale=None,
    initial_state=None,
    segment_ids=None,
    impl="chunk",
    chunk_size=None,
    normalize_qk=False,
):
    """DeltaNet: S <- S + beta k (v - S^T k)^T (Schlag et al. 2021). beta: [B, T, H]."""
    opts = _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk)
    g = jnp.zeros(jnp.shape(v)[:3], jnp.float32)
    return _delta("delta_rule", q, k, v, g, beta, beta, {"g": ("BTH",), "beta": ("BTH",)}, opts)


@_public
def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    segment_ids=None,
    impl="chunk",
    chunk_size=None,
    normalize_qk=False,
):
    """Gated DeltaNet: S <- exp(g) S, then the delta write with strength beta. g, beta: [B, T, H]."""
    opts = _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk)
    return _delta("gated_delta_rule", q, k, v, g, beta, beta, {"g": ("BTH",), "beta": ("BTH",)}, opts)


@_public
def kda(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    segment_ids=None,
    impl="chunk",
    chunk_size=None,
    normalize_qk=False,
):
    """Kimi Delta Attention: channel-wise decay S <- Diag(exp g) S, then the delta write.
    g: [B, T, H, K]; beta: [B, T, H]."""
    opts = _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk)
    return _delta("kda", q, k, v, g, beta, beta, {"g": ("BTHK",), "beta": ("BTH",)}, opts)


@_public
def gdn2(
    q,
    k,
    v,
    g,
    b,
    w,
    *,
    scale=None,
    initial_state=None,
    segment_ids=None,
    impl="chunk",
    chunk_size=None,
    normalize_qk=False,
):
    """Gated DeltaNet-2: S <- Diag(exp g) S; S <- S + k (w * v - S^T (b * k))^T.

    g: log-decay [B, T, H, K] (or [B, T, H]); b: key-channel erase gate [B, T, H, K]; w: value-channel write
    gate [B, T, H, V] (either may be a scalar [B, T, H]). With b = w = beta this is kda."""
    opts = _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk)
    gates = {"g": ("BTH", "BTHK"), "b": ("BTH", "BTHK"), "w": ("BTH", "BTHV")}
    return _delta("gdn2", q, k, v, g, b, w, gates, opts)


@_public
def eda(
    q,
    k,
    v,
    e,
    g,
    beta,
    gamma,
    *,
    b=None,
    w=None,
    scale=None,
    initial_state=None,
    segment_ids=None,
    impl="chunk",
    chunk_size=None,
    normalize_qk=False,
):
    """Erase-then-Delta Attention: per token, decay and erase along e, then the delta write along k:

        S <- (I - e (gamma * e)^T) Diag(exp g) S           # erase sub-step
        S <- S + k (beta v - S^T (beta k))^T               # write sub-step

    e: erase direction [B, T, H, K]; g: log-decay [B, T, H] or [B, T, H, K]; gamma: erase strength [B, T, H]
    or per key channel [B, T, H, K]; beta: write strength [B, T, H]. Passing b [B, T, H, K] and w [B, T, H, V]
    (with beta=None) gives the write sub-step GDN-2's channel gates: k (w * v - S^T (b * k))^T."""
    shapes = _Shapes("eda", q, k, v)
    shapes.check("e", e, "BThK")
    shapes.check("g", g, "BTH", "BTHK")
    shapes.check("gamma", gamma, "BTH", "BTHK")
    if beta is None:
        if b is None or w is None:
            raise ValueError("eda: give either `beta` [B, T, H] or both `b` [B, T, H, K] and `w` [B, T, H, V]")
        shapes.check("b", b, "BTH", "BTHK")
        shapes.check("w", w, "BTH", "BTHV")
    else:
        if b is not None or w is not None:
            raise ValueError("eda: `b` and `w` replace `beta`; pass beta=None with them")
        shapes.check("beta", beta, "BTH")
        b = w = beta
    opts = _options(scale, initial_state, segment_ids, impl, chunk_size, normalize_qk)
    _check_options("eda", shapes, **opts)
    dtypes, q, k, e = _query_and_keys(shapes, opts, v, q, k, e)
    written = _gate(w, v)
    steps = (
        _as_decay(g),  # per token: the erase sub-step decays, the write sub-step does not (`core` layouts)
        _stack(e, k),
        _stack(_gate(gamma, e), _gate(b, k)),
        _stack(jnp.zeros_like(written), written),
    )
    return _run(shapes, q, steps, *dtypes, **opts)


# ----------------------------------------------------------------------------------------------------------
# one-token steps for decoding
# ----------------------------------------------------------------------------------------------------------


def _token_step(rule):
    """The one-token form of `rule`: the recurrent form on a length-1 sequence."""
    signature = inspect.signature(rule)
    per_token = {name for name, p in signature.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD} | {
        "b",
        "w",
    }

    def step(state, *args, impl="recurrent", **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            if name in per_token and value is not None:
                bound.arguments[name] = jnp.asarray(value)[:, None]
        one_token = _ONE_TOKEN.set(True)
        try:
            o, new_state = rule(*bound.args, **bound.kwargs, initial_state=state, impl=impl)
        finally:
            _ONE_TOKEN.reset(one_token)
        return o[:, 0], new_state

    step.__name__ = step.__qualname__ = f"{rule.__name__}_step"
    step.__doc__ = (
        f"One token of `{rule.__name__}`: (state [B, H, K, V], q [B, H, K], ..., gates [B, H] or [B, H, D]) "
        f"-> (o [B, H, V], new_state). Same arguments as `{rule.__name__}` without the time axis; impl "
        '"recurrent" (default) or "pallas" (the decoding kernel: state updated in place when donated to jit).'
    )
    return step


linear_attention_step = _token_step(linear_attention)
gla_step = _token_step(gla)
delta_rule_step = _token_step(delta_rule)
gated_delta_rule_step = _token_step(gated_delta_rule)
kda_step = _token_step(kda)
gdn2_step = _token_step(gdn2)
eda_step = _token_step(eda)

RULES = {
    "linear_attention": linear_attention,
    "gla": gla,
    "delta_rule": delta_rule,
    "gated_delta_rule": gated_delta_rule,
    "kda": kda,
    "gdn2": gdn2,
    "eda": eda,
}

__all__ = ["CHUNK_ROWS", "IMPLS", "RULES", "chunk_tokens", "resolve_impl", *RULES, *(f"{name}_step" for name in RULES)]
