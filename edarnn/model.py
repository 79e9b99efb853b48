"""The decoder-only language model (DESIGN.md §4), Flax NNX.

    tokens [B, T] -> embedding -> n_layers x Block -> RMSNorm -> head -> logits [B, T, vocab] float32
    Block: x += mixer(RMSNorm(x), segment_ids); x += SwiGLU(RMSNorm(x))

The token mixer of layer i is config.layers[i % len(config.layers)], one of MIXER_KINDS:

  - a recurrent mixer for each kind of RECURRENT (a rule of edarnn.rules and how its gates are made):
        q, k, v (and EDA's erase direction e) = SiLU(causal depthwise conv(x W))       [B, T, H, K or V]
        log-decay g = -exp(A_log) * softplus(x W_a + dt_bias)                          [B, T, H] or [B, T, H, K]
        gates beta, gamma, b, w = sigmoid(x W_gate)                                    [B, T, H] or [.., K or V]
        o = rule(q, k, v, ..., segment_ids, normalize_qk=True)   (q, k, e L2-normalised per head)
        out = (RMSNorm_per_head(o) * SiLU(x W_og)) W_out
    Per-head gates are one projection d -> H; per-channel gates a rank-GATE_RANK factorisation d -> r -> H x D.
    Channel-wise log-decays are floored at CHANNEL_LOG_DECAY_MIN (the range of the rules' chunk form).
  - "attention" (full causal) or "swa" (each token sees itself and the config.window - 1 tokens before it):
    softmax attention with RoPE (positions counted from each segment's start) through
    jax.nn.dot_product_attention (cuDNN on a GPU in bf16/f16, XLA otherwise); n_heads heads of width
    head_dim_v for q, k and v (the function needs one width).

segment_ids [B, T] (packed documents): the recurrent state restarts, the convolution does not reach back and
attention does not look across a change of id; a document's logits do not depend on what is packed before it.

Decoding (edarnn.inference drives it): `LM.prefill` is the forward pass that also returns a cache per layer,
`LM.decode` one token from the caches. Every layer runs the same code as in training: a recurrent mixer continues
its rule from the cached state and the convolution from the cached inputs of the last W - 1 tokens
(RecurrentCache, a fixed size); an attention mixer appends its key and value to a ring buffer (AttentionCache:
the last `window` tokens for "swa", all of them up to a maximum length for full attention) and attends over it.

Dimensions: d = d_model, H = n_heads, K = head_dim_k, V = head_dim_v, F = d_ff. Parameters are float32; the
computation runs in config.dtype ("float32" or "bfloat16"; norms, decays, RoPE and the rules' state in float32);
logits are float32. Every parameter carries logical axis names (edarnn.sharding) in its `out_sharding` metadata.

Initialisation:
  - projections N(0, 1/fan_in); the two projections that write into the residual stream (mixer output, MLP down)
    N(0, 1/(fan_in * 2 n_layers)), so the residual stream's variance grows by O(1) over the depth;
  - embedding E ~ N(0, 1/d), looked up and multiplied by sqrt(d) (unit-RMS inputs); the head is E^T (tied) or
    its own N(0, 1/d) matrix, so initial logits are about N(0, 1);
  - gates: the last factor of every gate projection (beta, gamma, b, w and the decay's x W_a) starts at zero, so
    at init every gate is sigmoid(0) = 0.5 and the decay is exactly exp(-A dt); a low-rank first factor is
    N(0, 1/d);
  - decay (Mamba-2): A = exp(A_log) ~ U(1, 16) per head, dt_bias = softplus^-1(dt) with dt log-uniform in
    [1e-3, 1e-1] (per head, or per head and key channel): initial per-token decays exp(-A dt) span about
    [0.2, 0.999], i.e. memories of about 1 to 1000 tokens;
  - short convolution U(-1/sqrt(W), 1/sqrt(W)) for width W (PyTorch's default for a depthwise conv);
  - RMSNorm scales 1.
"""

import contextlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from edarnn import core, rules
from edarnn.sharding import constrain

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GATE_RANK = 16  # rank of the per-channel gate projections d -> GATE_RANK -> H x D
CHANNEL_LOG_DECAY_MIN = -10.0  # floor of channel-wise log-decays: the rules' chunk form needs g >= -10 per token
ROPE_THETA = 10_000.0
# config.remat: each block is recomputed in the backward pass but for the recurrent mixers' rule outputs (named
# MIXER_OUTPUT), and the Pallas kernels' custom VJP keeps only its inputs there (`rules.recompute_chunk_states`),
# so their forward does not run twice (the chunk form's backward needs its forward's internals anyway, and
# attention's its softmax statistics)
MIXER_OUTPUT = "mixer_output"
SAVE_MIXER_OUTPUT = jax.checkpoint_policies.save_only_these_names(MIXER_OUTPUT)
# Parameters the model reads only cast to the compute dtype: inference may store them in it (same results, half
# the memory and traffic in bfloat16). The others (norm scales, decay parameters) enter float32 arithmetic.
COMPUTE_DTYPE_PARAMS = ("kernel", "conv", "embed", "head")


