"""Forward of the chunkwise sub-step form as Pallas GPU kernels (Triton lowering).

Reference: `edarnn.core.chunkwise`; these kernels take the same prepared inputs and must give the same result
to float32 rounding. Three kernels, one generic body each, specialised by static flags (scalar or channel-wise
decay, with or without an erase address y, with or without segments):

1. `intra`  (grid B x H x N, parallel): per chunk, A = pair scores of y and x, T = (I + A)^-1, W = T (Y exp G)
   and U~ = T Z.
2. `state`  (grid B x H x V/BV, sequential over chunks inside): U = U~ - W S, the chunk's start state S, and
   S <- Diag(exp G_last) S + (X exp(G_last - G))^T U, with S in registers.
3. `output` (grid B x H x N x V/BV, parallel): O = (Q exp Gq) S + (scores of q and x, causal) U.

A chunk's rows are handled in blocks of BLOCK_TOKENS tokens (BLOCK_TOKENS * P sub-step rows): A, T and the
scores are built block by block, from tiles loaded per block (Triton cannot slice register tiles). Channel-wise
decays are referenced per block pair, as in `edarnn.core.pair_scores`: a diagonal block to its middle row (every
exponent within half a block of decay), a block pair (i > j) to the last row of block j (every factor <= 1).
Shapes below: L = C P sub-step rows per chunk of C tokens, c = BLOCK_TOKENS P rows per block, D = 1 or K.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK_TOKENS = 16  # tokens per block inside a chunk: the smallest tile a Triton dot takes


class Config(NamedTuple):
    """Launch parameters (to be chosen by measurement: experiments/benchmarks/kernels.py)."""

    intra_warps: int = 4
    state_warps: int = 4
    output_warps: int = 4
    state_block_v: int = 64
    output_block_v: int = 64


DEFAULT_CONFIG = Config()


def _dot(a, b, trans_a=False, trans_b=False):
    """a @ b with either operand transposed, accumulated in float32."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _row(mat, i):
    """Row i of mat [R, D] as [1, D] (a masked sum: register tiles cannot be indexed)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, mat.shape, 0)
    return jnp.sum(jnp.where(rows == i, mat, 0.0), axis=0, keepdims=True)


def _iota(n, axis=0):
    """[n, 1] (axis 0) or [1, n] (axis 1) int32 positions."""
    return jax.lax.broadcasted_iota(jnp.int32, (n, 1) if axis == 0 else (1, n), axis)


def block_scores(a, ga, b, gb, mask, diagonal):
    """S[r, s] = sum_k a[r, k] b[s, k] exp(ga[r, k] - gb[s, k]) where mask, else 0, for one block pair.

    a [m, K], ga [m, D] (rows of block i); b [c, K], gb [c, D] (rows of block j <= i); mask [m, c]. Scalar decay
    (D = 1): exact, one exponent per pair. Channel-wise: referenced to gb's middle row (diagonal) or last row."""
    if gb.shape[1] == 1:
        expo = jnp.where(mask, ga - gb.reshape(1, -1), -jnp.inf)
        return jnp.where(mask, _dot(a, b, trans_b=True) * jnp.exp(expo), 0.0)
    ref = _row(gb, gb.shape[0] // 2 if diagonal else gb.shape[0] - 1)
    scores = _dot(a * jnp.exp(ga - ref), b * jnp.exp(ref - gb), trans_b=True)
    return jnp.where(mask, scores, 0.0)


def unit_lower_inverse_tile(a):
    """(I + a)^-1 for strictly lower-triangular a [c, c], by forward substitution, one row per step."""
    size = a.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)

    def substitute(i, t):
        unit = jnp.where(_iota(size, 1) == i, 1.0, 0.0)
        new_row = unit - jnp.sum(_row(a, i).T * t, axis=0, keepdims=True)
        return jnp.where(rows == i, new_row, t)

    return jax.lax.fori_loop(1, size, substitute, (rows == cols).astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


def _intra_kernel(x_ref, y_ref, z_ref, g_ref, *refs, block, has_segments):
    """W, U~ of one chunk, block by block: A_ij, then T_ii = (I + A_ii)^-1 and T_ij = -T_ii sum_m A_im T_mj."""
    seg_ref, prev_ref, w_ref, u_ref = refs if has_segments else (None, None, *refs)
    n = x_ref.shape[0] // block
    rows = [pl.ds(i * block, block) for i in range(n)]
    load = lambda ref, i: ref[rows[i], :].astype(jnp.float32)  # noqa: E731
    local = _iota(block) > _iota(block, 1)
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
            t[i, j] = -_dot(t[i, i], sum(_dot(a[i, m], t[m, j]) for m in range(j, i)))
    for i in range(n):
        w = sum(_dot(t[i, j], load(y_ref, j) * jnp.exp(load(g_ref, j))) for j in range(i + 1))
        if has_segments:
            w = jnp.where(seg[i] == jnp.sum(prev_ref[...]), w, 0.0)
        w_ref[rows[i], :] = w
        u_ref[rows[i], :] = sum(_dot(t[i, j], load(z_ref, j)) for j in range(i + 1))


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


def _output_kernel(q_ref, gq_ref, x_ref, g_ref, u_ref, s_ref, *refs, block_tokens, per_token, has_segments):
    """O = (Q exp Gq) S + sum_j scores_ij U_j for each block i of query tokens."""
    seg_q_ref, seg_ref, prev_ref, o_ref = refs if has_segments else (None, None, None, *refs)
    block = block_tokens * per_token
    n = x_ref.shape[0] // block
    state = s_ref[...].astype(jnp.float32)
    local = _iota(block_tokens) * per_token + per_token - 1 >= _iota(block, 1)
    for i in range(n):
        tokens = pl.ds(i * block_tokens, block_tokens)
        q, gq = q_ref[tokens, :].astype(jnp.float32), gq_ref[tokens, :]
        q_decayed = q * jnp.exp(gq)
        if has_segments:
            seg_q = seg_q_ref[tokens].reshape(block_tokens, 1)
            q_decayed = jnp.where(seg_q == jnp.sum(prev_ref[...]), q_decayed, 0.0)
        o = _dot(q_decayed, state)
        for j in range(i + 1):
            rows = pl.ds(j * block, block)
            mask = local if i == j else jnp.ones((block_tokens, block), bool)
            if has_segments:
                mask = mask & (seg_q == seg_ref[rows].reshape(1, block))
            x, g = x_ref[rows, :].astype(jnp.float32), g_ref[rows, :]
            o = o + _dot(block_scores(q, gq, x, g, mask, diagonal=i == j), u_ref[rows, :])
        o_ref[tokens, :] = o.astype(o_ref.dtype)


# ----------------------------------------------------------------------------------------------------------
# the forward on prepared inputs
# ----------------------------------------------------------------------------------------------------------


def _tile(rows, width, grid_rank=3, v_block=False):
    """BlockSpec of one chunk's rows of a [B, T', H, width...] array on the grid (B, H, N) or (B, H, N, V/BV);
    v_block: the last axis is cut in blocks of `width`, the grid's last index picks one."""
    if grid_rank == 3:
        return pl.BlockSpec((None, rows, None, width), lambda b, h, n: (b, n, h, 0))
    return pl.BlockSpec((None, rows, None, width), lambda b, h, n, j: (b, n, h, j if v_block else 0))


def chunk_forward(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, *, chunk_size, interpret, config=DEFAULT_CONFIG
):
    """Chunkwise forward on prepared, padded inputs (see pallas_kernels.chunk.prepare).

    q [B, T, H, K] (scaled), gq [B, T, H, D] (the chunk-local cumulative log-decay each query sees), x, y
    [B, T P, H, K] (y may be None), z [B, T P, H, V], gcum [B, T P, H, D] (chunk-local cumulative log-decay),
    initial_state [B, H, K, V] f32; seg [B, T P] int32 running segment numbers of the sub-steps, seg_q [B, T]
    those of the tokens and seg_prev [B, N] the number before each chunk, or all three None. T is a multiple
    of chunk_size.
    Returns (o [B, T, H, V] f32, final_state [B, H, K, V] f32).
    """
    batch, length, heads, key = q.shape
    per_token = x.shape[1] // length
    rows, value, dim = per_token * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    block_tokens = min(BLOCK_TOKENS, chunk_size)
    has_segments = seg is not None
    f32 = jnp.float32

    def call(kernel, warps, **kwargs):
        params = plt.CompilerParams(num_warps=warps, num_stages=1)
        return pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kwargs)

    def seg_specs(*shapes):
        """BlockSpecs of segment arrays ([B, rows of a chunk] or [B, 1]) on a grid of len(shapes[0]) axes."""
        if len(shapes[0]) == 3:
            return [pl.BlockSpec((None, r), lambda b, h, n: (b, n)) for r in shapes[1:]]
        return [pl.BlockSpec((None, r), lambda b, h, n, j: (b, n)) for r in shapes[1:]]

    if y is None:
        u_tilde, w = z, None
    else:
        w, u_tilde = call(
            functools.partial(_intra_kernel, block=block_tokens * per_token, has_segments=has_segments),
            config.intra_warps,
            grid=(batch, heads, n_chunks),
            in_specs=[_tile(rows, key), _tile(rows, key), _tile(rows, value), _tile(rows, dim)]
            + (seg_specs("bhn", rows, 1) if has_segments else []),
            out_specs=[_tile(rows, key), _tile(rows, value)],
            out_shape=[jax.ShapeDtypeStruct(x.shape, f32), jax.ShapeDtypeStruct(z.shape, f32)],
        )(x, y, z, gcum, *((seg, seg_prev) if has_segments else ()))

    state_block_v = min(config.state_block_v, value)
    u, states, final_state = call(
        functools.partial(
            _state_kernel, rows=rows, n_chunks=n_chunks, has_erase=w is not None, has_segments=has_segments
        ),
        config.state_warps,
        grid=(batch, heads, value // state_block_v),
        out_shape=[
            jax.ShapeDtypeStruct(z.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, n_chunks, key, value), f32),
            jax.ShapeDtypeStruct((batch, heads, key, value), f32),
        ],
    )(*(t for t in (u_tilde, w, x, gcum, initial_state) if t is not None), *((seg, seg_prev) if has_segments else ()))

    output_block_v = min(config.output_block_v, value)
    o = call(
        functools.partial(_output_kernel, block_tokens=block_tokens, per_token=per_token, has_segments=has_segments),
        config.output_warps,
        grid=(batch, heads, n_chunks, value // output_block_v),
        in_specs=[
            _tile(chunk_size, key, 4),
            _tile(chunk_size, dim, 4),
            _tile(rows, key, 4),
            _tile(rows, dim, 4),
            _tile(rows, output_block_v, 4, v_block=True),
            pl.BlockSpec((None, None, None, key, output_block_v), lambda b, h, n, j: (b, h, n, 0, j)),
        ]
        + (seg_specs("bhnj", chunk_size, rows, 1) if has_segments else []),
        out_specs=_tile(chunk_size, output_block_v, 4, v_block=True),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, value), f32),
    )(q, gq, x, gcum, u, states, *((seg_q, seg, seg_prev) if has_segments else ()))
    return o, final_state
