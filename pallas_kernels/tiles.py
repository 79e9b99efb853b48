"""Kernel bodies shared by the GPU (Triton) and TPU (Mosaic) Pallas kernels of the chunkwise form, forward and
backward.

Reference: `edarnn.core.chunkwise` (and, for the backward bodies, its VJP). Written with what both lowerings
take: whole tiles loaded from refs by static row blocks, element-wise ops, masks, masked reductions and 2-D
products (no slicing of values, no gathers). The per-backend modules (`gpu/chunk_fwd.py`, `gpu/chunk_bwd.py`,
`tpu/chunk_fwd.py`) choose layouts, grids and the sequential state passes.

A chunk's rows are handled in blocks of BLOCK_TOKENS tokens (BLOCK_TOKENS * P sub-step rows): A, T and the
scores are built block by block. Channel-wise decays are referenced per block pair, as in
`edarnn.core.pair_scores`: a diagonal block to its middle row (every exponent within half a block of decay), a
block pair (i > j) to the last row of block j (every factor <= 1). Shapes: L = C P rows per chunk of C tokens,
c = BLOCK_TOKENS P rows per block, D = 1 (scalar decay) or K.

Segment numbers (int32) lie along a ref's last axis: 1-D blocks [L] on the GPU, [1, L] blocks on the TPU (whose
tiling takes blocks of at least two dimensions, and lays a [1, L] block along lanes); `segment_column` and
`segment_row` read both.
"""

import collections
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_TOKENS = 16  # tokens per block inside a chunk: the smallest tile a Triton dot takes


def dot(a, b, trans_a=False, trans_b=False):
    """a @ b with either operand transposed, accumulated in float32. Operands of one dtype are taken as they are
    (two 16-bit tiles as stored: the 16-bit matrix units, and exact, since their products are exact in float32),
    mixed dtypes are both cast to float32 first."""
    if a.dtype != b.dtype:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def row(mat, i):
    """Row i of mat [R, D] as [1, D] (a masked sum: register tiles cannot be indexed)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, mat.shape, 0)
    return jnp.sum(jnp.where(rows == i, mat, 0.0), axis=0, keepdims=True)


def iota(n, axis=0):
    """[n, 1] (axis 0) or [1, n] (axis 1) int32 positions."""
    return jax.lax.broadcasted_iota(jnp.int32, (n, 1) if axis == 0 else (1, n), axis)


def block_scores(a, ga, b, gb, mask, diagonal):
    """S[r, s] = sum_k a[r, k] b[s, k] exp(ga[r, k] - gb[s, k]) where mask, else 0, for one block pair.

    a [m, K], ga [m, D] (rows of block i); b [c, K], gb [c, D] (rows of block j <= i); mask [m, c]. Scalar decay
    (D = 1): exact, one exponent per pair. Channel-wise: referenced to gb's middle row (diagonal) or last row."""
    if gb.shape[1] == 1:
        expo = jnp.where(mask, ga - gb.reshape(1, -1), -jnp.inf)
        return jnp.where(mask, dot(a, b, trans_b=True) * jnp.exp(expo), 0.0)
    ref = block_reference(gb, diagonal)
    scores = dot(a * jnp.exp(ga - ref), b * jnp.exp(ref - gb), trans_b=True)
    return jnp.where(mask, scores, 0.0)


def block_reference(gb, diagonal):
    """[1, D]: the row of key block gb [c, D] that a block pair's decays are referenced to: the middle row on the
    diagonal, the last row below it. diagonal: a Python bool, or a traced bool (a block pair picked by a grid
    axis)."""
    middle, last = gb.shape[0] // 2, gb.shape[0] - 1
    if isinstance(diagonal, bool):
        return row(gb, middle if diagonal else last)
    # a select of two static rows: the Triton lowering (jax 0.11) mis-types a row index selected by a traced bool
    return jnp.where(diagonal, row(gb, middle), row(gb, last))


