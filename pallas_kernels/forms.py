"""impl="pallas": the recurrent and chunkwise forms through Pallas kernels, with the signatures of
`edarnn.core.recurrent` and `edarnn.core.chunkwise`.

Python-side preparation (padding, chunk-local cumulative decays, running segment numbers) is shared by every
backend and differentiated by JAX. The chunkwise kernels have backward kernels of their own (`gpu/chunk_bwd.py`,
`tpu/chunk_bwd.py`) under a custom VJP on the prepared inputs, used where BACKWARD_KERNELS says (by measurement);
elsewhere, and for the token-by-token kernels, the backward recomputes through the plain-JAX form (`jax.vjp` of
`edarnn.core.chunkwise` / `edarnn.core.recurrent`).
"""

import functools

import jax
import jax.numpy as jnp

from edarnn import core
from pallas_kernels.gpu import chunk_bwd as gpu_chunk_bwd
from pallas_kernels.gpu import chunk_fwd as gpu_chunk_fwd
from pallas_kernels.gpu import recurrent_fwd as gpu_recurrent_fwd
from pallas_kernels.tpu import chunk_bwd as tpu_chunk_bwd
from pallas_kernels.tpu import chunk_fwd as tpu_chunk_fwd
from pallas_kernels.tpu import recurrent_fwd as tpu_recurrent_fwd


def _narrow(t):
    """The kernels compute in float32: float64 inputs (tests) are narrowed."""
    return t.astype(jnp.float32) if t.dtype == jnp.float64 else t


def prepare(q, sub: core.Substeps, segment_ids, chunk_size, cumsum=None):
    """Pad T to a multiple of chunk_size (identity sub-steps) and derive what the kernels read. cumsum(g, rows):
    the cumulative sum over each chunk's rows of g [B, T', H, D] (default `edarnn.core.blocked_cumsum`, XLA's): rows
    = C P of the per-sub-step g (T' = T P), C of a per-token g (T' = T; `edarnn.core` layouts).

    Returns (q, gq, x, y, z, gcum, seg, seg_q, seg_prev): gcum [B, T P, H, D] is the log-decay accumulated from
    each chunk's start, gq its value at each token's last sub-step; seg / seg_q / seg_prev are the running
    segment numbers of the sub-steps, of the tokens and before each chunk (int32), or None."""
    batch, length, heads, _ = q.shape
    per_token = sub.x.shape[1] // length
    pad = -length % chunk_size
    pad_time = lambda t, n: jnp.pad(_narrow(t), ((0, 0), (0, n)) + ((0, 0),) * (t.ndim - 2))  # noqa: E731
    q = pad_time(q, pad)
    x, y, z = (None if t is None else pad_time(t, pad * per_token) for t in sub[1:])
    g_rows = sub.g.shape[1] // length  # per_token, or 1: g per token (`edarnn.core` layouts)
    g = pad_time(sub.g, pad * g_rows)
    if cumsum is None:
        cumsum = lambda t, rows: core.blocked_cumsum(  # noqa: E731
            t.reshape(batch, -1, rows, heads, t.shape[-1]), axis=2
        ).reshape(t.shape)
    if g_rows == per_token:
        gcum = cumsum(g, chunk_size * per_token)
        gq = gcum[:, per_token - 1 :: per_token]
    else:  # every sub-step of a token sees the decay up to that token
        gq = cumsum(g, chunk_size)
        gcum = jnp.repeat(gq, per_token, axis=1)
    if segment_ids is None:
        return q, gq, x, y, z, gcum, None, None, None
    seg_q = jnp.pad(core.segment_numbers(segment_ids, length), ((0, 0), (0, pad)), "edge")
    seg = jnp.repeat(seg_q, per_token, axis=1)
    seg_prev = jnp.concatenate([seg_q[:, :1], seg_q[:, chunk_size - 1 : -1 : chunk_size]], axis=1)
    return q, gq, x, y, z, gcum, seg, seg_q, seg_prev


def _forward_kernels(inputs, chunk_size, interpret, platform, storage, keep=False):
    """The chunkwise forward kernels of `platform` on prepared inputs: (o [B, T, H, V], float32 or on the GPU in
    storage, final_state [B, H, K, V] f32, T padded; and with keep (GPU) the chunk states for the backward, else
    None)."""
    if platform == "tpu":
        return (*tpu_chunk_fwd.chunk_forward(*inputs, chunk_size=chunk_size, interpret=interpret), None)
    o, final_state, states = gpu_chunk_fwd.chunk_forward(
        *inputs, chunk_size=chunk_size, interpret=interpret, storage=storage, inverse=keep
    )
    return o, final_state, states if keep else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13, 14))
