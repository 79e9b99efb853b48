"""Forward of the chunkwise sub-step form as Pallas TPU kernels (Mosaic TPU).

Reference: `edarnn.core.chunkwise`, on the inputs that `pallas_kernels.forms.prepare` makes. Three kernels:

1. `intra`  (grid B x H x N, all parallel; body in pallas_kernels.tiles): the query scores Aqk and (with an erase
   address) A, T = (I + A)^-1, W, U~ per chunk.
2. `state`  (grid B x H x V/BV x N, the chunk axis "arbitrary", i.e. sequential): the state [K, BV] lives in a
   VMEM scratch buffer across the chunk axis; per chunk U = U~ - W S, the chunk's start state, and the update.
3. `output` (grid B x H x N x V/BV, all parallel; body in pallas_kernels.tiles).

`chunk_states` (kernels 1 and 2) is also the backward's recompute (chunk_bwd.py).

Arrays are head-major, [B, H, T, D], so that every block's last two dimensions are (rows, width): rows a multiple
of 8, width the whole K or a multiple of 128 of V, as TPU tiling wants.

Segments (`Segments`): the running segment numbers of each chunk as one row of lanes, [B, N, 1, L] (sub-steps),
[B, N, 1, C] (tokens) and [B, N, 1, 1] (the number before the chunk), int32: blocks equal to the arrays' last
two dimensions, 4 L bytes of numbers per chunk (one (8, 128) tile at most, shared by the heads). The kernels
turn a row into the column they mask rows with by a masked lane reduction (`tiles.segment_column`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tiles import (
    BLOCK_TOKENS,
    dot,
    in_segment,
    intra_kernel,
    output_kernel,
    row,
    segment_column,
    segment_number,
)


class Segments(NamedTuple):
    """Running segment numbers per chunk, int32: seg [B, N, 1, L] of the sub-steps, seg_q [B, N, 1, C] of the
    tokens, prev [B, N, 1, 1] the number before each chunk (see `pallas_kernels.forms.prepare`)."""

    seg: jax.Array
    seg_q: jax.Array
    prev: jax.Array


def chunk_segments(seg, seg_q, seg_prev, n_chunks):
    """`Segments` from forms.prepare's seg [B, T P], seg_q [B, T], seg_prev [B, N]; None without segments."""
    if seg is None:
        return None
    per_chunk = lambda t: t.reshape(t.shape[0], n_chunks, 1, -1)  # noqa: E731
    return Segments(per_chunk(seg), per_chunk(seg_q), per_chunk(seg_prev))


def segment_specs(widths, chunk_index):
    """BlockSpecs of one chunk's [1, width] segment numbers; chunk_index(*grid indices) -> (b, n)."""
    return [pl.BlockSpec((None, None, 1, w), lambda *ids: (*chunk_index(*ids), 0, 0)) for w in widths]


def decay_rows(g_last, state):
    """Diag(exp g_last) S for g_last [1, D], state [K, BV]; channel-wise as a product with a diagonal matrix (no
    transpose of the [1, K] row)."""
    if g_last.shape[1] == 1:
        return jnp.exp(g_last) * state
    eye = jax.lax.broadcasted_iota(jnp.int32, (g_last.shape[1],) * 2, 0) == jax.lax.broadcasted_iota(
        jnp.int32, (g_last.shape[1],) * 2, 1
    )
    return dot(jnp.where(eye, jnp.exp(g_last), 0.0), state)


def _state_kernel(*refs, has_erase, has_segments):
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    u_tilde_ref, w_ref, x_ref, g_ref, s0_ref = take(), take(has_erase), take(), take(), take()
    seg_ref, prev_ref = take(has_segments), take(has_segments)
    u_ref, start_ref, final_ref, state_ref = refs
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...].astype(jnp.float32)

    state = state_ref[...]
    x, g = x_ref[...].astype(jnp.float32), g_ref[...]
    u = u_tilde_ref[...].astype(jnp.float32)
    if has_erase:
        u = u - dot(w_ref[...].astype(jnp.float32), state)
    u_ref[...] = u
    start_ref[...] = state
    g_last = row(g, g.shape[0] - 1)  # [1, D]
    decay_to_end, state_decayed = jnp.exp(g_last - g), decay_rows(g_last, state)
    if has_segments:  # rows before the chunk's last segment do not reach its end; a reset inside drops S
        seg_last = segment_number(seg_ref, pl.ds(g.shape[0] - 1, 1))
        decay_to_end = in_segment(decay_to_end, segment_column(seg_ref), seg_last)
        state_decayed = in_segment(state_decayed, seg_last, segment_number(prev_ref))
    new_state = state_decayed + dot(x * decay_to_end, u, trans_a=True)
    state_ref[...] = new_state

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        final_ref[...] = new_state


def mosaic_call(kernel, semantics, interpret, **kwargs):
    """pl.pallas_call with Mosaic TPU dimension semantics; interpret=True runs the TPU interpreter."""
    params = pltpu.CompilerParams(dimension_semantics=semantics)
    return pl.pallas_call(
        kernel, interpret=pltpu.InterpretParams() if interpret else False, compiler_params=params, **kwargs
    )


def tile_spec(rows, width, v_block=False, grid_rank=3):
    """One chunk's rows of a head-major [B, H, T', ...] array; grids (B, H, N), (B, H, N, V/BV) or (B, H, V/BV, N)
    (grid_rank 3, 4, 5); v_block: the last axis is cut in blocks of `width`, the grid's V index picks one."""
    if grid_rank == 3:
        return pl.BlockSpec((None, None, rows, width), lambda b, h, n: (b, h, n, 0))
    if grid_rank == 4:
        return pl.BlockSpec((None, None, rows, width), lambda b, h, n, j: (b, h, n, j if v_block else 0))
    return pl.BlockSpec((None, None, rows, width), lambda b, h, j, n: (b, h, n, j if v_block else 0))