def block_scores_grad(a, ga, b, gb, d_scores, mask, diagonal, side=None):
    """(da, db): the gradients of sum(d_scores * block_scores(a, ga, b, gb, mask, diagonal)) w.r.t. a and b;
    side "a" or "b": only that one (one product instead of two).

    With M_rs = sum_k a_rk b_sk exp(ga_rk - gb_sk), the log-decays' gradients are d ga = a da and d gb = -b db
    (summed over channels by `decay_width` for D = 1); the exponents are block_scores', so bounded the same way."""
    if gb.shape[1] == 1:
        expo = jnp.where(mask, ga - gb.reshape(1, -1), -jnp.inf)
        d = jnp.where(mask, d_scores * jnp.exp(expo), 0.0)
        da = lambda: dot(d, b)  # noqa: E731
        db = lambda: dot(d, a, trans_a=True)  # noqa: E731
    else:
        ref = block_reference(gb, diagonal)
        a_decay, b_decay = jnp.exp(ga - ref), jnp.exp(ref - gb)
        d = jnp.where(mask, d_scores, 0.0)
        da = lambda: a_decay * dot(d, b * b_decay)  # noqa: E731
        db = lambda: b_decay * dot(d, a * a_decay, trans_a=True)  # noqa: E731
    return {"a": da, "b": db}[side]() if side else (da(), db())


def decay_width(t, width):
    """[m, K] -> [m, width]: summed over the channels for a scalar decay (width 1), else unchanged."""
    return jnp.sum(t, axis=1, keepdims=True) if width == 1 else t


def segment_row(ref, s=slice(None)):
    """[1, n]: the segment numbers ref[..., s] of a [L] or [1, L] block, as a row."""
    return (ref[s] if ref.ndim == 1 else ref[:, s]).reshape(1, -1)


def segment_column(ref, s=slice(None)):
    """[n, 1]: the segment numbers ref[..., s] of a [L] or [1, L] block, as a column. A [1, n] -> [n, 1] reshape
    would move lanes into sublanes, which Mosaic does not take: [1, L] blocks are turned by a masked lane
    reduction (n x n selects, as `row`)."""
    if ref.ndim == 1:
        return ref[s].reshape(-1, 1)
    numbers = segment_row(ref, s)
    n = numbers.shape[1]
    return jnp.sum(jnp.where(iota(n) == iota(n, 1), numbers, 0), axis=1, keepdims=True, dtype=jnp.int32)


def segment_number(ref, s=slice(None)):
    """The one segment number of a [1] or [1, 1] block, or of the slice ref[..., s] of one element: an int32
    scalar (a max: Mosaic's lowering of a reduction to a scalar sums in int64 under jax_enable_x64)."""
    return jnp.max(segment_row(ref, s))


def chunk_segments(seg_q_ref, seg_ref, prev_ref, rows, tokens):
    """One chunk's segment numbers as the gradient kernels use them, for its row blocks `rows` and token blocks
    `tokens` (lists of slices): (columns of each row block, rows of each row block, columns of each token block, the
    number before the chunk, the number of its last row). Without segments (seg_ref None): Nones."""
    if seg_ref is None:
        return [None] * len(rows), [None] * len(rows), [None] * len(tokens), None, None
    return (
        [segment_column(seg_ref, r) for r in rows],
        [segment_row(seg_ref, r) for r in rows],
        [segment_column(seg_q_ref, t) for t in tokens],
        segment_number(prev_ref),
        segment_number(seg_ref, pl.ds(seg_ref.shape[-1] - 1, 1)),
    )


def in_segment(t, seg, number):
    """t where seg == number (seg [m, 1] per row, or a scalar), else 0; t itself when there are no segments
    (seg None)."""
    return t if seg is None else jnp.where(seg == number, t, 0.0)


def causal_query_mask(block_tokens, per_token):
    """[block_tokens, block_tokens P]: token t of a diagonal block sees the sub-step rows up to its own last."""
    return iota(block_tokens) * per_token + per_token - 1 >= iota(block_tokens * per_token, 1)


class KeyBlocks(NamedTuple):
    """The key-side blocks of one chunk, loaded once: x [c, K], g [c, D] per block j and, for channel-wise
    decays, x_off = x exp(last - g) with last [1, K] the block's last row of g (every factor <= 1)."""

    x: list
    g: list
    x_off: list | None
    last: list | None


