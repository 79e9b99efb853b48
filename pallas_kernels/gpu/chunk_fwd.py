"""Forward of the chunkwise sub-step form as Pallas GPU kernels (Triton lowering).

Reference: `edarnn.core.chunkwise`; these kernels take the same prepared inputs and must give the same result
to float32 rounding. Three kernels, one generic body each, specialised by static flags (scalar or channel-wise
decay, with or without an erase address y, with or without segments):

1. `intra`  (grid B x H x N, parallel): per chunk, A = pair scores of y and x, T = (I + A)^-1 by forward
   substitution, W = T (Y * exp G) and U~ = T Z.
2. `state`  (grid B x H x V/BV, sequential over chunks inside): U = U~ - W S, the chunk's start state S, and
   S <- Diag(exp G_last) S + (X * exp(G_last - G))^T U, with S in registers.
3. `output` (grid B x H x N, parallel): O = (Q * exp Gq) S + (scores of q and x, causal) U.

Inside a kernel every tile is a whole [rows, D] block: no slicing of values (Triton has none), masks instead.
Shapes below: L = C P sub-step rows per chunk of C tokens, D = 1 (scalar decay) or K.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

SUBCHUNK = 16  # rows referenced to one point in the channel-wise factorisation (as edarnn.core.SUBCHUNK)


def _dot(a, b, trans_b=False):
    """a @ b (or a @ b^T) accumulated in float32."""
    if trans_b:
        return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _row(mat, i):
    """Row i of mat [R, D] as [D] (a masked sum: register tiles cannot be indexed)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, mat.shape, 0)
    return jnp.sum(jnp.where(rows == i, mat, 0.0), axis=0)


def _rows_at(g, ref_pos, starts):
    """g's rows at per-row reference positions: g [L, D], ref_pos [R, 1] int (one of `starts`) -> [R, D]."""
    out = jnp.zeros((ref_pos.shape[0], g.shape[1]), jnp.float32)
    for p in starts:
        out = jnp.where(ref_pos == p, _row(g, p)[None, :], out)
    return out


