"""Backward of the chunkwise sub-step form as Pallas GPU kernels (Triton lowering).

Reference: the VJP of `edarnn.core.chunkwise`, taken on the prepared inputs of `chunk_fwd.chunk_forward` (the
per-token decay's gradient, a reverse cumulative sum inside each chunk, is JAX's autodiff of
`pallas_kernels.forms.prepare`). Given the cotangents dO of the output and dS_N of the final state:

0. recompute: Aqk, W, U, T = (I + A)^-1 and each chunk's start state S_n by the forward's pair, solve and state
   kernels (`chunk_fwd.chunk_states`; the solve kernel also writes T); the forward keeps nothing but
   its inputs.
1. `value_grad` (grid B x H x N x V/BV, parallel; body tiles.value_grad_kernel): P_n^T dO_n, the values'
   gradient through the chunk's own queries (P = Aqk).
2. `state_grad` (grid B x H x V/BV, sequential over the chunks in reverse inside, dS in registers):
       dU_n = P_n^T dO_n + (X exp(G_last - G))_n dS_{n+1}
       dS_n = Diag(exp G_last) dS_{n+1} + (Q exp Gq)_n^T dO_n - W_n^T dU_n
   storing dU_n and dS_{n+1}; dS_0 is the initial state's gradient.
3. `score_grad` (grid B x H x N x n, one program per block of 16 P rows; `_score_grad_kernel`): the small
   per-chunk gradient matrices dP = dO U^T [C, L] and, with an erase address, dZ = T^T dU [L, V] (z's gradient)
   and dA = -dZ U^T [L, L], unmasked (the next kernel masks them).
4. `key_grad` (grid B x H x N x K/BK, one program per chunk and BK key channels, Config.block_k;
   `_key_grad_kernel`): the key-channel gradients dq, dx, dy and those of the cumulative log-decays gq and gcum,
   block by block from dP, dA, S_n, dS_{n+1}, U, dZ and dO. A scalar decay's gradients are per-K-block partial
   sums, added up by XLA.
   With Config.key_grad_rows the grid is B x H x N x K/BK x n instead, one program per row block of 16 tokens:
   the same body for that block alone, each program's share of the chunk's last-log-decay gradient written
   apart and added to dgcum's last row by XLA.

No program holds more than a few [16 P, BK] or [L, 64] float32 tiles (BK = Config.block_k; docs/performance.md has
the work and bytes).
With 16-bit inputs (`storage`), the recompute stores as the forward does (chunk_fwd.Config), dO is read in 16 bits
and dU, P^T dO, the dS_{n+1}, dZ and the gradients of q, x, y are stored in 16 bits (Config.low_grads: the rule's
input gradients end in that dtype anyway, so this adds one rounding before the preparation's VJP); dP, dA, the
log-decays' gradients and dS_0 are float32.
Segment masks are the forward's. Arrays keep the public [B, T, H, D] layout, as in chunk_fwd.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gpu import chunk_fwd
from pallas_kernels.gpu.chunk_fwd import segment_specs, tile_spec, triton_call
from pallas_kernels.tiles import (
    BLOCK_TOKENS,
    block_scores_grad,
    causal_query_mask,
    chunk_segments,
    decay_width,
    dot,
    end_decays,
    in_segment,
    iota,
    pair_mask,
    value_grad_kernel,
)


class Config(NamedTuple):
    """Launch parameters and storage of the backward kernels (docs/performance.md). Measured on an H200 (kda,
    B=4, T=4096, H=16, K=V=128, bf16, forward + backward): key_grad over K blocks of 32 9.17 ms against 9.93 with
    64; key_grad with 2 / 8 warps 9.67 / 9.98 against 9.93 with 4 (blocks of 64). The others are untimed.
    key_grad_rows: key_grad's grid also over the chunk's row blocks (one program per 16 tokens, K block and chunk,
    instead of one walking the chunk's n blocks in turn): more, shorter programs; untimed, so off.
    key_grad_low_dots: with bfloat16 storage, key_grad's products on bfloat16 operands (the 16-bit matrix units,
    half the operand registers): its state products take their stored operands as they are where both are stored
    in bfloat16 (exact; low_states and low_grads), its block pairs' products round theirs (dP, dA and the decayed
    keys) to bfloat16 (float16's range is too narrow for dP, so float16 storage leaves the flag off); untimed, off.
    The recompute runs the forward's kernels with chunk_fwd's Config."""

    value_grad_warps: int = 4
    state_grad_warps: int = 4
    score_grad_warps: int = 4
    key_grad_warps: int = 4
    value_grad_block_v: int = 64
    state_grad_block_v: int = 64
    block_v: int = 64  # V blocks of the loops inside score_grad and key_grad
    block_k: int = 32  # K blocks of key_grad's grid
    low_grads: bool = True  # with 16-bit inputs: P^T dO, dU, the dS_{n+1} and dq, dx, dy, dz in 16 bits
    key_grad_rows: bool = False  # key_grad's grid (B, H, N, K/BK, n): a program per row block (docstring)
    key_grad_low_dots: bool = False  # with bfloat16 storage: key_grad's products on bf16 operands (docstring)


DEFAULT_CONFIG = Config()


def default_config():
    """DEFAULT_CONFIG, read at call time (benchmarks swap it to compare variants in one process)."""
    return DEFAULT_CONFIG


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


def _state_grad_kernel(*refs, chunk_size, per_token, n_chunks, has_erase, has_segments):
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    du_local_ref, q_ref, gq_ref, x_ref, g_ref = take(), take(), take(), take(), take()
    w_ref, do_ref, d_final_ref = take(has_erase), take(), take()
    seg_ref, seg_q_ref, prev_ref = take(has_segments), take(has_segments), take(has_segments)
    du_ref, d_ends_ref, d_initial_ref = refs
    f32 = jnp.float32
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = du_ref.shape[-1] // pl.num_programs(2)
    vs = pl.ds(j * block_v, block_v)
    rows = chunk_size * per_token

    def chunk(i, d_state):
        n = n_chunks - 1 - i
        ts, qs = pl.ds(n * rows, rows), pl.ds(n * chunk_size, chunk_size)
        x, g = x_ref[b, ts, h, :].astype(f32), g_ref[b, ts, h, :]
        g_last = g_ref[b, n * rows + rows - 1, h, :].reshape(1, -1)
        q_decayed = q_ref[b, qs, h, :].astype(f32) * jnp.exp(gq_ref[b, qs, h, :])
        segs = ()
        if has_segments:
            segs = (seg_ref[b, ts].reshape(rows, 1), seg_ref[b, n * rows + rows - 1], prev_ref[b, n])
            q_decayed = in_segment(q_decayed, seg_q_ref[b, qs].reshape(chunk_size, 1), prev_ref[b, n])
        decay_to_end, state_decay = end_decays(g, g_last, *segs)
        d_ends_ref[b, h, n, :, vs] = d_state.astype(d_ends_ref.dtype)
        du = du_local_ref[b, ts, h, vs].astype(f32) + dot(x * decay_to_end, d_state)
        du_ref[b, ts, h, vs] = du.astype(du_ref.dtype)
        d_state = state_decay * d_state + dot(q_decayed, do_ref[b, qs, h, vs].astype(f32), trans_a=True)
        if has_erase:
            d_state = d_state - dot(w_ref[b, ts, h, :].astype(f32), du, trans_a=True)
        return d_state

    d_final = d_final_ref[b, h, :, vs].astype(f32)
    d_initial_ref[b, h, :, vs] = jax.lax.fori_loop(0, n_chunks, chunk, d_final)


def _score_grad_kernel(*refs, block_v, has_erase):
    """Block i (the grid's last axis) of one chunk's score gradients, over V in blocks of block_v:
    dP_i = dO_i U^T [c_q, L]; with an erase address also dZ_i = T[:, i]^T dU [c, V] and dA_i = -dZ_i U^T [c, L].

    Refs (blocks): do [c_q, V] (block i's tokens), u [L, V]; with an erase address t [L, c] (block i's columns of
    T, zero above the diagonal blocks), du [L, V]; outputs dp [c_q, L], then dz [c, V], da [c, L] (dp, da
    float32)."""
    if has_erase:
        do_ref, u_ref, t_ref, du_ref, dp_ref, dz_ref, da_ref = refs
    else:
        (do_ref, u_ref, dp_ref), t_ref = refs, None
    f32 = jnp.float32
    d_p, d_a = 0.0, 0.0
    for v in range(u_ref.shape[1] // block_v):
        vs = pl.ds(v * block_v, block_v)
        u = u_ref[:, vs].astype(f32)
        d_p = d_p + dot(do_ref[:, vs].astype(f32), u, trans_b=True)
        if has_erase:
            dz = dot(t_ref[...].astype(f32), du_ref[:, vs].astype(f32), trans_a=True)
            dz_ref[:, vs] = dz.astype(dz_ref.dtype)
            d_a = d_a - dot(dz, u, trans_b=True)
    dp_ref[...] = d_p.astype(dp_ref.dtype)
    if has_erase:
        da_ref[...] = d_a.astype(da_ref.dtype)


def _key_grad_kernel(*refs, block_tokens, per_token, block_v, has_erase, has_segments, row_grid, low_dots):
    """One chunk's gradients on one block of BK key channels, block by block of 16 tokens (c = 16 P rows):

        dq_k = (dO_k S^T) exp(Gq_k) (rows that see S) + sum_{j <= k} d_q(P_kj)
        dy_k = -(dZ_k S^T) exp(G_k) (rows that see S) + sum_{j <= k} d_y(A_kj)
        dx_k = (U_k dS'^T) exp(G_last - G_k) (rows that reach S') + sum_{i >= k} d_x(P_ik) + d_x(A_ik)
        dgq_k = q_k dq_k,   dg_k = y_k dy_k - x_k dx_k (+ on the chunk's last row: d G_last below)
        d G_last = exp(G_last) rowsum(S * dS') (if the chunk's last segment began before it)
                   + sum_k colsum(x_k (U_k dS'^T) exp(G_last - G_k))

    with the pair terms by `block_scores_grad` (one side per call, the forward's references), the products over V
    in blocks of block_v. Scalar decays (D = 1): dgq and dg are this K block's channel sums, [rows, 1].
    `row_block` is one row block k's part; row_grid False: this program walks the chunk's blocks k in order and
    adds d G_last to dg's last row; row_grid True: the grid's last axis picks k, the outputs are block k's rows and
    the program writes its share of d G_last (the G_last - G_k term of its rows, and the state term for k = n - 1)
    to d_last, which XLA adds up.

    Refs (blocks): q [C, BK], gq [C, D'], x [L, BK], y [L, BK] (erase), g [L, D'] (D' = BK, or 1 for a scalar
    decay), u [L, V], dz [L, V] (erase), do [C, V], s, ds [BK, V] (the chunk's start state and end-state gradient),
    dp [C, L], da [L, L] (erase), then seg_q [C], seg [L], seg_prev [1] with segments; outputs dq [C, BK], dgq
    [C, D'], dx [L, BK], dy [L, BK] (erase), dg [L, D'] (dgq, dg float32), their row block k's rows with row_grid
    ([16, .], [c, .]), then d_last [1, D'] (float32)."""
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    q_ref, gq_ref, x_ref, y_ref, g_ref = take(), take(), take(), take(has_erase), take()
    u_ref, dz_ref, do_ref, s_ref = take(), take(has_erase), take(), take()
    ds_ref, dp_ref, da_ref = take(), take(), take(has_erase)
    seg_q_ref, seg_ref, prev_ref = take(has_segments), take(has_segments), take(has_segments)
    dq_ref, dgq_ref, dx_ref, dy_ref, dg_ref = take(), take(), take(), take(has_erase), take()
    d_last_ref = take(row_grid)
    f32 = jnp.float32
    block, length, width = block_tokens * per_token, x_ref.shape[0], g_ref.shape[1]
    n = length // block
    rows = [pl.ds(i * block, block) for i in range(n)]
    tokens = [pl.ds(i * block_tokens, block_tokens) for i in range(n)]
    v_blocks = [pl.ds(v * block_v, block_v) for v in range(u_ref.shape[1] // block_v)]
    load = lambda ref, s: ref[s, :].astype(f32)  # noqa: E731
    g_last = g_ref[pl.ds(length - 1, 1), :]  # [1, D']
    a_local, q_local = iota(block) > iota(block, 1), causal_query_mask(block_tokens, per_token)
    seg, seg_t, seg_q, seg_prev, seg_last = chunk_segments(seg_q_ref, seg_ref, prev_ref, rows, tokens)

    # low_dots with bfloat16 storage: the state products take their stored bf16 operands as they are (exact: the
    # same products as in float32), the block pairs' products round theirs to bf16
    low = jnp.bfloat16 if low_dots and x_ref.dtype == jnp.bfloat16 else None

    def times_state(a_ref, s, state_ref):
        """a[s] state^T over V blocks: [m, V] [BK, V]^T -> [m, BK]."""
        as_stored = low is not None and a_ref.dtype == state_ref.dtype == low
        cast = (lambda t: t) if as_stored else (lambda t: t.astype(f32))  # noqa: E731
        return sum(dot(cast(a_ref[s, v]), cast(state_ref[:, v]), trans_b=True) for v in v_blocks)

    def pair(a_ref, ga_ref, i, j, d_ref, local, seg_a, side):
        """One side of block pair (i, j)'s gradient: rows i of a (queries: tokens; else sub-step rows) against
        key block j."""
        a_rows = tokens[i] if a_ref is q_ref else rows[i]
        d = d_ref[a_rows, rows[j]].astype(f32)
        mask = pair_mask(local, i, j, seg_a[i], seg_t[j])
        a, b = load(a_ref, a_rows), load(x_ref, rows[j])
        return block_scores_grad(a, ga_ref[a_rows, :], b, g_ref[rows[j], :], d, mask, i == j, side, operands=low)

    def d_state_last():
        """The state's term of d G_last: exp(G_last) rowsum(S * dS'), [1, BK]."""
        d_decay = sum(
            jnp.sum((s_ref[:, v].astype(f32) * ds_ref[:, v].astype(f32)).T, axis=0, keepdims=True) for v in v_blocks
        )
        return in_segment(jnp.exp(g_last), seg_last, seg_prev) * d_decay

    def row_block(k, out_tokens, out_rows):
        """Row block k: writes dq, dgq (at out_tokens), dx and dy (at out_rows); returns dg_k [c, D'] without the
        G_last terms, and its rows' term of d G_last [1, BK]."""
        q, gq = load(q_ref, tokens[k]), gq_ref[tokens[k], :]
        dq = in_segment(times_state(do_ref, tokens[k], s_ref), seg_q[k], seg_prev) * jnp.exp(gq)
        for j in range(k + 1):
            dq = dq + pair(q_ref, gq_ref, k, j, dp_ref, q_local, seg_q, "a")
        dq_ref[out_tokens, :] = dq.astype(dq_ref.dtype)
        dgq_ref[out_tokens, :] = decay_width(q * dq, width)

        x, g = load(x_ref, rows[k]), g_ref[rows[k], :]
        dx_end = times_state(u_ref, rows[k], ds_ref) * in_segment(jnp.exp(g_last - g), seg[k], seg_last)
        d_last = jnp.sum(x * dx_end, axis=0, keepdims=True)
        dx = dx_end
        for i in range(k, n):
            dx = dx + pair(q_ref, gq_ref, i, k, dp_ref, q_local, seg_q, "b")
            if has_erase:
                dx = dx + pair(y_ref, g_ref, i, k, da_ref, a_local, seg, "b")
        dx_ref[out_rows, :] = dx.astype(dx_ref.dtype)
        dg = -x * dx
        if has_erase:
            dy = -in_segment(times_state(dz_ref, rows[k], s_ref), seg[k], seg_prev) * jnp.exp(g)
            for j in range(k + 1):
                dy = dy + pair(y_ref, g_ref, k, j, da_ref, a_local, seg, "a")
            dy_ref[out_rows, :] = dy.astype(dy_ref.dtype)
            dg = dg + load(y_ref, rows[k]) * dy
        return decay_width(dg, width), d_last

    if not row_grid:
        d_last = d_state_last()  # d G_last, [1, BK]
        for k in range(n):
            dg, d_end = row_block(k, tokens[k], rows[k])
            d_last = d_last + d_end
            if k == n - 1:
                dg = dg + jnp.where(iota(block) == block - 1, decay_width(d_last, width), 0.0)
            dg_ref[rows[k], :] = dg
        return

    for k in range(n):  # one static body per row block, the grid's last axis picking it

        @pl.when(pl.program_id(4) == k)
        def _(k=k):
            dg, d_last = row_block(k, pl.ds(0, block_tokens), pl.ds(0, block))
            dg_ref[...] = dg
            if k == n - 1:
                d_last = d_last + d_state_last()
            d_last_ref[...] = decay_width(d_last, width)


# ----------------------------------------------------------------------------------------------------------
# the backward on prepared inputs
# ----------------------------------------------------------------------------------------------------------


def chunk_backward(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, d_o, d_final, *, chunk_size, interpret,
    storage=None, config=None, forward_config=None,
):  # fmt: skip
    """Gradients of `chunk_fwd.chunk_forward` (same prepared inputs and storage) given d_o [B, T, H, V] and d_final
    [B, H, K, V], the cotangents of its output and final state. config: this module's Config (default
    DEFAULT_CONFIG); forward_config: the recompute's chunk_fwd.Config (default chunk_fwd's).

    Returns (dq, dgq, dx, dy, dz, dgcum, d_initial_state), each shaped like its input (dy None when y is None):
    float32, but dq, dx, dy, dz in the storage dtype with 16-bit storage and config.low_grads."""
    config = config or default_config()
    forward_config = forward_config or chunk_fwd.default_config()
    if storage is not None and forward_config.low_inputs:
        q, x, y, z, d_o = (None if t is None else t.astype(storage) for t in (q, x, y, z, d_o))
    batch, length, heads, key = q.shape
    per_token = x.shape[1] // length
    rows, value, dim = per_token * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    block_tokens = min(BLOCK_TOKENS, chunk_size)
    n_blocks, block = chunk_size // block_tokens, rows * block_tokens // chunk_size
    has_erase, has_segments = y is not None, seg is not None
    f32 = jnp.float32
    grad_dtype = jnp.dtype(storage) if storage is not None and config.low_grads else f32
    shape = jax.ShapeDtypeStruct
    scores, w, u, states, _, t = chunk_fwd.chunk_states(
        q,
        gq,
        x,
        y,
        z,
        gcum,
        initial_state,
        seg,
        seg_q,
        seg_prev,
        chunk_size=chunk_size,
        interpret=interpret,
        config=forward_config,
        storage=storage,
        inverse=True,
    )

    block_v = min(config.value_grad_block_v, value)
    du_local = triton_call(
        value_grad_kernel,
        config.value_grad_warps,
        interpret,
        grid=(batch, heads, n_chunks, value // block_v),
        in_specs=[tile_spec(chunk_size, rows, 4), tile_spec(chunk_size, block_v, 4, v_block=True)],
        out_specs=tile_spec(rows, block_v, 4, v_block=True),
        out_shape=shape(z.shape, grad_dtype),
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
        out_shape=[
            shape(z.shape, grad_dtype),
            shape((batch, heads, n_chunks, key, value), grad_dtype),
            shape((batch, heads, key, value), f32),
        ],
    )(
        *(a for a in (du_local, q, gq, x, gcum, w, d_o, d_final) if a is not None),
        *((seg, seg_q, seg_prev) if has_segments else ()),
    )

    def block_spec(height, width, blocks_of=1):
        """One block (of `blocks_of` per chunk) of rows, the grid's last index picking it, on (B, H, N, n)."""
        return pl.BlockSpec((None, height, None, width), lambda b, h, n, i: (b, n * blocks_of + i, h, 0))

    chunk_spec = lambda height, width: pl.BlockSpec((None, height, None, width), lambda b, h, n, i: (b, n, h, 0))  # noqa: E731
    score_v = min(config.block_v, value)
    d_scores = triton_call(
        functools.partial(_score_grad_kernel, block_v=score_v, has_erase=has_erase),
        config.score_grad_warps,
        interpret,
        grid=(batch, heads, n_chunks, n_blocks),
        in_specs=[block_spec(block_tokens, value, n_blocks), chunk_spec(rows, value)]
        + (
            [pl.BlockSpec((None, rows, None, block), lambda b, h, n, i: (b, n, h, i)), chunk_spec(rows, value)]
            if has_erase
            else []
        ),
        out_specs=[block_spec(block_tokens, rows, n_blocks)]
        + ([block_spec(block, value, n_blocks), block_spec(block, rows, n_blocks)] if has_erase else []),
        out_shape=[shape((batch, length, heads, rows), f32)]
        + ([shape(z.shape, grad_dtype), shape((batch, length * per_token, heads, rows), f32)] if has_erase else []),
    )(*(a for a in (d_o, u, t, du if has_erase else None) if a is not None))
    d_p, dz, d_a = d_scores if has_erase else (d_scores[0], None, None)

    block_k = min(config.block_k, key)
    n_k = key // block_k
    channel = dim != 1  # a scalar decay's gradients are partial sums per K block, [.., n_k]
    width = block_k if channel else 1
    row_grid = config.key_grad_rows  # grid (B, H, N, K/BK) or (B, H, N, K/BK, n), the last index a row block

    def k_spec(height, w=block_k):
        return pl.BlockSpec((None, height, None, w), lambda b, h, n, j, *_: (b, n, h, j))

    def full(height, w):
        return pl.BlockSpec((None, height, None, w), lambda b, h, n, j, *_: (b, n, h, 0))

    def out_spec(height, w=block_k):
        """key_grad's outputs: a chunk's rows, or with row_grid row block i's (height: the rows per chunk)."""
        if not row_grid:
            return k_spec(height, w)
        return pl.BlockSpec((None, height // n_blocks, None, w), lambda b, h, n, j, i: (b, n * n_blocks + i, h, j))

    decay_spec = lambda height: k_spec(height) if channel else full(height, 1)  # noqa: E731
    state_spec = pl.BlockSpec((None, None, None, block_k, value), lambda b, h, n, j, *_: (b, h, n, j, 0))
    grads = triton_call(
        functools.partial(
            _key_grad_kernel,
            block_tokens=block_tokens,
            per_token=per_token,
            block_v=min(config.block_v, value),
            has_erase=has_erase,
            has_segments=has_segments,
            row_grid=row_grid,
            low_dots=config.key_grad_low_dots,
        ),
        config.key_grad_warps,
        interpret,
        grid=(batch, heads, n_chunks, n_k) + ((n_blocks,) if row_grid else ()),
        in_specs=[k_spec(chunk_size), decay_spec(chunk_size), k_spec(rows)]
        + ([k_spec(rows)] if has_erase else [])
        + [decay_spec(rows), full(rows, value)]
        + ([full(rows, value)] if has_erase else [])
        + [full(chunk_size, value), state_spec, state_spec, full(chunk_size, rows)]
        + ([full(rows, rows)] if has_erase else [])
        + (segment_specs(4, chunk_size, rows, 1) if has_segments else []),
        out_specs=[out_spec(chunk_size), out_spec(chunk_size, width), out_spec(rows)]
        + ([out_spec(rows)] if has_erase else [])
        + [out_spec(rows, width)]
        + ([out_spec(n_blocks, width)] if row_grid else []),
        out_shape=[shape(q.shape, grad_dtype), shape((batch, length, heads, n_k * width), f32)]
        + [shape(x.shape, grad_dtype)]
        + ([shape(x.shape, grad_dtype)] if has_erase else [])
        + [shape((*gcum.shape[:-1], n_k * width), f32)]
        + ([shape((batch, n_chunks * n_blocks, heads, n_k * width), f32)] if row_grid else []),
    )(
        *(a for a in (q, gq, x, y, gcum, u, dz, d_o, states, d_ends, d_p, d_a) if a is not None),
        *((seg_q, seg, seg_prev) if has_segments else ()),
    )
    if row_grid:  # each chunk's d G_last: its row blocks' shares, added to its last row
        *grads, d_last = grads
        d_last = jnp.sum(d_last.reshape(batch, n_chunks, n_blocks, heads, -1), axis=2)
        chunks = grads[-1].reshape(batch, n_chunks, rows, heads, -1)
        grads[-1] = chunks.at[:, :, -1].add(d_last).reshape(grads[-1].shape)
    if has_erase:
        dq, dgq, dx, dy, dgcum = grads
    else:  # U = Z: the values' gradient is dU
        (dq, dgq, dx, dgcum), dy, dz = grads, None, du
    if not channel:
        dgq, dgcum = (jnp.sum(d, axis=-1, keepdims=True) for d in (dgq, dgcum))
    return dq, dgq, dx, dy, dz, dgcum, d_initial