def key_blocks(x_ref, g_ref, block):
    """KeyBlocks of the rows of x_ref [L, K], g_ref [L, D] in blocks of `block` rows."""
    n = x_ref.shape[0] // block
    x = [x_ref[pl.ds(j * block, block), :].astype(jnp.float32) for j in range(n)]
    g = [g_ref[pl.ds(j * block, block), :] for j in range(n)]
    if g_ref.shape[1] == 1:
        return KeyBlocks(x, g, None, None)
    last = [g_ref[pl.ds(j * block + block - 1, 1), :] for j in range(n)]
    return KeyBlocks(x, g, [x_j * jnp.exp(l_j - g_j) for x_j, l_j, g_j in zip(x, last, g, strict=True)], last)


def row_block_scores(a, ga, i, keys, masks):
    """[S_i0, ..., S_ii]: block_scores of rows a [m, K], ga [m, D] (inside key block i's span) against the key
    blocks j <= i, masks[j] [m, c]. Channel-wise decays: the rows are referenced once to the end of block i - 1
    and a pair adds the [1, K] factor exp(last_{i-1} - last_j), so whole-tile exponentials are O(1) per block
    row; every factor <= 1."""
    if keys.x_off is None:
        return [block_scores(a, ga, keys.x[j], keys.g[j], masks[j], j == i) for j in range(i + 1)]
    scores = []
    if i > 0:
        a_off = a * jnp.exp(ga - keys.last[i - 1])
        for j in range(i):
            pair = dot(a_off * jnp.exp(keys.last[i - 1] - keys.last[j]), keys.x_off[j], trans_b=True)
            scores.append(jnp.where(masks[j], pair, 0.0))
    return scores + [block_scores(a, ga, keys.x[i], keys.g[i], masks[i], diagonal=True)]


def unit_lower_inverse_tile(a):
    """(I + a)^-1 for strictly lower-triangular a [c, c], by forward substitution, one row per step. (Session 13:
    a chunk's diagonal blocks substituted together, their chains interleaved in one loop, took the GPU solve kernel
    to 198 registers against 128 and from 391 to 448 us in kda's forward: not kept.)"""
    size = a.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)

    def substitute(i, t):
        unit = jnp.where(iota(size, 1) == i, 1.0, 0.0)
        new_row = unit - jnp.sum(row(a, i).T * t, axis=0, keepdims=True)
        return jnp.where(rows == i, new_row, t)

    return jax.lax.fori_loop(jnp.int32(1), jnp.int32(size), substitute, (rows == cols).astype(jnp.float32))


def pair_mask(local, i, j, seg_rows=None, seg_cols=None):
    """Mask of block pair (i, j <= i): `local` on the diagonal, all True below it, and within one segment when
    segment numbers are given (seg_rows [m, 1] of block i's rows, seg_cols [1, c] of block j's)."""
    mask = local if i == j else jnp.ones(local.shape, bool)
    return mask if seg_rows is None else mask & (seg_rows == seg_cols)


def inverse_blocks(keys, y_ref, seg, seg_t, block):
    """T = (I + A)^-1 of one chunk as blocks {(i, j): [c, c]} for j <= i, c = block rows.

    A_ij = block_scores(Y_i, X_j) (strictly lower on the diagonal, within one segment), then
    T_ii = (I + A_ii)^-1 and T_ij = -T_ii sum_m A_im T_mj. keys: `key_blocks` of x and g; seg, seg_t: per block,
    its segment numbers as a column [c, 1] and as a row [1, c], or None."""
    local = iota(block) > iota(block, 1)

    def a_row(i):
        masks = [pair_mask(local, i, j, seg[i], seg_t[j]) for j in range(i + 1)]
        y_i = y_ref[pl.ds(i * block, block), :].astype(jnp.float32)
        return row_block_scores(y_i, keys.g[i], i, keys, masks)

    return inverse_of_blocks(a_row, len(keys.x))