class Recurrent(NamedTuple):
    """How a recurrent mixer feeds its rule: decay None (none), "H" (one per head) or "K" (per key channel);
    erase: an erase direction e (EDA); gates: (argument of the rule, "H" per head | "K" | "V" per channel), each
    a sigmoid of a projection of x."""

    rule: str
    decay: str | None
    erase: bool
    gates: tuple[tuple[str, str], ...]


RECURRENT = {
    "linear_attention": Recurrent("linear_attention", None, False, ()),
    "gla": Recurrent("gla", "K", False, ()),
    "delta_rule": Recurrent("delta_rule", None, False, (("beta", "H"),)),
    "gated_delta_rule": Recurrent("gated_delta_rule", "H", False, (("beta", "H"),)),
    "kda": Recurrent("kda", "K", False, (("beta", "H"),)),
    "gdn2": Recurrent("gdn2", "K", False, (("b", "K"), ("w", "V"))),
    "eda": Recurrent("eda", "H", True, (("beta", "H"), ("gamma", "H"))),
    # eda with channel-wise decay, erase strength and GDN-2's write gates b, w in place of beta
    "eda_channel": Recurrent("eda", "K", True, (("gamma", "K"), ("b", "K"), ("w", "V"))),
}
ATTENTION = ("attention", "swa")
MIXER_KINDS = (*RECURRENT, *ATTENTION)


# ----------------------------------------------------------------------------------------------------------
# parameters and pure functions
# ----------------------------------------------------------------------------------------------------------


def _param(value: Array, names: tuple[str | None, ...]) -> nnx.Param:
    """A float32 parameter with logical axis names (placed by edarnn.sharding, not at creation)."""
    return nnx.Param(value.astype(jnp.float32), out_sharding=names, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], low: float, high: float) -> Array:
    return jax.random.uniform(rngs.params(), shape, jnp.float32, low, high)


def causal_conv(x: Array, weight: Array, segment_ids: Array | None) -> Array:
    """Causal depthwise convolution along time: y_t = sum_j weight[j] * x_{t-j} over the W lags j < W that lie in
    t's segment. x [B, T, H, D]; weight [W, H, D] (weight[0] multiplies the current token); segment_ids [B, T]."""
    length = x.shape[1]
    segment = None if segment_ids is None else core.segment_numbers(segment_ids, length)
    y = x * weight[0]
    for lag in range(1, weight.shape[0]):
        past = jnp.pad(x, ((0, 0), (lag, 0), (0, 0), (0, 0)))[:, :length]
        if segment is not None:
            same = segment == jnp.pad(segment, ((0, 0), (lag, 0)), constant_values=-1)[:, :length]
            past = past * same[:, :, None, None].astype(x.dtype)
        y = y + past * weight[lag]
    return y


def conv_tail(x: Array, segment_ids: Array | None, width: int) -> Array:
    """What a causal convolution of `width` needs from before the token after x: x's last width - 1 tokens
    [B, width - 1, H, D], zeros for those before x's start or outside the last token's segment."""
    keep = width - 1
    tail = jnp.pad(x, ((0, 0), (keep, 0), (0, 0), (0, 0)))[:, x.shape[1] :]
    if segment_ids is None:
        return tail
    segment = core.segment_numbers(segment_ids, x.shape[1])
    same = jnp.pad(segment == segment[:, -1:], ((0, 0), (keep, 0)))[:, x.shape[1] :]
    return tail * same[:, :, None, None].astype(x.dtype)


def segment_positions(segment_ids: Array | None, length: int) -> Array:
    """[B, T] (or [1, T] without segment_ids) int32 position of each token from the start of its segment."""
    t = jnp.arange(length, dtype=jnp.int32)
    if segment_ids is None:
        return t[None]
    start = jax.lax.cummax(jnp.where(core.resets(segment_ids, length), t, 0), axis=1)
    return t - start