def value_block(value):
    """Width of the V blocks: the 128 lanes, or the whole V when it is not a multiple of 128."""
    return 128 if value % 128 == 0 else value


def chunk_states(q, gq, x, y, z, gcum, initial_state, segments, *, chunk_size, interpret):
    """The intra and state kernels on head-major prepared inputs ([B, H, T (P), D]) and `Segments` (or None).
    Returns (scores
    [B, H, T, C P] f32, each token's query scores against its chunk's sub-steps; w [B, H, T P, K] f32, None
    without an erase address; u [B, H, T P, V] f32; states [B, H, N, K, V] f32, each chunk's start state;
    final_state [B, H, K, V] f32)."""
    batch, heads, length, key = q.shape
    per_token = x.shape[2] // length
    rows, value, dim = per_token * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    block_tokens = min(BLOCK_TOKENS, chunk_size)
    block_v = value_block(value)
    has_erase, has_segments = y is not None, segments is not None
    f32 = jnp.float32

    intra_outs = mosaic_call(
        functools.partial(
            intra_kernel,
            block_tokens=block_tokens,
            per_token=per_token,
            has_erase=has_erase,
            has_segments=has_segments,
        ),
        ("parallel", "parallel", "parallel"),
        interpret,
        grid=(batch, heads, n_chunks),
        in_specs=[tile_spec(chunk_size, key), tile_spec(chunk_size, dim), tile_spec(rows, key), tile_spec(rows, dim)]
        + ([tile_spec(rows, key), tile_spec(rows, value)] if has_erase else [])
        + (segment_specs((chunk_size, rows, 1), lambda b, h, n: (b, n)) if has_segments else []),
        out_specs=[tile_spec(chunk_size, rows)] + ([tile_spec(rows, key), tile_spec(rows, value)] if has_erase else []),
        out_shape=[jax.ShapeDtypeStruct((batch, heads, length, rows), f32)]
        + ([jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(z.shape, f32)] if has_erase else []),
    )(
        q,
        gq,
        x,
        gcum,
        *((y, z) if has_erase else ()),
        *((segments.seg_q, segments.seg, segments.prev) if has_segments else ()),
    )
    scores, w, u_tilde = intra_outs if has_erase else (intra_outs[0], None, z)

    state_spec = pl.BlockSpec((None, None, key, block_v), lambda b, h, j, n: (b, h, 0, j))
    u, states, final_state = mosaic_call(
        functools.partial(_state_kernel, has_erase=w is not None, has_segments=has_segments),
        ("parallel", "parallel", "parallel", "arbitrary"),
        interpret,
        grid=(batch, heads, value // block_v, n_chunks),
        in_specs=[tile_spec(rows, block_v, True, 5)]
        + ([tile_spec(rows, key, False, 5)] if w is not None else [])
        + [tile_spec(rows, key, False, 5), tile_spec(rows, dim, False, 5), state_spec]
        + (segment_specs((rows, 1), lambda b, h, j, n: (b, n)) if has_segments else []),
        out_specs=[
            tile_spec(rows, block_v, True, 5),
            pl.BlockSpec((None, None, None, key, block_v), lambda b, h, j, n: (b, h, n, 0, j)),
            state_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct(z.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, n_chunks, key, value), f32),
            jax.ShapeDtypeStruct((batch, heads, key, value), f32),
        ],
        scratch_shapes=[pltpu.VMEM((key, block_v), f32)],
    )(
        *(t for t in (u_tilde, w, x, gcum) if t is not None),
        initial_state,
        *((segments.seg, segments.prev) if has_segments else ()),
    )
    return scores, w, u, states, final_state


def head_major(t):
    """[B, T, H, D] <-> [B, H, T, D] (None stays None)."""
    return None if t is None else jnp.swapaxes(t, 1, 2)


def chunk_forward(q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, *, chunk_size, interpret):
    """Chunkwise forward on prepared, padded [B, T, H, D] inputs and segment numbers (or None), as
    `pallas_kernels.gpu.chunk_fwd.chunk_forward`. Returns (o [B, T, H, V] f32, final_state [B, H, K, V] f32)."""
    batch, length, heads, key = q.shape
    rows, value, dim = x.shape[1] // length * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    block_v = value_block(value)
    q, gq, x, y, z, gcum = (head_major(t) for t in (q, gq, x, y, z, gcum))
    segments = chunk_segments(seg, seg_q, seg_prev, n_chunks)
    scores, _, u, states, final_state = chunk_states(
        q, gq, x, y, z, gcum, initial_state, segments, chunk_size=chunk_size, interpret=interpret
    )
    has_segments = segments is not None
    o = mosaic_call(
        functools.partial(output_kernel, has_segments=has_segments),
        ("parallel", "parallel", "parallel", "parallel"),
        interpret,
        grid=(batch, heads, n_chunks, value // block_v),
        in_specs=[
            tile_spec(chunk_size, key, False, 4),
            tile_spec(chunk_size, dim, False, 4),
            tile_spec(chunk_size, rows, False, 4),
            tile_spec(rows, block_v, True, 4),
            pl.BlockSpec((None, None, None, key, block_v), lambda b, h, n, j: (b, h, n, 0, j)),
        ]
        + (segment_specs((chunk_size, 1), lambda b, h, n, j: (b, n)) if has_segments else []),
        out_specs=tile_spec(chunk_size, block_v, True, 4),
        out_shape=jax.ShapeDtypeStruct((batch, heads, length, value), jnp.float32),
    )(q, gq, scores, u, states, *((segments.seg_q, segments.prev) if has_segments else ()))
    return head_major(o), final_state