def inverse_of_blocks(a_row, n):
    """T = (I + A)^-1 as blocks {(i, j): [c, c]} for j <= i, from a_row(i) = [A_i0, ..., A_ii] (A_ii strictly
    lower): T_ii = (I + A_ii)^-1 and T_ij = -T_ii sum_m A_im T_mj."""
    t = {}
    for i in range(n):
        a = a_row(i)
        t[i, i] = unit_lower_inverse_tile(a[i])
        for j in range(i):
            t[i, j] = -dot(t[i, i], sum(dot(a[m], t[m, j]) for m in range(j, i)))
    return t


def write_w_u(t, y_ref, z_ref, g_ref, w_ref, u_ref, block, seg=None, prev_ref=None, g=None):
    """W = T (Y exp G) and U~ = T Z of one chunk, block row by block row, from the blocks of T (`inverse_of_blocks`);
    rows of W in a segment that began inside the chunk are zero (they do not see the incoming state). y_ref, g_ref,
    z_ref [L, .] are read per use (short live ranges), g's blocks too unless given (g: a list of [c, D]); seg: per
    block its segment numbers [c, 1], or None."""
    n = y_ref.shape[0] // block
    rows = [pl.ds(i * block, block) for i in range(n)]
    load = lambda ref, j: ref[rows[j], :].astype(jnp.float32)  # noqa: E731
    for i in range(n):
        w = sum(dot(t[i, j], load(y_ref, j) * jnp.exp(load(g_ref, j) if g is None else g[j])) for j in range(i + 1))
        if seg is not None:
            w = jnp.where(seg[i] == segment_number(prev_ref), w, 0.0)
        w_ref[rows[i], :] = w.astype(w_ref.dtype)
        u_ref[rows[i], :] = sum(dot(t[i, j], load(z_ref, j)) for j in range(i + 1)).astype(u_ref.dtype)


def intra_kernel(q_ref, gq_ref, x_ref, g_ref, *refs, block_tokens, per_token, has_erase, has_segments):
    """The chunk-local part of one chunk, block by block.

    Always the query scores Aqk[t, s] = q_t . (x_s exp(Gq_t - G_s)) (masked: causal, within one segment),
    [C, L]. With an erase address y, also T = (I + A)^-1 (`inverse_blocks`), W = T (Y exp G) and U~ = T Z,
    [L, K] and [L, V].
    refs: (y_ref, z_ref if has_erase) (seg_q_ref, seg_ref, prev_ref if has_segments), then the outputs
    (aqk_ref, then w_ref, u_ref if has_erase)."""
    refs = list(refs)
    y_ref, z_ref = (refs.pop(0), refs.pop(0)) if has_erase else (None, None)
    seg_q_ref, seg_ref, prev_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if has_segments else (None,) * 3
    aqk_ref, *erase_outs = refs
    block = block_tokens * per_token
    n = x_ref.shape[0] // block
    rows = [pl.ds(i * block, block) for i in range(n)]
    tokens = [pl.ds(i * block_tokens, block_tokens) for i in range(n)]
    seg = [segment_column(seg_ref, r) for r in rows] if has_segments else [None] * n
    seg_t = [segment_row(seg_ref, r) for r in rows] if has_segments else [None] * n
    keys = key_blocks(x_ref, g_ref, block)
    query_local = causal_query_mask(block_tokens, per_token)
    for i in range(n):
        seg_q = segment_column(seg_q_ref, tokens[i]) if has_segments else None
        masks = [pair_mask(query_local, i, j, seg_q, seg_t[j]) for j in range(i + 1)]
        q = q_ref[tokens[i], :].astype(jnp.float32)
        for j, scores in enumerate(row_block_scores(q, gq_ref[tokens[i], :], i, keys, masks)):
            aqk_ref[tokens[i], rows[j]] = scores.astype(aqk_ref.dtype)
        for j in range(i + 1, n):
            aqk_ref[tokens[i], rows[j]] = jnp.zeros((block_tokens, block), aqk_ref.dtype)
    if not has_erase:
        return
    t = inverse_blocks(keys, y_ref, seg, seg_t, block)
    write_w_u(t, y_ref, z_ref, g_ref, *erase_outs, block, seg if has_segments else None, prev_ref, g=keys.g)


