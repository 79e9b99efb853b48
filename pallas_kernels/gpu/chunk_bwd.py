"""Backward of the chunkwise sub-step form as Pallas GPU kernels (Triton lowering).

Reference: the VJP of `edarnn.core.chunkwise`, taken on the prepared inputs of `chunk_fwd.chunk_forward` (the
per-token decay's gradient, a reverse cumulative sum inside each chunk, is JAX's autodiff of
`pallas_kernels.forms.prepare`). Given the cotangents dO of the output and dS_N of the final state:

0. recompute: Aqk, W, U and each chunk's start state S_n by the forward's intra and state kernels
   (`chunk_fwd.chunk_states`); the forward keeps nothing but its inputs.
1. `value_grad` (grid B x H x N x V/BV, parallel; body in pallas_kernels.tiles): P_n^T dO_n, the values'
   gradient through the chunk's own queries (P = Aqk, the masked query scores the recompute returns).
2. `state_grad` (grid B x H x V/BV, sequential over the chunks in reverse inside, dS in registers):
       dU_n = P_n^T dO_n + (X exp(G_last - G))_n dS_{n+1}
       dS_n = Diag(exp G_last) dS_{n+1} + (Q exp Gq)_n^T dO_n - W_n^T dU_n
   storing dU_n and dS_{n+1}; dS_0 is the initial state's gradient.
3. `chunk_grad` (grid B x H x N, parallel; body in pallas_kernels.tiles): per chunk, from S_n, dS_{n+1}, dO_n,
   U_n and dU_n, with T = (I + A)^-1 recomputed: the gradients of q, x, y, z and of the chunk-local cumulative
   log-decays gq and gcum.

Segment masks are the forward's. Arrays keep the public [B, T, H, D] layout, as in chunk_fwd.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu.chunk_fwd import chunk_states, segment_specs, tile_spec, triton_call
from pallas_kernels.tiles import BLOCK_TOKENS, chunk_grad_kernel, dot, end_decays, in_segment, value_grad_kernel


class Config(NamedTuple):
    """Launch parameters of the backward kernels (to be chosen by measurement)."""

    value_grad_warps: int = 4
    state_grad_warps: int = 4
    chunk_grad_warps: int = 4
    value_grad_block_v: int = 64
    state_grad_block_v: int = 64
    chunk_grad_block_v: int = 64  # the V blocks of the in-kernel loop


DEFAULT_CONFIG = Config()


def _state_grad_kernel(*refs, chunk_size, per_token, n_chunks, has_erase, has_segments):
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    du_local_ref, q_ref, gq_ref, x_ref, g_ref = take(), take(), take(), take(), take()
    w_ref, do_ref, d_final_ref = take(has_erase), take(), take()
    seg_ref, seg_q_ref, prev_ref = take(has_segments), take(has_segments), take(has_segments)
    du_ref, d_ends_ref, d_initial_ref = refs
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = du_ref.shape[-1] // pl.num_programs(2)
    vs = pl.ds(j * block_v, block_v)
    rows = chunk_size * per_token

    def chunk(i, d_state):
        n = n_chunks - 1 - i
        ts, qs = pl.ds(n * rows, rows), pl.ds(n * chunk_size, chunk_size)
        x, g = x_ref[b, ts, h, :].astype(jnp.float32), g_ref[b, ts, h, :]
        g_last = g_ref[b, n * rows + rows - 1, h, :].reshape(1, -1)
        q_decayed = q_ref[b, qs, h, :].astype(jnp.float32) * jnp.exp(gq_ref[b, qs, h, :])
        segs = ()
        if has_segments:
            segs = (seg_ref[b, ts].reshape(rows, 1), seg_ref[b, n * rows + rows - 1], prev_ref[b, n])
            q_decayed = in_segment(q_decayed, seg_q_ref[b, qs].reshape(chunk_size, 1), prev_ref[b, n])
        decay_to_end, state_decay = end_decays(g, g_last, *segs)
        d_ends_ref[b, h, n, :, vs] = d_state
        du = du_local_ref[b, ts, h, vs] + dot(x * decay_to_end, d_state)
        du_ref[b, ts, h, vs] = du
        d_state = state_decay * d_state + dot(q_decayed, do_ref[b, qs, h, vs], trans_a=True)
        if has_erase:
            d_state = d_state - dot(w_ref[b, ts, h, :], du, trans_a=True)
        return d_state

    d_final = d_final_ref[b, h, :, vs].astype(jnp.float32)
    d_initial_ref[b, h, :, vs] = jax.lax.fori_loop(0, n_chunks, chunk, d_final)


def chunk_backward(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, d_o, d_final, *, chunk_size, interpret,
    config=DEFAULT_CONFIG,
):  # fmt: skip
    """Gradients of `chunk_fwd.chunk_forward` (same prepared inputs) given d_o [B, T, H, V] and d_final
    [B, H, K, V], the cotangents of its output and final state.

    Returns (dq, dgq, dx, dy, dz, dgcum, d_initial_state), float32, each shaped like its input (dy None when y
    is None)."""
    batch, length, heads, key = q.shape
    per_token = x.shape[1] // length
    rows, value, dim = per_token * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    block_tokens = min(BLOCK_TOKENS, chunk_size)
    has_erase, has_segments = y is not None, seg is not None
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    scores, w, u, states, _ = chunk_states(
        q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, chunk_size=chunk_size, interpret=interpret
    )

    block_v = min(config.value_grad_block_v, value)
    du_local = triton_call(
        value_grad_kernel,
        config.value_grad_warps,
        interpret,
        grid=(batch, heads, n_chunks, value // block_v),
        in_specs=[tile_spec(chunk_size, rows, 4), tile_spec(chunk_size, block_v, 4, v_block=True)],
        out_specs=tile_spec(rows, block_v, 4, v_block=True),
        out_shape=f32(*z.shape),
    )(scores, d_o)

    du, d_ends, d_initial = triton_call(
        functools.partial(
            _state_grad_kernel,
            chunk_size=chunk_size,
            per_token=per_token,
            n_chunks=n_chunks,
            has_erase=has_erase,
            has_segments=has_segments,
        ),
        config.state_grad_warps,
        interpret,
        grid=(batch, heads, value // min(config.state_grad_block_v, value)),
        out_shape=[f32(*z.shape), f32(batch, heads, n_chunks, key, value), f32(batch, heads, key, value)],
    )(
        *(t for t in (du_local, q, gq, x, gcum, w, d_o, d_final) if t is not None),
        *((seg, seg_q, seg_prev) if has_segments else ()),
    )

    state_spec = pl.BlockSpec((None, None, None, key, value), lambda b, h, n: (b, h, n, 0, 0))
    grads = triton_call(
        functools.partial(
            chunk_grad_kernel,
            block_tokens=block_tokens,
            per_token=per_token,
            block_v=min(config.chunk_grad_block_v, value),
            has_erase=has_erase,
            has_segments=has_segments,
        ),
        config.chunk_grad_warps,
        interpret,
        grid=(batch, heads, n_chunks),
        in_specs=[tile_spec(chunk_size, key), tile_spec(chunk_size, dim), tile_spec(rows, key)]
        + ([tile_spec(rows, key)] if has_erase else [])
        + [tile_spec(rows, dim), tile_spec(rows, value), tile_spec(rows, value), tile_spec(chunk_size, value)]
        + [state_spec, state_spec]
        + (segment_specs(3, chunk_size, rows, 1) if has_segments else []),
        out_specs=[tile_spec(chunk_size, key), tile_spec(chunk_size, dim), tile_spec(rows, key)]
        + ([tile_spec(rows, key), tile_spec(rows, value)] if has_erase else [])
        + [tile_spec(rows, dim)],
        out_shape=[f32(*q.shape), f32(*gq.shape), f32(*x.shape)]
        + ([f32(*x.shape), f32(*z.shape)] if has_erase else [])
        + [f32(*gcum.shape)],
    )(
        *(t for t in (q, gq, x, y, gcum, u, du, d_o, states, d_ends) if t is not None),
        *((seg_q, seg, seg_prev) if has_segments else ()),
    )
    if has_erase:
        dq, dgq, dx, dy, dz, dgcum = grads
    else:  # U = Z: the values' gradient is dU
        (dq, dgq, dx, dgcum), dy, dz = grads, None, du
    return dq, dgq, dx, dy, dz, dgcum, d_initial