def pair_scores_tile(a, ga, pos_a, b, gb, mask):
    """M[r, s] = sum_k a[r, k] b[s, k] exp(ga[r, k] - gb[s, k]) where mask[r, s], else 0 (edarnn.core.pair_scores).

    a [R, K], ga [R, D] at sub-step positions pos_a [R, 1]; b [L, K], gb [L, D] at positions 0 .. L-1; mask [R, L].
    Channel-wise decays by halving, as in the reference, but each level is one full [R, L] product of masked,
    rescaled operands (every factor <= 1, or within half a sub-chunk of decay on the diagonal blocks).
    """
    rows, cols = a.shape[0], b.shape[0]
    if gb.shape[1] == 1:  # scalar decay: exact, one exponent per pair
        expo = jnp.where(mask, ga - gb.reshape(1, cols), -jnp.inf)
        return jnp.where(mask, _dot(a, b, trans_b=True) * jnp.exp(expo), 0.0)
    pos_b = jax.lax.broadcasted_iota(jnp.int32, (cols, 1), 0)
    total = jnp.zeros((rows, cols), jnp.float32)
    size = cols
    while size > SUBCHUNK:
        half = size // 2
        starts = [m * size + half - 1 for m in range(cols // size)]
        ref_a = _rows_at(gb, (pos_a // size) * size + half - 1, starts)
        ref_b = _rows_at(gb, (pos_b // size) * size + half - 1, starts)
        a_l = jnp.where(pos_a % size >= half, a * jnp.exp(jnp.minimum(ga - ref_a, 0.0)), 0.0)
        b_l = jnp.where(pos_b % size < half, b * jnp.exp(jnp.minimum(ref_b - gb, 0.0)), 0.0)
        same_block = (pos_a // size) == (pos_b // size).reshape(1, cols)
        total = total + jnp.where(same_block, _dot(a_l, b_l, trans_b=True), 0.0)
        size = half
    middles = [m * size + size // 2 for m in range(cols // size)]
    ref_a = _rows_at(gb, (pos_a // size) * size + size // 2, middles)
    ref_b = _rows_at(gb, (pos_b // size) * size + size // 2, middles)
    diag = _dot(a * jnp.exp(ga - ref_a), b * jnp.exp(ref_b - gb), trans_b=True)
    same_block = (pos_a // size) == (pos_b // size).reshape(1, cols)
    total = total + jnp.where(same_block, diag, 0.0)
    return jnp.where(mask, total, 0.0)


def unit_lower_inverse_tile(a):
    """(I + a)^-1 for strictly lower-triangular a [L, L], by forward substitution, one row per step."""
    size = a.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)

    def substitute(i, t):
        unit = jnp.where(jax.lax.broadcasted_iota(jnp.int32, (size,), 0) == i, 1.0, 0.0)
        new_row = unit - jnp.sum(_row(a, i)[:, None] * t, axis=0)
        return jnp.where(rows == i, new_row[None, :], t)

    return jax.lax.fori_loop(1, size, substitute, (rows == cols).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


def _segment_masks(seg_ref, prev_ref, rows):
    """seg [rows, 1] running segment numbers of the tile, and whether each row still sees the incoming state."""
    seg = seg_ref[...].reshape(rows, 1)
    return seg, seg == jnp.sum(prev_ref[...])


def _intra_kernel(x_ref, y_ref, z_ref, g_ref, *refs, has_segments):
    seg_ref, prev_ref, w_ref, u_ref = refs if has_segments else (None, None, *refs)
    x, y, z, g = (r[...].astype(jnp.float32) for r in (x_ref, y_ref, z_ref, g_ref))
    rows = x.shape[0]
    pos = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    mask = pos > pos.reshape(1, rows)
    if has_segments:
        seg, carry_in = _segment_masks(seg_ref, prev_ref, rows)
        mask = mask & (seg == seg.reshape(1, rows))
    t = unit_lower_inverse_tile(pair_scores_tile(y, g, pos, x, g, mask))
    w = _dot(t, y * jnp.exp(g))
    if has_segments:
        w = jnp.where(carry_in, w, 0.0)
    w_ref[...] = w
    u_ref[...] = _dot(t, z)


def _state_kernel(*refs, rows, n_chunks, has_erase, has_segments):
    refs = list(refs)
    u_tilde_ref = refs.pop(0)
    w_ref = refs.pop(0) if has_erase else None
    x_ref, g_ref, s0_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    seg_ref, prev_ref = (refs.pop(0), refs.pop(0)) if has_segments else (None, None)
    u_ref, states_ref, final_ref = refs
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = u_ref.shape[-1] // pl.num_programs(2)
    vs = pl.ds(j * block_v, block_v)

    def chunk(n, state):
        ts = pl.ds(n * rows, rows)
        x, g = x_ref[b, ts, h, :].astype(jnp.float32), g_ref[b, ts, h, :]
        u = u_tilde_ref[b, ts, h, vs].astype(jnp.float32)
        if has_erase:
            u = u - _dot(w_ref[b, ts, h, :], state)
        g_last = g_ref[b, n * rows + rows - 1, h, :].reshape(1, -1)
        decay_to_end = jnp.exp(g_last - g)
        state_decay = jnp.exp(g_last).reshape(-1, 1)
        if has_segments:
            seg = seg_ref[b, ts].reshape(rows, 1)
            seg_last = seg_ref[b, n * rows + rows - 1]
            decay_to_end = jnp.where(seg == seg_last, decay_to_end, 0.0)
            state_decay = jnp.where(seg_last == prev_ref[b, n], state_decay, 0.0)
        u_ref[b, ts, h, vs] = u
        states_ref[b, h, n, :, vs] = state
        return state_decay * state + _dot((x * decay_to_end).T, u)

    final_ref[b, h, :, vs] = jax.lax.fori_loop(0, n_chunks, chunk, s0_ref[b, h, :, vs].astype(jnp.float32))


def _output_kernel(q_ref, gq_ref, x_ref, g_ref, u_ref, s_ref, *refs, per_token, has_segments):
    seg_q_ref, seg_ref, prev_ref, o_ref = refs if has_segments else (None, None, None, *refs)
    q, gq, x, g, u, s = (r[...].astype(jnp.float32) for r in (q_ref, gq_ref, x_ref, g_ref, u_ref, s_ref))
    tokens, rows = q.shape[0], x.shape[0]
    pos_q = jax.lax.broadcasted_iota(jnp.int32, (tokens, 1), 0) * per_token + per_token - 1
    mask = pos_q >= jax.lax.broadcasted_iota(jnp.int32, (1, rows), 1)
    q_decayed = q * jnp.exp(gq)
    if has_segments:
        seg_q, carry_in = _segment_masks(seg_q_ref, prev_ref, tokens)
        mask = mask & (seg_q == seg_ref[...].reshape(1, rows))
        q_decayed = jnp.where(carry_in, q_decayed, 0.0)
    scores = pair_scores_tile(q, gq, pos_q, x, g, mask)
    o_ref[...] = (_dot(q_decayed, s) + _dot(scores, u)).astype(o_ref.dtype)


# ----------------------------------------------------------------------------------------------------------
# the forward on prepared inputs
# ----------------------------------------------------------------------------------------------------------


def _tile(rows, width):
    """BlockSpec of one chunk's rows of a [B, T', H, width] array, on the grid (B, H, N)."""
    return pl.BlockSpec((None, rows, None, width), lambda b, h, n: (b, n, h, 0))


def chunk_forward(q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, *, chunk_size, interpret, block_v=64):
    """Chunkwise forward on prepared, padded inputs (see pallas_kernels.chunk.prepare).

    q [B, T, H, K] (scaled), gq [B, T, H, D] (the chunk-local cumulative log-decay each query sees), x, y
    [B, T P, H, K] (y may be None), z [B, T P, H, V], gcum [B, T P, H, D] (chunk-local cumulative log-decay),
    initial_state [B, H, K, V] f32; seg [B, T P] int32 running segment numbers of the sub-steps, seg_q [B, T]
    those of the tokens and seg_prev [B, N] the number before each chunk, or all three None. T is a multiple
    of chunk_size.
    Returns (o [B, T, H, V] f32, final_state [B, H, K, V] f32).
    """
    batch, length, heads, key = q.shape
    rows, value, dim = x.shape[1] // length * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    has_segments = seg is not None
    seg_inputs = (seg, seg_prev) if has_segments else ()
    f32 = jnp.float32
    params = plt.CompilerParams(num_warps=4, num_stages=1)
    call = functools.partial(pl.pallas_call, interpret=interpret, compiler_params=params)
    seg_specs = [pl.BlockSpec((None, rows), lambda b, h, n: (b, n)), pl.BlockSpec((None, 1), lambda b, h, n: (b, n))]

    if y is None:
        u_tilde, w = z, None
    else:
        w, u_tilde = call(
            functools.partial(_intra_kernel, has_segments=has_segments),
            grid=(batch, heads, n_chunks),
            in_specs=[_tile(rows, key), _tile(rows, key), _tile(rows, value), _tile(rows, dim)]
            + (seg_specs if has_segments else []),
            out_specs=[_tile(rows, key), _tile(rows, value)],
            out_shape=[jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(z.shape, f32)],
        )(x, y, z, gcum, *seg_inputs)

    block_v = min(block_v, value)
    u, states, final_state = call(
        functools.partial(
            _state_kernel, rows=rows, n_chunks=n_chunks, has_erase=w is not None, has_segments=has_segments
        ),
        grid=(batch, heads, value // block_v),
        out_shape=[
            jax.ShapeDtypeStruct(z.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, n_chunks, key, value), f32),
            jax.ShapeDtypeStruct((batch, heads, key, value), f32),
        ],
    )(*(t for t in (u_tilde, w, x, gcum, initial_state) if t is not None), *seg_inputs)

    o = call(
        functools.partial(_output_kernel, per_token=rows // chunk_size, has_segments=has_segments),
        grid=(batch, heads, n_chunks),
        in_specs=[
            _tile(chunk_size, key),
            _tile(chunk_size, dim),
            _tile(rows, key),
            _tile(rows, dim),
            _tile(rows, value),
            pl.BlockSpec((None, None, None, key, value), lambda b, h, n: (b, h, n, 0, 0)),
        ]
        + ([pl.BlockSpec((None, chunk_size), lambda b, h, n: (b, n)), *seg_specs] if has_segments else []),
        out_specs=_tile(chunk_size, value),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, value), f32),
    )(q, gq, x, gcum, u, states, *((seg_q, *seg_inputs) if has_segments else ()))
    return o, final_state