def pair_scores_kernel(q_ref, gq_ref, x_ref, g_ref, *refs, i, j, per_token, has_erase, has_segments):
    """One block pair (i, j) of one chunk: the query scores Aqk_ij (query block i against key block j) and, with an
    erase address, A_ij (rows of block i against key block j); zeros above the diagonal (j > i). i, j: the block
    indices, traced (a grid axis picks the pair). Same references as `block_scores`.

    Refs are blocks: q [c_q, K], gq [c_q, D] (query block i), x [c, K], g [c, D] (key block j); with an erase
    address y [c, K], gy [c, D] (rows of block i); with segments seg_q [c_q] (block i's tokens), seg_y [c] (block
    i's rows), seg_x [c] (block j's rows); then the outputs aqk [c_q, c] and, with an erase address, a [c, c]
    (float32: it is inverted next)."""
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    y_ref, gy_ref = take(has_erase), take(has_erase)
    seg_q_ref, seg_y_ref, seg_x_ref = take(has_segments), take(has_segments), take(has_segments)
    aqk_ref, a_ref = take(), take(has_erase)
    outs = [r for r in (aqk_ref, a_ref) if r is not None]

    @pl.when(j > i)
    def _():
        for ref in outs:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    @pl.when(j <= i)
    def _():
        block_tokens, block = q_ref.shape[0], x_ref.shape[0]
        x, g = x_ref[...].astype(jnp.float32), g_ref[...]
        diagonal = i == j
        seg_x = segment_row(seg_x_ref) if has_segments else None

        def mask(local, seg_rows):
            m = jnp.logical_or(local, jnp.logical_not(diagonal))
            return m if seg_rows is None else m & (seg_rows == seg_x)

        q_mask = mask(causal_query_mask(block_tokens, per_token), segment_column(seg_q_ref) if has_segments else None)
        sides = [(q_ref, gq_ref, q_mask, aqk_ref)]
        if has_erase:
            a_mask = mask(iota(block) > iota(block, 1), segment_column(seg_y_ref) if has_segments else None)
            sides.append((y_ref, gy_ref, a_mask, a_ref))
        if g.shape[1] == 1:
            for a_side, ga_ref, m, out in sides:
                out[...] = block_scores(a_side[...].astype(jnp.float32), ga_ref[...], x, g, m, diagonal).astype(
                    out.dtype
                )
            return
        ref = block_reference(g, diagonal)
        x_decayed = x * jnp.exp(ref - g)
        for a_side, ga_ref, m, out in sides:
            scores = dot(a_side[...].astype(jnp.float32) * jnp.exp(ga_ref[...] - ref), x_decayed, trans_b=True)
            out[...] = jnp.where(m, scores, 0.0).astype(out.dtype)


def solve_kernel(a_ref, y_ref, z_ref, g_ref, *refs, block, has_segments, write_inverse=False):
    """T = (I + A)^-1 from the pair scores A [L, L] of one chunk (`pair_scores_kernel`; only blocks j <= i are
    read), in blocks of `block` rows (any divisor of L, not necessarily the pair kernel's), then W = T (Y exp G) and
    U~ = T Z (`write_w_u`). refs: (seg_ref [L], prev_ref if has_segments), then the outputs w [L, K], u [L, V]
    and, with write_inverse (the backward's recompute), t [L, L] (zeros above the diagonal blocks)."""
    refs = list(refs)
    seg_ref, prev_ref = (refs.pop(0), refs.pop(0)) if has_segments else (None, None)
    w_ref, u_ref, *t_ref = refs
    n = a_ref.shape[0] // block
    rows = [pl.ds(i * block, block) for i in range(n)]

    def a_row(i):
        return [a_ref[rows[i], rows[j]].astype(jnp.float32) for j in range(i + 1)]

    t = inverse_of_blocks(a_row, n)
    seg = [segment_column(seg_ref, r) for r in rows] if has_segments else None
    write_w_u(t, y_ref, z_ref, g_ref, w_ref, u_ref, block, seg, prev_ref)
    if write_inverse:
        (t_ref,) = t_ref
        for i in range(n):
            for j in range(n):
                tile = t[i, j] if j <= i else jnp.zeros((block, block), jnp.float32)
                t_ref[rows[i], rows[j]] = tile.astype(t_ref.dtype)


