"""Backward of the chunkwise sub-step form as Pallas TPU kernels (Mosaic TPU).

The math and the kernels of `pallas_kernels.gpu.chunk_bwd` (its docstring has the formulas), with the TPU's
layout (head-major [B, H, T, D] inside, segment numbers as rows of lanes: `tpu.chunk_fwd.Segments`) and state
pass:

0. recompute: Aqk, W, U and each chunk's start state S_n (`tpu.chunk_fwd.chunk_states`).
1. `value_grad` (grid B x H x N x V/BV, parallel; body in pallas_kernels.tiles): P_n^T dO_n, P = Aqk.
2. `state_grad` (grid B x H x V/BV x N, the chunk axis "arbitrary" and walked backwards by the index maps, dS
   [K, BV] in a VMEM scratch buffer): dU_n and dS_n; stores dU_n and dS_{n+1}, and dS_0.
3. `chunk_grad` (grid B x H x N, parallel; body in pallas_kernels.tiles): dq, dx, dy, dz, dgq, dgcum.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tiles import (
    BLOCK_TOKENS,
    chunk_grad_kernel,
    dot,
    in_segment,
    row,
    segment_column,
    segment_number,
    value_grad_kernel,
)
from pallas_kernels.tpu.chunk_fwd import (
    chunk_segments,
    chunk_states,
    decay_rows,
    head_major,
    mosaic_call,
    segment_specs,
    tile_spec,
    value_block,
)


def _state_grad_kernel(*refs, has_erase, has_segments):
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    du_local_ref, q_ref, gq_ref, x_ref, g_ref = take(), take(), take(), take(), take()
    w_ref, do_ref, d_final_ref = take(has_erase), take(), take()
    seg_ref, seg_q_ref, prev_ref = take(has_segments), take(has_segments), take(has_segments)
    du_ref, d_ends_ref, d_initial_ref, d_state_ref = refs
    step = pl.program_id(3)  # chunk N - 1 - step

    @pl.when(step == 0)
    def _():
        d_state_ref[...] = d_final_ref[...].astype(jnp.float32)

    d_state = d_state_ref[...]
    x, g = x_ref[...].astype(jnp.float32), g_ref[...]
    g_last = row(g, g.shape[0] - 1)  # [1, D]
    q_decayed = q_ref[...].astype(jnp.float32) * jnp.exp(gq_ref[...])
    decay_to_end, state_decayed = jnp.exp(g_last - g), decay_rows(g_last, d_state)
    if has_segments:  # the forward's masks (tpu.chunk_fwd._state_kernel, tiles.output_kernel)
        seg_prev = segment_number(prev_ref)
        seg_last = segment_number(seg_ref, pl.ds(g.shape[0] - 1, 1))
        decay_to_end = in_segment(decay_to_end, segment_column(seg_ref), seg_last)
        state_decayed = in_segment(state_decayed, seg_last, seg_prev)
        q_decayed = in_segment(q_decayed, segment_column(seg_q_ref), seg_prev)
    d_ends_ref[...] = d_state
    du = du_local_ref[...] + dot(x * decay_to_end, d_state)
    du_ref[...] = du
    d_state = state_decayed + dot(q_decayed, do_ref[...], trans_a=True)
    if has_erase:
        d_state = d_state - dot(w_ref[...], du, trans_a=True)
    d_state_ref[...] = d_state

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        d_initial_ref[...] = d_state


def chunk_backward(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, d_o, d_final, *, chunk_size, interpret
):  # fmt: skip
    """Gradients of `tpu.chunk_fwd.chunk_forward` (same prepared [B, T, H, D] inputs and segment numbers) given
    d_o [B, T, H, V] and d_final [B, H, K, V]. Returns (dq, dgq, dx, dy, dz, dgcum, d_initial_state), float32,
    each shaped like its input (dy None when y is None)."""
    batch, length, heads, key = q.shape
    per_token = x.shape[1] // length
    rows, value, dim = per_token * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    block_tokens = min(BLOCK_TOKENS, chunk_size)
    block_v = value_block(value)
    has_erase, has_segments = y is not None, seg is not None
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    q, gq, x, y, z, gcum, d_o = (head_major(t) for t in (q, gq, x, y, z, gcum, d_o))
    segments = chunk_segments(seg, seg_q, seg_prev, n_chunks)
    scores, w, u, states, _ = chunk_states(
        q, gq, x, y, z, gcum, initial_state, segments, chunk_size=chunk_size, interpret=interpret
    )
    du_local = mosaic_call(
        value_grad_kernel,
        ("parallel",) * 4,
        interpret,
        grid=(batch, heads, n_chunks, value // block_v),
        in_specs=[tile_spec(chunk_size, rows, False, 4), tile_spec(chunk_size, block_v, True, 4)],
        out_specs=tile_spec(rows, block_v, True, 4),
        out_shape=f32(*z.shape),
    )(scores, d_o)

    def backwards(rows, width, v_block=False):
        """One chunk's rows on the grid (B, H, V/BV, N), the chunks taken last to first."""
        return pl.BlockSpec((None, None, rows, width), lambda b, h, j, n: (b, h, n_chunks - 1 - n, j if v_block else 0))

    state_spec = pl.BlockSpec((None, None, key, block_v), lambda b, h, j, n: (b, h, 0, j))
    du, d_ends, d_initial = mosaic_call(
        functools.partial(_state_grad_kernel, has_erase=has_erase, has_segments=has_segments),
        ("parallel", "parallel", "parallel", "arbitrary"),
        interpret,
        grid=(batch, heads, value // block_v, n_chunks),
        in_specs=[
            backwards(rows, block_v, True),
            backwards(chunk_size, key),
            backwards(chunk_size, dim),
            backwards(rows, key),
            backwards(rows, dim),
        ]
        + ([backwards(rows, key)] if has_erase else [])
        + [backwards(chunk_size, block_v, True), state_spec]
        + (segment_specs((rows, chunk_size, 1), lambda b, h, j, n: (b, n_chunks - 1 - n)) if has_segments else []),
        out_specs=[
            backwards(rows, block_v, True),
            pl.BlockSpec((None, None, None, key, block_v), lambda b, h, j, n: (b, h, n_chunks - 1 - n, 0, j)),
            state_spec,
        ],
        out_shape=[f32(*z.shape), f32(batch, heads, n_chunks, key, value), f32(batch, heads, key, value)],
        scratch_shapes=[pltpu.VMEM((key, block_v), jnp.float32)],
    )(
        *(t for t in (du_local, q, gq, x, gcum, w, d_o, d_final) if t is not None),
        *((segments.seg, segments.seg_q, segments.prev) if has_segments else ()),
    )

    state_spec = pl.BlockSpec((None, None, None, key, value), lambda b, h, n: (b, h, n, 0, 0))
    grads = mosaic_call(
        functools.partial(
            chunk_grad_kernel,
            block_tokens=block_tokens,
            per_token=per_token,
            block_v=block_v,
            has_erase=has_erase,
            has_segments=has_segments,
        ),
        ("parallel",) * 3,
        interpret,
        grid=(batch, heads, n_chunks),
        in_specs=[tile_spec(chunk_size, key), tile_spec(chunk_size, dim), tile_spec(rows, key)]
        + ([tile_spec(rows, key)] if has_erase else [])
        + [tile_spec(rows, dim), tile_spec(rows, value), tile_spec(rows, value), tile_spec(chunk_size, value)]
        + [state_spec, state_spec]
        + (segment_specs((chunk_size, rows, 1), lambda b, h, n: (b, n)) if has_segments else []),
        out_specs=[tile_spec(chunk_size, key), tile_spec(chunk_size, dim), tile_spec(rows, key)]
        + ([tile_spec(rows, key), tile_spec(rows, value)] if has_erase else [])
        + [tile_spec(rows, dim)],
        out_shape=[f32(*q.shape), f32(*gq.shape), f32(*x.shape)]
        + ([f32(*x.shape), f32(*z.shape)] if has_erase else [])
        + [f32(*gcum.shape)],
    )(
        *(t for t in (q, gq, x, y, gcum, u, du, d_o, states, d_ends) if t is not None),
        *((segments.seg_q, segments.seg, segments.prev) if has_segments else ()),
    )
    if has_erase:
        dq, dgq, dx, dy, dz, dgcum = grads
    else:  # U = Z: the values' gradient is dU
        (dq, dgq, dx, dgcum), dy, dz = grads, None, du
    return (*(head_major(t) for t in (dq, dgq, dx, dy, dz, dgcum)), d_initial)