def _chunk_kernels(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, chunk_size, interpret, platform, storage, keep
):  # fmt: skip
    """The chunkwise forward kernels of `platform` (`_forward_kernels`) on prepared inputs (`prepare`), with that
    platform's backward kernels as their VJP. storage (GPU): the dtype name the kernels read q, x, y, z in and store
    their intermediates in (the caller's input dtype), or None for float32; keep (GPU): the forward keeps its chunk
    states for the backward (`chunkwise`). Returns (o, final_state)."""
    args = (q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev)
    return _forward_kernels(args, chunk_size, interpret, platform, storage)[:2]


def _chunk_kernels_forward(*args):
    """The forward for differentiation: the inputs, and on the GPU with keep the forward's chunk states too, are the
    residuals. Without keep the forward is the primal call itself, nested: a rematerialised block whose policy saves
    the output then lowers to the forward's kernels once (12 kernels for a gdn2 layer's training step, as without
    remat); with the kernels called here directly it lowered to them twice (16)."""
    inputs, (chunk_size, interpret, platform, storage, keep) = args[:10], args[10:]
    if keep and platform == "gpu":
        o, final_state, states = _forward_kernels(inputs, chunk_size, interpret, platform, storage, keep=True)
        return (o, final_state), (inputs, states)
    return _chunk_kernels(*args), (inputs, None)


def _chunk_kernels_backward(chunk_size, interpret, platform, storage, _keep, residuals, cotangents):
    inputs, states = residuals
    if platform == "tpu":
        grads = tpu_chunk_bwd.chunk_backward(*inputs, *cotangents, chunk_size=chunk_size, interpret=interpret)
    else:
        grads = gpu_chunk_bwd.chunk_backward(
            *inputs, *cotangents, chunk_size=chunk_size, interpret=interpret, storage=storage, kept=states
        )
    grads = tuple(None if d is None else d.astype(t.dtype) for d, t in zip(grads, inputs[:7], strict=True))
    return (*grads, None, None, None)  # the segment numbers (integers) have no cotangent


_chunk_kernels.defvjp(_chunk_kernels_forward, _chunk_kernels_backward)


def _recurrent_kernels(q, sub, initial_state, segment_ids, interpret, platform):
    length, per_token = q.shape[1], sub.x.shape[1] // q.shape[1]
    g = core.substep_decays(sub.g, length, per_token)
    sub = [None if t is None else _narrow(t) for t in (g.reshape(sub.x.shape[:-1] + g.shape[-1:]), *sub[1:])]
    state = initial_state.astype(jnp.float32)
    resets = core.resets(segment_ids, q.shape[1])
    resets = None if resets is None else resets.astype(jnp.int32)
    forward = tpu_recurrent_fwd.recurrent_forward if platform == "tpu" else gpu_recurrent_fwd.recurrent_forward
    o, final_state = forward(_narrow(q), *sub, state, resets, interpret=interpret)
    return o.astype(q.dtype), final_state.astype(initial_state.dtype)


def _with_recomputed_backward(kernels, reference, n_static):
    """kernels(q, sub, initial_state, segment_ids, *static) with a custom VJP whose backward is the VJP of the
    plain-JAX reference(q, sub, initial_state, segment_ids, *static), recomputed. The static arguments are the
    last n_static (the recurrent form's interpret and platform; the chunk form's chunk_size, interpret, platform,
    storage and keep, which the recomputing VJP ignores)."""
    static_argnums = tuple(range(4, 4 + n_static))

    form = jax.custom_vjp(kernels, nondiff_argnums=static_argnums)

    def forward(q, sub, initial_state, segment_ids, *static):
        return form(q, sub, initial_state, segment_ids, *static), (q, sub, initial_state, segment_ids)

    def backward(*args):
        static, ((q, sub, initial_state, segment_ids), cotangents) = args[:n_static], args[n_static:]
        _, vjp = jax.vjp(lambda *a: reference(*a, segment_ids, *static), q, sub, initial_state)
        return (*vjp(cotangents), None)

    form.defvjp(forward, backward)
    return form