def output_kernel(q_ref, gq_ref, aqk_ref, u_ref, s_ref, *refs, has_segments, operands=None):
    """O = (Q exp Gq) S + Aqk U for one chunk: [C, K] [K, BV] + [C, L] [L, BV]; operands: the dtype Q exp Gq is
    rounded to for its product (None: float32).
    refs: (seg_q_ref, prev_ref if has_segments), o_ref."""
    seg_q_ref, prev_ref, o_ref = refs if has_segments else (None, None, *refs)
    q_decayed = q_ref[...].astype(jnp.float32) * jnp.exp(gq_ref[...])
    if has_segments:  # tokens of a segment that began inside the chunk do not see the incoming state
        q_decayed = in_segment(q_decayed, segment_column(seg_q_ref), segment_number(prev_ref))
    o = dot(q_decayed if operands is None else q_decayed.astype(operands), s_ref[...])
    o = o + dot(aqk_ref[...], u_ref[...])
    o_ref[...] = o.astype(o_ref.dtype)


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------


def value_grad_kernel(aqk_ref, do_ref, du_ref):
    """Aqk^T dO for one chunk and V block, [L, C] [C, BV]: the values' gradient through the chunk's own queries
    (either operand may be stored in 16 bits; the product is float32)."""
    du_ref[...] = dot(aqk_ref[...], do_ref[...], trans_a=True).astype(du_ref.dtype)


