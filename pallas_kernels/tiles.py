"""Kernel bodies shared by the GPU (Triton) and TPU (Mosaic) Pallas kernels of the chunkwise form.

Reference: `edarnn.core.chunkwise`. Written with what both lowerings take: whole tiles loaded from refs by
static row blocks, element-wise ops, masks, masked reductions and 2-D products (no slicing of values, no
gathers). The per-backend modules (`gpu/chunk_fwd.py`, `tpu/chunk_fwd.py`) choose layouts, grids and the
sequential state pass.

A chunk's rows are handled in blocks of BLOCK_TOKENS tokens (BLOCK_TOKENS * P sub-step rows): A, T and the
scores are built block by block. Channel-wise decays are referenced per block pair, as in
`edarnn.core.pair_scores`: a diagonal block to its middle row (every exponent within half a block of decay), a
block pair (i > j) to the last row of block j (every factor <= 1). Shapes: L = C P rows per chunk of C tokens,
c = BLOCK_TOKENS P rows per block, D = 1 (scalar decay) or K.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_TOKENS = 16  # tokens per block inside a chunk: the smallest tile a Triton dot takes


def dot(a, b, trans_a=False, trans_b=False):
    """a @ b with either operand transposed, accumulated in float32."""
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
    ref = row(gb, gb.shape[0] // 2 if diagonal else gb.shape[0] - 1)
    scores = dot(a * jnp.exp(ga - ref), b * jnp.exp(ref - gb), trans_b=True)
    return jnp.where(mask, scores, 0.0)


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
    """(I + a)^-1 for strictly lower-triangular a [c, c], by forward substitution, one row per step."""
    size = a.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)

    def substitute(i, t):
        unit = jnp.where(iota(size, 1) == i, 1.0, 0.0)
        new_row = unit - jnp.sum(row(a, i).T * t, axis=0, keepdims=True)
        return jnp.where(rows == i, new_row, t)

    return jax.lax.fori_loop(jnp.int32(1), jnp.int32(size), substitute, (rows == cols).astype(jnp.float32))


def intra_kernel(q_ref, gq_ref, x_ref, g_ref, *refs, block_tokens, per_token, has_erase, has_segments):
    """The chunk-local part of one chunk, block by block.

    Always the query scores Aqk[t, s] = q_t . (x_s exp(Gq_t - G_s)) (masked: causal, within one segment),
    [C, L]. With an erase address y, also A_ij, T_ii = (I + A_ii)^-1, T_ij = -T_ii sum_m A_im T_mj, and from them
    W = T (Y exp G) and U~ = T Z, [L, K] and [L, V].
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
    seg = [seg_ref[rows[i]].reshape(1, block) for i in range(n)] if has_segments else None
    keys = key_blocks(x_ref, g_ref, block)
    query_local = iota(block_tokens) * per_token + per_token - 1 >= iota(block, 1)
    for i in range(n):
        masks = [query_local if i == j else jnp.ones((block_tokens, block), bool) for j in range(i + 1)]
        if has_segments:
            seg_q = seg_q_ref[tokens[i]].reshape(block_tokens, 1)
            masks = [mask & (seg_q == seg[j]) for j, mask in enumerate(masks)]
        q = q_ref[tokens[i], :].astype(jnp.float32)
        for j, scores in enumerate(row_block_scores(q, gq_ref[tokens[i], :], i, keys, masks)):
            aqk_ref[tokens[i], rows[j]] = scores
        for j in range(i + 1, n):
            aqk_ref[tokens[i], rows[j]] = jnp.zeros((block_tokens, block), jnp.float32)
    if not has_erase:
        return
    w_ref, u_ref = erase_outs
    local = iota(block) > iota(block, 1)
    load = lambda ref, i: ref[rows[i], :].astype(jnp.float32)  # noqa: E731
    a, t = {}, {}
    for i in range(n):
        masks = [local if i == j else jnp.ones((block, block), bool) for j in range(i + 1)]
        if has_segments:
            masks = [mask & (seg[i].reshape(block, 1) == seg[j]) for j, mask in enumerate(masks)]
        for j, scores in enumerate(row_block_scores(load(y_ref, i), keys.g[i], i, keys, masks)):
            a[i, j] = scores
        t[i, i] = unit_lower_inverse_tile(a[i, i])
        for j in range(i):
            t[i, j] = -dot(t[i, i], sum(dot(a[i, m], t[m, j]) for m in range(j, i)))
    for i in range(n):
        w = sum(dot(t[i, j], load(y_ref, j) * jnp.exp(keys.g[j])) for j in range(i + 1))
        if has_segments:
            w = jnp.where(seg[i].reshape(block, 1) == jnp.sum(prev_ref[...]), w, 0.0)
        w_ref[rows[i], :] = w
        u_ref[rows[i], :] = sum(dot(t[i, j], load(z_ref, j)) for j in range(i + 1))


def output_kernel(q_ref, gq_ref, aqk_ref, u_ref, s_ref, *refs, has_segments):
    """O = (Q exp Gq) S + Aqk U for one chunk: [C, K] [K, BV] + [C, L] [L, BV].
    refs: (seg_q_ref, prev_ref if has_segments), o_ref."""
    seg_q_ref, prev_ref, o_ref = refs if has_segments else (None, None, *refs)
    q_decayed = q_ref[...].astype(jnp.float32) * jnp.exp(gq_ref[...])
    if has_segments:  # tokens of a segment that began inside the chunk do not see the incoming state
        seg_q = seg_q_ref[...].reshape(-1, 1)
        q_decayed = jnp.where(seg_q == jnp.sum(prev_ref[...]), q_decayed, 0.0)
    o = dot(q_decayed, s_ref[...].astype(jnp.float32)) + dot(aqk_ref[...], u_ref[...].astype(jnp.float32))
    o_ref[...] = o.astype(o_ref.dtype)