def rope(x: Array, positions: Array) -> Array:
    """Rotary position embedding of x [B, T, H, D] (D even) at positions [B or 1, T]: the pairs (x_i, x_{i+D/2})
    rotated by positions * ROPE_THETA^(-2i/D). Computed in float32, returned in x's dtype."""
    half = x.shape[-1] // 2
    freq = ROPE_THETA ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[..., None].astype(jnp.float32) * freq
    cos, sin = jnp.cos(angle)[:, :, None], jnp.sin(angle)[:, :, None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q: Array, k: Array, v: Array, segment_ids: Array | None, window: int | None) -> Array:
    """Causal softmax attention, q, k, v [B, T, H, D] -> [B, T, H, D], scale D^-1/2: each query sees itself and
    the `window` - 1 tokens before it (window None: every token before it), never a token of another segment.

    One call of jax.nn.dot_product_attention: causality and the window as its flags (which cuDNN serves without
    a mask), the segments as an explicit boolean mask [B, 1, T, T] (on cuDNN an additive bias: O(T^2) memory,
    so long unpacked sequences should pass segment_ids=None)."""
    mask = None
    if segment_ids is not None:
        segment = core.segment_numbers(segment_ids, q.shape[1])
        mask = (segment[:, :, None] == segment[:, None, :])[:, None]
    cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn" if cudnn else None,
    )


# ----------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------


class Dense(nnx.Module):
    """x [..., *in_shape] -> [..., *out_shape], no bias; kernel [*in_shape, *out_shape] ~ N(0, std^2) with
    std = fan_in^-1/2 unless given (0: zeros); computed in `dtype`."""

    def __init__(self, in_shape, out_shape, names, *, dtype, rngs: nnx.Rngs, std: float | None = None):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        std = math.prod(in_shape) ** -0.5 if std is None else std
        self.kernel = _param(_normal(rngs, in_shape + out_shape, std), tuple(names))
        self.n_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        return jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.n_in)


class RMSNorm(nnx.Module):
    """x / RMS(x) * scale over the last axis, in float32, returned in `dtype`; scale [*shape] (broadcast against
    x's trailing axes, e.g. [d] or per head [H, V]), initialised to 1."""

    def __init__(self, shape, names, *, eps: float, dtype):
        self.scale = _param(jnp.ones(shape), tuple(names))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(self.dtype)


