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


def intra_kernel(x_ref, y_ref, z_ref, g_ref, *refs, block, has_segments):
    """W, U~ of one chunk, block by block: A_ij, then T_ii = (I + A_ii)^-1 and T_ij = -T_ii sum_m A_im T_mj."""
    seg_ref, prev_ref, w_ref, u_ref = refs if has_segments else (None, None, *refs)
    n = x_ref.shape[0] // block
    rows = [pl.ds(i * block, block) for i in range(n)]
    load = lambda ref, i: ref[rows[i], :].astype(jnp.float32)  # noqa: E731
    local = iota(block) > iota(block, 1)
    seg = [seg_ref[rows[i]].reshape(block, 1) for i in range(n)] if has_segments else None
    a, t = {}, {}
    for i in range(n):
        y_i, g_i = load(y_ref, i), load(g_ref, i)
        for j in range(i + 1):
            mask = local if i == j else jnp.ones((block, block), bool)
            if has_segments:
                mask = mask & (seg[i] == seg[j].reshape(1, block))
            a[i, j] = block_scores(y_i, g_i, load(x_ref, j), load(g_ref, j), mask, diagonal=i == j)
        t[i, i] = unit_lower_inverse_tile(a[i, i])
        for j in range(i):
            t[i, j] = -dot(t[i, i], sum(dot(a[i, m], t[m, j]) for m in range(j, i)))
    for i in range(n):
        w = sum(dot(t[i, j], load(y_ref, j) * jnp.exp(load(g_ref, j))) for j in range(i + 1))
        if has_segments:
            w = jnp.where(seg[i] == jnp.sum(prev_ref[...]), w, 0.0)
        w_ref[rows[i], :] = w
        u_ref[rows[i], :] = sum(dot(t[i, j], load(z_ref, j)) for j in range(i + 1))


def output_kernel(q_ref, gq_ref, x_ref, g_ref, u_ref, s_ref, *refs, block_tokens, per_token, has_segments):
    """O = (Q exp Gq) S + sum_j scores_ij U_j for each block i of query tokens."""
    seg_q_ref, seg_ref, prev_ref, o_ref = refs if has_segments else (None, None, None, *refs)
    block = block_tokens * per_token
    n = x_ref.shape[0] // block
    state = s_ref[...].astype(jnp.float32)
    local = iota(block_tokens) * per_token + per_token - 1 >= iota(block, 1)
    for i in range(n):
        tokens = pl.ds(i * block_tokens, block_tokens)
        q, gq = q_ref[tokens, :].astype(jnp.float32), gq_ref[tokens, :]
        q_decayed = q * jnp.exp(gq)
        if has_segments:
            seg_q = seg_q_ref[tokens].reshape(block_tokens, 1)
            q_decayed = jnp.where(seg_q == jnp.sum(prev_ref[...]), q_decayed, 0.0)
        o = dot(q_decayed, state)
        for j in range(i + 1):
            rows = pl.ds(j * block, block)
            mask = local if i == j else jnp.ones((block_tokens, block), bool)
            if has_segments:
                mask = mask & (seg_q == seg_ref[rows].reshape(1, block))
            x, g = x_ref[rows, :].astype(jnp.float32), g_ref[rows, :]
            o = o + dot(block_scores(q, gq, x, g, mask, diagonal=i == j), u_ref[rows, :])
        o_ref[tokens, :] = o.astype(o_ref.dtype)