_recurrent = _with_recomputed_backward(
    _recurrent_kernels, lambda q, sub, s0, seg, *_: core.recurrent(q, sub, s0, seg), 2
)


def _chunk_forward(q, sub, initial_state, segment_ids, chunk_size, interpret, platform, storage, keep):
    """The chunkwise kernels on unprepared inputs; differentiated by the backward kernels (`_chunk_kernels`)."""
    in_kernel = platform == "gpu" and gpu_chunk_fwd.default_config().cumsum_kernel
    cumsum = functools.partial(gpu_chunk_fwd.chunk_cumsum, interpret=interpret) if in_kernel else None
    q_, gq, x, y, z, gcum, *segments = prepare(q, sub, segment_ids, chunk_size, cumsum)
    state = initial_state.astype(jnp.float32)
    static = (chunk_size, interpret, platform, storage, keep)
    o, final_state = _chunk_kernels(q_, gq, x, y, z, gcum, state, *segments, *static)
    return o[:, : q.shape[1]].astype(q.dtype), final_state.astype(initial_state.dtype)


_chunk_recomputed = _with_recomputed_backward(
    _chunk_forward, lambda q, sub, s0, seg, chunk_size, *_: core.chunkwise(q, sub, s0, seg, chunk_size), 5
)

# The backward of the chunkwise kernels, per platform: True, the backward kernels (gpu/chunk_bwd.py,
# tpu/chunk_bwd.py); False, the VJP of the plain-JAX chunk form, recomputed. Chosen by measurement: on an H200
# (B=4, T=4096, H=16, K=V=128, bf16; docs/performance.md, session 5) forward + backward took 6.37 / 9.98 ms
# (gated_delta_rule / kda) with the backward kernels against 8.58 / 12.90 ms with the plain-JAX VJP
# (`python -m experiments.benchmarks.pallas_variants --backward xla kernels`); session 6's kernels take 4.56 / 6.31
# ms (the XLA VJP was not re-timed). The TPU kernels are unmeasured.
BACKWARD_KERNELS = {"gpu": True, "tpu": True}


def chunkwise(q, sub, initial_state, segment_ids, chunk_size, interpret, platform="gpu", storage=None, keep=True):
    """`edarnn.core.chunkwise` through the Pallas kernels of `platform` ("gpu": Triton, "tpu": Mosaic TPU);
    interpret=True runs them in Pallas interpret mode on any backend (for checking). The backward is the
    platform's choice in BACKWARD_KERNELS. storage: the caller's 16-bit input dtype (e.g. jnp.bfloat16), in
    which the GPU kernels read q, x, y, z and store their intermediates; None (or a 32/64-bit dtype): float32.
    The GPU backward kernels recompute with the same storage (gpu/chunk_bwd.py).

    keep (GPU, backward kernels): the forward keeps its chunk states (chunk_fwd.ChunkStates: Aqk, W, U, T, the
    start states, X~ and exp(G_last); its solve then also writes T) for the backward, which then skips the pair,
    solve and state kernels; else it keeps only its inputs and the backward recomputes them. Kept by measurement
    (session 14, H200, B=4 T=4096 H=16 K=V=128 bf16, forward + backward with the forward live: kda 5.41 -> 4.42
    ms, gdn2 5.65 -> 4.65, gated_delta_rule 3.99 -> 3.26, eda 10.00 -> 8.00; the same compiled peak memory in a
    one-layer program). What keeping costs: about 330 KB per chunk and head for kda in bf16, alive from the
    forward to the backward; under rematerialisation that saves the rule's output it would run the forward
    kernels again (`edarnn.rules.recompute_chunk_states` turns it off there)."""
    storage = jnp.dtype(storage).name if storage is not None and jnp.dtype(storage).itemsize == 2 else None
    form = _chunk_forward if BACKWARD_KERNELS[platform] else _chunk_recomputed
    return form(q, sub, initial_state, segment_ids, chunk_size, interpret, platform, storage, keep)


def recurrent(q, sub, initial_state, segment_ids, interpret, platform="gpu"):
    """`edarnn.core.recurrent` through the token-by-token kernel of `platform` (decoding, short prefills)."""
    return _recurrent(q, sub, initial_state, segment_ids, interpret, platform)