class ConvProjection(nnx.Module):
    """x [B, T, d] -> SiLU(causal_conv(x W)) [B, T, H, D]; conv_size 0: SiLU(x W).

    With a `tail` (the convolution inputs x W of the W - 1 tokens before x, see conv_tail; decoding) the
    convolution continues from it, the tail counting as part of x's first segment. Also returns the tail for the
    tokens after x (None without a convolution)."""

    def __init__(self, d_model: int, heads: int, width: int, conv_size: int, *, dtype, rngs: nnx.Rngs):
        self.proj = Dense((d_model,), (heads, width), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
        if conv_size:
            bound = conv_size**-0.5
            self.conv = _param(_uniform(rngs, (conv_size, heads, width), -bound, bound), (None, "heads", "kv"))
        else:
            self.conv = None

    def __call__(self, x: Array, segment_ids: Array | None, tail: Array | None = None) -> tuple[Array, Array | None]:
        y = self.proj(x)
        if self.conv is None:
            return constrain(jax.nn.silu(y), "batch", "length", "heads", "kv"), None
        width = self.conv.shape[0]
        if tail is not None:
            y = jnp.concatenate([tail.astype(y.dtype), y], axis=1)
            if segment_ids is not None:
                segment_ids = jnp.pad(segment_ids, ((0, 0), (width - 1, 0)), mode="edge")
        out = causal_conv(y, self.conv[...].astype(y.dtype), segment_ids)[:, y.shape[1] - x.shape[1] :]
        return constrain(jax.nn.silu(out), "batch", "length", "heads", "kv"), conv_tail(y, segment_ids, width)


class Gate(nnx.Module):
    """Pre-activation of a gate, x [B, T, d] -> [B, T, *shape]: shape (H,) one projection d -> H; shape (H, D) a
    factorisation d -> GATE_RANK -> H x D. The last factor starts at zero."""

    def __init__(self, d_model: int, shape: tuple[int, ...], names: tuple[str, ...], *, dtype, rngs: nnx.Rngs):
        if len(shape) == 1:
            self.down = None
            self.up = Dense((d_model,), shape, ("embed", *names), dtype=dtype, rngs=rngs, std=0.0)
        else:
            self.down = Dense((d_model,), (GATE_RANK,), ("embed", None), dtype=dtype, rngs=rngs)
            self.up = Dense((GATE_RANK,), shape, (None, *names), dtype=dtype, rngs=rngs, std=0.0)

    def __call__(self, x: Array) -> Array:
        return self.up(x if self.down is None else self.down(x))


class Decay(nnx.Module):
    """Log-decay g = -exp(A_log) * softplus(x W_a + dt_bias) <= 0, float32, [B, T, *shape] with shape (H,) or
    (H, K); the channel-wise one floored at CHANNEL_LOG_DECAY_MIN. A_log [H], dt_bias [*shape] (Mamba-2 init)."""

    def __init__(self, d_model: int, shape: tuple[int, ...], names: tuple[str, ...], *, dtype, rngs: nnx.Rngs):
        self.a = Gate(d_model, shape, names, dtype=dtype, rngs=rngs)
        self.A_log = _param(jnp.log(_uniform(rngs, shape[:1], 1.0, 16.0)), ("heads",))
        dt = jnp.exp(_uniform(rngs, shape, math.log(1e-3), math.log(1e-1)))
        self.dt_bias = _param(dt + jnp.log(-jnp.expm1(-dt)), names)  # softplus(dt_bias) = dt

    def __call__(self, x: Array) -> Array:
        rate = jnp.exp(self.A_log[...]).reshape(-1, *(1,) * (self.dt_bias.ndim - 1))
        g = -rate * jax.nn.softplus(self.a(x).astype(jnp.float32) + self.dt_bias[...])
        return g if self.dt_bias.ndim == 1 else jnp.maximum(g, CHANNEL_LOG_DECAY_MIN)


def _gate_shape(channels: str, heads: int, key: int, value: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(shape, logical names) of a gate per head ("H") or per key / value channel ("K" / "V")."""
    if channels == "H":
        return (heads,), ("heads",)
    return (heads, key if channels == "K" else value), ("heads", "kv")


class RecurrentCache(NamedTuple):
    """What a recurrent mixer carries to the next token: a fixed size, whatever the length.

    state: [B, H, K, V] float32, the rule's state after the last token;
    tails: {"q", "k", "v" (, "e"): [B, W - 1, H, K or V]} in the compute dtype, the convolution inputs (x W) of
    the last W - 1 tokens (zeros where there were none); empty without a convolution."""

    state: Array
    tails: dict[str, Array]


class RecurrentMixer(nnx.Module):
    """A rule of edarnn.rules as a token mixer, x [B, T, d] -> [B, T, d] (see the module docstring).

    Factored as inputs (projections, conv) -> gates -> the rule -> readout (norm, output gate, projection);
    `extend` runs them from a cache (prefill: from none; decode: one token)."""

    def __init__(self, kind: str, config, *, rngs: nnx.Rngs):
        spec = RECURRENT[kind]
        d, heads, key, value = config.d_model, config.n_heads, config.head_dim_k, config.head_dim_v
        dtype, conv = DTYPES[config.dtype], config.conv_size
        self.rule = spec.rule
        self.impl, self.chunk_size = config.rule_impl, config.chunk_size
        self.q = ConvProjection(d, heads, key, conv, dtype=dtype, rngs=rngs)
        self.k = ConvProjection(d, heads, key, conv, dtype=dtype, rngs=rngs)
        self.v = ConvProjection(d, heads, value, conv, dtype=dtype, rngs=rngs)
        self.e = ConvProjection(d, heads, key, conv, dtype=dtype, rngs=rngs) if spec.erase else None
        decay_shape = None if spec.decay is None else _gate_shape(spec.decay, heads, key, value)
        self.decay = None if decay_shape is None else Decay(d, *decay_shape, dtype=dtype, rngs=rngs)
        self.gates = nnx.Dict(
            {
                name: Gate(d, *_gate_shape(channels, heads, key, value), dtype=dtype, rngs=rngs)
                for name, channels in spec.gates
            }
        )
        self.norm = RMSNorm((heads, value), ("heads", "kv"), eps=config.norm_eps, dtype=dtype)
        self.out_gate = Dense((d,), (heads, value), ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
        out_std = (heads * value * 2 * config.n_layers) ** -0.5
        self.out = Dense((heads, value), (d,), ("heads", "kv", "embed"), dtype=dtype, rngs=rngs, std=out_std)

    def inputs(
        self, x: Array, segment_ids: Array | None, tails: dict[str, Array] | None = None
    ) -> tuple[dict[str, Array], dict[str, Array]]:
        """q, k [B, T, H, K], v [B, T, H, V] and (EDA) e [B, T, H, K], before normalisation, continuing the
        convolutions from `tails` (RecurrentCache.tails; None: no tokens before x); and the tails after x."""
        projections = {"q": self.q, "k": self.k, "v": self.v, "e": self.e}
        values, new_tails = {}, {}
        for name, projection in projections.items():
            if projection is not None:
                values[name], tail = projection(x, segment_ids, None if tails is None else tails.get(name))
                if tail is not None:
                    new_tails[name] = tail
        return values, new_tails

    def gate_values(self, x: Array) -> dict[str, Array]:
        """The rule's gates: g (log-decay) and sigmoid gates, [B, T, H] or [B, T, H, K or V]."""
        values = {name: jax.nn.sigmoid(gate(x)) for name, gate in self.gates.items()}
        if self.decay is not None:
            values["g"] = self.decay(x)
        if self.rule == "eda" and "beta" not in values:
            values["beta"] = None  # eda with b, w in place of beta
        return values

    def readout(self, o: Array, x: Array) -> Array:
        """(RMSNorm_per_head(o) * SiLU(x W_og)) W_out: o [B, T, H, V], x [B, T, d] -> [B, T, d]."""
        return self.out(self.norm(o) * jax.nn.silu(self.out_gate(x)))

    def extend(self, x: Array, segment_ids: Array | None, cache: RecurrentCache | None) -> tuple[Array, RecurrentCache]:
        """x [B, T, d] after the tokens summarised by `cache` (None: none) -> (y [B, T, d], the cache after x's
        last token: the state of its segment). The rule runs in config.rule_impl; a single token (decoding) in
        the recurrent form, or the Pallas token kernel with rule_impl "pallas"."""
        inputs, tails = self.inputs(x, segment_ids, None if cache is None else cache.tails)
        impl = "recurrent" if x.shape[1] == 1 and self.impl != "pallas" else self.impl
        o, state = rules.RULES[self.rule](
            **inputs,
            **self.gate_values(x),
            initial_state=None if cache is None else cache.state,
            segment_ids=segment_ids,
            impl=impl,
            chunk_size=self.chunk_size,
            normalize_qk=True,
        )
        state = constrain(state.astype(jnp.float32), "batch", "heads", None, "kv")
        o = checkpoint_name(constrain(o, "batch", "length", "heads", "kv"), MIXER_OUTPUT)
        return self.readout(o, x), RecurrentCache(state, tails)

    def prefill(self, x: Array, segment_ids: Array | None, max_len: int | None) -> tuple[Array, RecurrentCache]:
        """x [B, T, d] -> (y [B, T, d], the cache after x); max_len is unused (the cache has a fixed size)."""
        return self.extend(x, segment_ids, None)

    def decode(self, x: Array, cache: RecurrentCache) -> tuple[Array, RecurrentCache]:
        """One token x [B, 1, d] -> (y [B, 1, d], the cache after it)."""
        return self.extend(x, None, cache)

    def __call__(self, x: Array, segment_ids: Array | None) -> Array:
        return self.extend(x, segment_ids, None)[0]


class AttentionCache(NamedTuple):
    """The keys and values of an attention mixer's last S tokens, a ring buffer: the token written i-th (counted
    over the padded batch, prompt and decoded tokens) sits in slot i % S. S = min(window, max_len) for "swa",
    max_len for full attention (which then never overwrites a slot).

    keys, values: [B, S, H, D] in the compute dtype (keys after RoPE);
    positions: [B, S] int32, each slot's position in its sequence, -1 where empty or padding;
    length: [B] int32, tokens of each sequence so far (the next token's position);
    index: [] int32, tokens written (the next token's slot is index % S)."""

    keys: Array
    values: Array
    positions: Array
    length: Array
    index: Array


class AttentionMixer(nnx.Module):
    """Softmax attention with RoPE, x [B, T, d] -> [B, T, d]: full causal (window None) or sliding window."""

    def __init__(self, config, window: int | None, *, rngs: nnx.Rngs):
        d, heads, width, dtype = config.d_model, config.n_heads, config.head_dim_v, DTYPES[config.dtype]
        names = ("embed", "heads", "kv")
        self.q = Dense((d,), (heads, width), names, dtype=dtype, rngs=rngs)
        self.k = Dense((d,), (heads, width), names, dtype=dtype, rngs=rngs)
        self.v = Dense((d,), (heads, width), names, dtype=dtype, rngs=rngs)
        out_std = (heads * width * 2 * config.n_layers) ** -0.5
        self.out = Dense((heads, width), (d,), ("heads", "kv", "embed"), dtype=dtype, rngs=rngs, std=out_std)
        self.window = window

    def _qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """q, k (after RoPE at positions [B or 1, T]) and v, [B, T, H, D]."""
        q, k, v = rope(self.q(x), positions), rope(self.k(x), positions), self.v(x)
        return tuple(constrain(t, "batch", "length", "heads", "kv") for t in (q, k, v))

    def cache_size(self, max_len: int) -> int:
        """Slots S of the cache for sequences of at most max_len tokens."""
        return max_len if self.window is None else min(self.window, max_len)

    def prefill(self, x: Array, segment_ids: Array | None, max_len: int | None) -> tuple[Array, AttentionCache | None]:
        """x [B, T, d] -> (y [B, T, d], the cache for decoding after x's last token, sized for max_len tokens (None:
        no cache)). The cache keeps the last min(T, S) tokens; those outside the last token's segment (padding
        before a shorter prompt) as empty slots."""
        length = x.shape[1]
        positions = segment_positions(segment_ids, length)
        q, k, v = self._qkv(x, positions)
        y = self.out(attention(q, k, v, segment_ids, self.window))
        if max_len is None:
            return y, None
        size = self.cache_size(max_len)
        kept = min(length, size)
        positions = jnp.broadcast_to(positions, x.shape[:2])
        if segment_ids is not None:
            segment = core.segment_numbers(segment_ids, length)
            positions = jnp.where(segment == segment[:, -1:], positions, -1)

        def buffer(t: Array, fill) -> Array:
            """[B, T, ...] -> [B, S, ...]: token i (of the last `kept`) in slot i % S, `fill` in the others."""
            widths = ((0, 0), (0, size - kept)) + ((0, 0),) * (t.ndim - 2)
            t = jnp.pad(t[:, length - kept :], widths, constant_values=fill)
            return jnp.roll(t, (length - kept) % size, axis=1)

        cache = AttentionCache(
            keys=buffer(k, 0),
            values=buffer(v, 0),
            positions=buffer(positions, -1),
            length=positions[:, -1] + 1,
            index=jnp.asarray(length, jnp.int32),
        )
        return y, cache

    def decode(self, x: Array, cache: AttentionCache) -> tuple[Array, AttentionCache]:
        """One token x [B, 1, d] -> (y [B, 1, d], the cache with it): attends over the cache's valid slots. A full
        attention layer given more tokens than its cache holds returns NaN (it would silently drop context)."""
        size = cache.keys.shape[1]
        q, k, v = self._qkv(x, cache.length[:, None])
        slot = cache.index % size
        write = lambda buffer, t: jax.lax.dynamic_update_slice_in_dim(buffer, t.astype(buffer.dtype), slot, 1)  # noqa: E731
        keys, values = write(cache.keys, k), write(cache.values, v)
        positions = write(cache.positions, cache.length[:, None])
        o = jax.nn.dot_product_attention(q, keys, values, mask=(positions >= 0)[:, None, None, :])
        if self.window is None:
            o = jnp.where(cache.index < size, o, jnp.nan)
        cache = AttentionCache(keys, values, positions, cache.length + 1, cache.index + 1)
        return self.out(o), cache

    def __call__(self, x: Array, segment_ids: Array | None) -> Array:
        return self.prefill(x, segment_ids, None)[0]


class MLP(nnx.Module):
    """SwiGLU: (SiLU(x W_gate) * x W_up) W_down, x [B, T, d] -> [B, T, d] through width F."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        d, hidden, dtype = config.d_model, config.d_ff, DTYPES[config.dtype]
        self.gate = Dense((d,), (hidden,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up = Dense((d,), (hidden,), ("embed", "mlp"), dtype=dtype, rngs=rngs)
        out_std = (hidden * 2 * config.n_layers) ** -0.5
        self.down = Dense((hidden,), (d,), ("mlp", "embed"), dtype=dtype, rngs=rngs, std=out_std)

    def __call__(self, x: Array) -> Array:
        h = constrain(jax.nn.silu(self.gate(x)) * self.up(x), "batch", "length", "mlp")
        return self.down(h)


class Block(nnx.Module):
    """x + mixer(RMSNorm(x)), then + SwiGLU(RMSNorm(x)); x [B, T, d] in the compute dtype."""

    def __init__(self, kind: str, config, *, rngs: nnx.Rngs):
        dtype, eps = DTYPES[config.dtype], config.norm_eps
        self.mixer_norm = RMSNorm((config.d_model,), ("embed",), eps=eps, dtype=dtype)
        if kind in RECURRENT:
            self.mixer = RecurrentMixer(kind, config, rngs=rngs)
        else:
            self.mixer = AttentionMixer(config, config.window if kind == "swa" else None, rngs=rngs)
        self.mlp_norm = RMSNorm((config.d_model,), ("embed",), eps=eps, dtype=dtype)
        self.mlp = MLP(config, rngs=rngs)

    def _mlp_residual(self, x: Array) -> Array:
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, "batch", "length", "act_embed")

    def prefill(self, x: Array, segment_ids: Array | None, max_len: int | None):
        """x [B, T, d] -> (the block's output, the mixer's cache for decoding up to max_len tokens)."""
        y, cache = self.mixer.prefill(self.mixer_norm(x), segment_ids, max_len)
        return self._mlp_residual(x + y), cache

    def decode(self, x: Array, cache):
        """One token x [B, 1, d] -> (the block's output, the mixer's cache with it)."""
        y, cache = self.mixer.decode(self.mixer_norm(x), cache)
        return self._mlp_residual(x + y), cache

    def __call__(self, x: Array, segment_ids: Array | None) -> Array:
        return self._mlp_residual(x + self.mixer(self.mixer_norm(x), segment_ids))


# ----------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------


def layer_kinds(config) -> list[str]:
    """The mixer of every layer: config.layers repeated to config.n_layers."""
    return [config.layers[i % len(config.layers)] for i in range(config.n_layers)]


def check_config(config) -> None:
    """Raise ValueError naming the first invalid field of a model config (config.model)."""
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim_k", "head_dim_v", "d_ff"):
        value = config[field]
        if type(value) is not int or value < 1:
            raise ValueError(f"config.model.{field} must be a positive int; got {value!r}")
    if isinstance(config.norm_eps, bool) or not isinstance(config.norm_eps, int | float) or config.norm_eps <= 0:
        raise ValueError(f"config.model.norm_eps must be a positive number; got {config.norm_eps!r}")
    chunk = config.chunk_size
    if chunk is not None and not core.is_power_of_two(chunk):
        raise ValueError(f"config.model.chunk_size must be a power of two or None (the rule's); got {chunk!r}")
    if type(config.conv_size) is not int or config.conv_size < 0:
        raise ValueError(f"config.model.conv_size must be an int >= 0 (0: no convolution); got {config.conv_size!r}")
    layers = list(config.layers)
    if not layers or any(kind not in MIXER_KINDS for kind in layers):
        raise ValueError(f"config.model.layers must be a non-empty list of {MIXER_KINDS}; got {layers!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {tuple(DTYPES)}; got {config.dtype!r}")
    if config.rule_impl not in rules.IMPLS:
        raise ValueError(f"config.model.rule_impl must be one of {rules.IMPLS}; got {config.rule_impl!r}")
    if any(kind in ATTENTION for kind in layers) and config.head_dim_v % 2:
        raise ValueError(f"config.model.head_dim_v must be even for RoPE in attention layers; got {config.head_dim_v}")
    if "swa" in layers and (type(config.window) is not int or config.window < 1):
        raise ValueError(f'config.model.window must be a positive int for "swa" layers; got {config.window!r}')


class LM(nnx.Module):
    """The language model: tokens [B, T] int -> logits [B, T, vocab_size] float32 (see the module docstring).

    config: the model config (config.model): vocab_size, d_model, n_layers, layers, n_heads, head_dim_k,
    head_dim_v, conv_size, window, d_ff, tie_embeddings, norm_eps, rule_impl, chunk_size, dtype, remat
    (nnx.remat around each block: activations inside a block are recomputed in the backward pass, except a
    recurrent mixer's rule output [B, T, H, V], kept so that the Pallas kernels' forward does not run again)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        check_config(config)
        d, vocab = config.d_model, config.vocab_size
        self.dtype = DTYPES[config.dtype]
        self.embed = _param(_normal(rngs, (vocab, d), d**-0.5), ("vocab", "embed"))
        self.blocks = nnx.List([Block(kind, config, rngs=rngs) for kind in layer_kinds(config)])
        self.norm = RMSNorm((d,), ("embed",), eps=config.norm_eps, dtype=self.dtype)
        self.head = None if config.tie_embeddings else _param(_normal(rngs, (d, vocab), d**-0.5), ("embed", "vocab"))
        self.remat = bool(config.remat)

    def _embed(self, tokens: Array, segment_ids: Array | None) -> Array:
        """tokens [B, T] int -> the residual stream [B, T, d] in the compute dtype (checks the arguments)."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [B, T]; got {tokens.dtype}{list(tokens.shape)}")
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids must have the shape of tokens {tokens.shape}; got {segment_ids.shape}")
        embed = constrain(self.embed[...], "vocab", None)  # gathered over fsdp for the lookup
        x = jnp.take(embed, tokens, axis=0).astype(self.dtype) * math.sqrt(embed.shape[1])
        return constrain(x, "batch", "length", "act_embed")

    def _logits(self, x: Array) -> Array:
        """The residual stream [B, T, d] -> logits [B, T, vocab_size] float32."""
        head = constrain(self.embed[...], "vocab", None).T if self.head is None else self.head[...]
        logits = jnp.einsum("btd,dv->btv", self.norm(x), head.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, "batch", "length", "vocab")

    def __call__(self, tokens: Array, segment_ids: Array | None = None) -> Array:
        """tokens [B, T] int; segment_ids [B, T] int or None -> logits [B, T, vocab_size] float32."""
        x = self._embed(tokens, segment_ids)
        block_fn = nnx.remat(Block.__call__, policy=SAVE_MIXER_OUTPUT) if self.remat else Block.__call__
        with rules.recompute_chunk_states() if self.remat else contextlib.nullcontext():
            for block in self.blocks:
                x = block_fn(block, x, segment_ids)
        return self._logits(x)

    def prefill(self, tokens: Array, segment_ids: Array | None, max_len: int | None) -> tuple[Array, list]:
        """The forward pass over a prompt that also returns every layer's cache: tokens [B, T] int, segment_ids
        [B, T] or None -> (logits of the last token [B, vocab_size] float32, [cache per layer]) for decoding the
        last token's segment further, up to max_len tokens in all (attention caches are sized for it)."""
        x = self._embed(tokens, segment_ids)
        caches = []
        for block in self.blocks:
            x, cache = block.prefill(x, segment_ids, max_len)
            caches.append(cache)
        return self._logits(x[:, -1:])[:, 0], caches

    def decode(self, tokens: Array, caches: list) -> tuple[Array, list]:
        """One token per sequence: tokens [B] int and the caches after the tokens before it -> (logits
        [B, vocab_size] float32, the caches with it)."""
        x = self._embed(tokens[:, None], None)
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.decode(x, cache)
            new_caches.append(cache)
        return self._logits(x)[:, 0], new_caches


def count_params(model: nnx.Module) -> int:
    """The number of parameters (elements of every nnx.Param) of `model` (also of an abstract nnx.eval_shape one)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _mixer_flops(kind: str, config, seq_len: int) -> float:
    """Forward FLOPs per token of one mixer's sequence mixing (the projections are in 6N), see flops_per_token."""
    heads, key, value = config.n_heads, config.head_dim_k, config.head_dim_v
    if kind in ATTENTION:
        window = seq_len if kind == "attention" else min(config.window, seq_len)
        # mean over t of the keys token t sees: min(t + 1, window)
        keys = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
        return heads * 4 * value * keys
    spec = RECURRENT[kind]
    per_token = 2 if spec.erase else 1
    delta = spec.rule not in ("linear_attention", "gla")
    rows = min(rules.chunk_tokens(config.chunk_size, per_token), seq_len) * per_token
    state = 2 * key * value * (1 + per_token + delta * per_token)
    intra = 2 * rows * (key + value) + delta * per_token * (4 * rows * key + 2 * rows * value + 2 * rows**2 / 3)
    return heads * (state + intra)


def flops_per_token(config_model, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of the model at sequence length `seq_len`, for MFU:

        6 N + 3 * sum over layers of the mixer's forward sequence FLOPs per token

    N: the parameters that do one multiply-add per token (all but the input embedding table, unless it is the
    tied head; the few elementwise ones, norms and decay parameters, are counted as if they did).
    Attention (per head, width D = head_dim_v): 4 D L, with L = mean over tokens of the keys seen (causal:
    (T + 1) / 2; sliding window w: about w), i.e. only the unmasked part (what a flash kernel computes).
    Recurrent rules, the chunk form (DESIGN.md §2) per head, chunk of C tokens, P sub-steps per token (2 for
    EDA), c = C P rows per chunk, delta = 1 for rules that read the state before writing (all but linear
    attention and GLA):
        state:  2 K V (1 + P + delta P)        (query reads S0, chunk state update, [delta] U = U~ - W S0)
        intra:  2 c (K + V)                    (scores Q X^T and their product with U, whole C x c tiles)
                + delta P (4 c K + 2 c V + 2 c^2 / 3)   (A, W = T Y, U~ = T Z, forward substitution for T)
    The backward is counted as twice the forward (hence 3 x)."""
    check_config(config_model)
    model = nnx.eval_shape(lambda: LM(config_model, rngs=nnx.Rngs(0)))
    embedding = 0 if config_model.tie_embeddings else config_model.vocab_size * config_model.d_model
    matmul_params = count_params(model) - embedding
    mixing = sum(_mixer_flops(kind, config_model, seq_len) for kind in layer_kinds(config_model))
    return 6.0 * matmul_params + 3.0 * mixing