def chunk_grad_kernel(*refs, block_tokens, per_token, block_v, has_erase, has_segments):
    """Gradients of one chunk's q, gq, x, y, z and g (the chunk-local cumulative log-decay), given the chunk's
    start state S, the gradient dS' of its end state, dO, and U and dU = P^T dO + (X exp(G_last - G)) dS' from
    the state passes. With T = (I + A)^-1 recomputed (`inverse_blocks`):

        dZ = T^T dU                  dA = -dZ U^T (masked as A)     d(Y exp G) = -dZ S^T (rows that see S)
        dP = dO U^T (masked as P)    d(Q exp Gq) = dO S^T (rows that see S)
        d(X exp(G_last - G)) = U dS'^T (rows that reach S')         d exp(G_last) = rowsum(S * dS')

    Products over V run in blocks of block_v columns; then `block_scores_grad` turns dA and dP into gradients
    of y, x and q, block pair by block pair. Every use of q and y carries exp(+G) and every use of x exp(-G),
    so dgq = q dq and dg = y dy - x dx, plus the terms of G_last on the last row. z's gradient is dZ (written
    only with an erase address: without one, U = Z and dZ = dU).

    Refs: q [C, K], gq [C, D], x, y [L, K], g [L, D], u, du [L, V], do [C, V], s, ds [K, V] (f32), then seg_q
    [C], seg [L], seg_prev [1] with segments ([1, C], [1, L], [1, 1] on the TPU); outputs dq [C, K], dgq [C, D],
    dx, dy [L, K], dz [L, V] (with an erase address), dg [L, D].
    """
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    q_ref, gq_ref, x_ref, y_ref, g_ref = take(), take(), take(), take(has_erase), take()
    u_ref, du_ref, do_ref, s_ref, ds_ref = take(), take(), take(), take(), take()
    seg_q_ref, seg_ref, prev_ref = take(has_segments), take(has_segments), take(has_segments)
    dq_ref, dgq_ref, dx_ref, dy_ref, dz_ref, dg_ref = take(), take(), take(), take(has_erase), take(has_erase), take()
    f32 = jnp.float32
    block, length, width = block_tokens * per_token, x_ref.shape[0], g_ref.shape[1]
    n = length // block
    rows = [pl.ds(i * block, block) for i in range(n)]
    tokens = [pl.ds(i * block_tokens, block_tokens) for i in range(n)]
    x = [x_ref[r, :].astype(f32) for r in rows]
    y = [y_ref[r, :].astype(f32) for r in rows] if has_erase else None
    g = [g_ref[r, :].astype(f32) for r in rows]
    g_last = row(g[-1], block - 1)
    a_local, q_local = iota(block) > iota(block, 1), causal_query_mask(block_tokens, per_token)
    seg, seg_t, seg_q, seg_prev, seg_last = chunk_segments(seg_q_ref, seg_ref, prev_ref, rows, tokens)
    t = inverse_blocks(key_blocks(x_ref, g_ref, block), y_ref, seg, seg_t, block) if has_erase else None

    # Products over V, accumulated over V blocks.
    d_qd, d_xe, d_ye = [0.0] * n, [0.0] * n, [0.0] * n
    d_p, d_a = collections.defaultdict(float), collections.defaultdict(float)
    d_decay = 0.0  # d exp(G_last), [1, K]
    for v in range(u_ref.shape[1] // block_v):
        vs = pl.ds(v * block_v, block_v)
        s, ds = s_ref[:, vs], ds_ref[:, vs]
        u, du = [u_ref[r, vs] for r in rows], [du_ref[r, vs] for r in rows]
        d_decay = d_decay + jnp.sum((s * ds).T, axis=0, keepdims=True)
        for i in range(n):
            do = do_ref[tokens[i], vs].astype(f32)
            d_qd[i] = d_qd[i] + dot(do, s, trans_b=True)
            d_xe[i] = d_xe[i] + dot(u[i], ds, trans_b=True)
            for j in range(i + 1):
                d_p[i, j] = d_p[i, j] + dot(do, u[j], trans_b=True)
            if has_erase:
                dz = sum(dot(t[m, i], du[m], trans_a=True) for m in range(i, n))
                dz_ref[rows[i], vs] = dz
                d_ye[i] = d_ye[i] - dot(dz, s, trans_b=True)
                for j in range(i + 1):
                    d_a[i, j] = d_a[i, j] - dot(dz, u[j], trans_b=True)

    # Per key channel: the queries, then the edit and erase addresses.
    dx = [0.0] * n
    for i in range(n):
        q, gq = q_ref[tokens[i], :].astype(f32), gq_ref[tokens[i], :].astype(f32)
        dq = in_segment(d_qd[i], seg_q[i], seg_prev) * jnp.exp(gq)
        for j in range(i + 1):
            mask = pair_mask(q_local, i, j, seg_q[i], seg_t[j])
            dq_ij, dx_ij = block_scores_grad(q, gq, x[j], g[j], d_p[i, j], mask, diagonal=i == j)
            dq, dx[j] = dq + dq_ij, dx[j] + dx_ij
        dq_ref[tokens[i], :] = dq
        dgq_ref[tokens[i], :] = decay_width(q * dq, width)
    dy, d_last = [None] * n, 0.0
    for i in range(n):
        dx_end = d_xe[i] * in_segment(jnp.exp(g_last - g[i]), seg[i], seg_last)
        d_last = d_last + jnp.sum(x[i] * dx_end, axis=0, keepdims=True)
        dx[i] = dx[i] + dx_end
        if has_erase:
            dy[i] = in_segment(d_ye[i], seg[i], seg_prev) * jnp.exp(g[i])
            for j in range(i + 1):
                mask = pair_mask(a_local, i, j, seg[i], seg_t[j])
                dy_ij, dx_ij = block_scores_grad(y[i], g[i], x[j], g[j], d_a[i, j], mask, diagonal=i == j)
                dy[i], dx[j] = dy[i] + dy_ij, dx[j] + dx_ij
    d_last = decay_width(d_last + in_segment(jnp.exp(g_last), seg_last, seg_prev) * d_decay, width)
    for i in range(n):
        dg = -x[i] * dx[i] if y is None else y[i] * dy[i] - x[i] * dx[i]
        dg = decay_width(dg, width)
        if i == n - 1:
            dg = dg + jnp.where(iota(block) == block - 1, d_last, 0.0)
        dx_ref[rows[i], :] = dx[i]
        dg_ref[rows[i], :] = dg
        if has_erase:
            dy_ref[rows[i], :] = dy[i]
