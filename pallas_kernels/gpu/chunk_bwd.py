"""Backward of the chunkwise sub-step form as Pallas GPU kernels (Triton lowering).

Reference: the VJP of `edarnn.core.chunkwise`, taken on the prepared inputs of `chunk_fwd.chunk_forward` (the
per-token decay's gradient, a reverse cumulative sum inside each chunk, is JAX's autodiff of
`pallas_kernels.forms.prepare`). Given the cotangents dO of the output and dS_N of the final state:

0. Aqk, W, U, T = (I + A)^-1 and each chunk's start state S_n: kept by the forward (its solve then also writes
   T; the default, `pallas_kernels.forms.chunkwise`'s keep), or recomputed here by the forward's pair, solve and
   state kernels (`chunk_fwd.chunk_states`) where the forward kept only its inputs.
1. `value_grad` (grid V/BV x B x H x N, parallel; body tiles.value_grad_kernel): P_n^T dO_n, the values'
   gradient through the chunk's own queries (P = Aqk).
2. `state_grad` (grid V/BV x B x H, sequential over the chunks in reverse inside, dS in registers; Q exp(Gq)
   and the recompute's X~ = X exp(G_last - G) and exp(G_last) prepared by XLA):
       dU_n = P_n^T dO_n + (X exp(G_last - G))_n dS_{n+1}
       dS_n = Diag(exp G_last) dS_{n+1} + (Q exp Gq)_n^T dO_n - W_n^T dU_n
   storing dU_n and dS_{n+1}; dS_0 is the initial state's gradient.
3. `score_grad` (grid n x B x H x N, one program per block of 16 P rows; `_score_grad_kernel`): the small
   per-chunk gradient matrices dP = dO U^T [C, L] and, with an erase address, dZ = T^T dU [L, V] (z's gradient)
   and dA = -dZ U^T [L, L], unmasked (the next kernel masks them).
4. `state_products` (grid K/BK x B x H x N; `_state_products_kernel`): the products with the states dO_n S_n^T,
   U_n dS_{n+1}^T and (erase) dZ_n S_n^T on [C or L, BK] tiles, and rowsum(S_n * dS_{n+1}) (times exp(G_last),
   by XLA, the state's term of each chunk's last-log-decay gradient), float32.
5. `key_grad` (grid K/BK x B x H x N x n, one program per row block of 16 tokens, chunk and BK key channels,
   Config.block_k; `_key_grad_kernel`): the key-channel gradients dq, dx, dy and those of the cumulative
   log-decays gq and gcum from dP, dA and the state products, each program's share of its chunk's last-log-decay
   gradient written apart and added to dgcum's last row by XLA. A scalar decay's gradients are per-K-block
   partial sums, added up by XLA.

No program holds more than a few [16 P, BK], [L, 64] or [L, BK] float32 tiles (BK = Config.block_k;
docs/performance.md has the work and bytes).
With 16-bit inputs (`storage`), the recompute stores as the forward does (chunk_fwd.Config), dO is read in 16 bits
and dU, P^T dO, the dS_{n+1}, dZ and the gradients of q, x, y are stored in 16 bits (Config.low_grads: the rule's
input gradients end in that dtype anyway, so this adds one rounding before the preparation's VJP); dP, dA, the
log-decays' gradients and dS_0 are float32. Q exp(Gq) is prepared in the recompute's intermediates' dtype, and with
low_grads and bf16 products in the forward (chunk_fwd.product_operands) state_grad's products take dS and dU
rounded to bf16, as the forward's take S and U.
Segment masks are the forward's. Arrays keep the public [B, T, H, D] layout and grids their chunk-local axes first,
as in chunk_fwd, but for key_grad's row blocks: they are separate static bodies (`_key_grad_kernel`), and programs of
different bodies side by side missed the instruction cache (Nsight Compute, session 12: 84% of key_grad's stalls
were on instruction fetch with the row blocks first), so they stay the last, slowest, axis.
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
    in_segment,
    iota,
    pair_mask,
    value_grad_kernel,
)


class Config(NamedTuple):
    """Launch parameters and storage of the backward kernels (docs/performance.md has the measurements). The
    recompute runs the forward's kernels with chunk_fwd's Config."""

    value_grad_warps: int = 4
    state_grad_warps: int = 4
    score_grad_warps: int = 4
    state_products_warps: int = 4
    key_grad_warps: int = 2
    # Triton num_stages of the state_grad kernel (software pipelining of its loop), for K up to 128; beyond, the
    # loop's double-buffered [L, K] tiles do not fit in shared memory (K = 256: 248 KB asked, 227 KB on an H200)
    # and it runs unpipelined
    state_grad_stages: int = 2
    value_grad_block_v: int = 64
    state_grad_block_v: int = 64
    block_v: int = 64  # V blocks of the loops inside score_grad and state_products
    block_k: int = 64  # K blocks of the state_products and key_grad grids
    low_grads: bool = True  # with 16-bit inputs: P^T dO, dU, the dS_{n+1} and dq, dx, dy, dz in 16 bits


DEFAULT_CONFIG = Config()


def default_config():
    """DEFAULT_CONFIG, read at call time (benchmarks swap it to compare variants in one process)."""
    return DEFAULT_CONFIG


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


def _state_grad_kernel(*refs, chunk_size, per_token, n_chunks, has_erase, operands):
    """The sequential pass over one head's chunks, last first, for one V block (module docstring, kernel 2), on
    operands XLA prepared: Q exp(Gq) (`_decayed_queries`), X~ and exp(G_last) (chunk_fwd.end_decayed_keys).
    operands: the dtype dS and dU are rounded to for their products (chunk_fwd.product_operands), None for
    float32."""
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    du_local_ref, q_ref, x_ref, decay_ref = take(), take(), take(), take()
    w_ref, do_ref, d_final_ref = take(has_erase), take(), take()
    du_ref, d_ends_ref, d_initial_ref = refs
    f32 = jnp.float32
    j, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = du_ref.shape[-1] // pl.num_programs(0)
    vs = pl.ds(j * block_v, block_v)
    rows = chunk_size * per_token
    cast = (lambda t: t) if operands is None else (lambda t: t.astype(operands))  # noqa: E731

    def chunk(i, d_state):
        n = n_chunks - 1 - i
        ts, qs = pl.ds(n * rows, rows), pl.ds(n * chunk_size, chunk_size)
        d_ends_ref[b, h, n, :, vs] = d_state.astype(d_ends_ref.dtype)
        du = du_local_ref[b, ts, h, vs].astype(f32) + dot(x_ref[b, ts, h, :], cast(d_state))
        du_ref[b, ts, h, vs] = du.astype(du_ref.dtype)
        decay = decay_ref[b, n, h, :].reshape(-1, 1)  # [D, 1]
        d_state = decay * d_state + dot(q_ref[b, qs, h, :], do_ref[b, qs, h, vs], trans_a=True)
        if has_erase:
            d_state = d_state - dot(w_ref[b, ts, h, :], cast(du), trans_a=True)
        return d_state

    d_final = d_final_ref[b, h, :, vs].astype(f32)
    d_initial_ref[b, h, :, vs] = jax.lax.fori_loop(0, n_chunks, chunk, d_final)


def _score_grad_kernel(*refs, block_v, has_erase):
    """Block i (the grid's first axis) of one chunk's score gradients, over V in blocks of block_v:
    dP_i = dO_i U^T [c_q, L]; with an erase address also dZ_i = T[:, i]^T dU [c, V] and dA_i = -dZ_i U^T [c, L].

    Refs (blocks): do [c_q, V] (block i's tokens), u [L, V]; with an erase address t [L, c] (block i's columns of
    T, zero above the diagonal blocks), du [L, V]; outputs dp [c_q, L], then dz [c, V], da [c, L] (dp, da
    float32)."""
    if has_erase:
        do_ref, u_ref, t_ref, du_ref, dp_ref, dz_ref, da_ref = refs
    else:
        (do_ref, u_ref, dp_ref), t_ref = refs, None
    d_p, d_a = 0.0, 0.0
    for v in range(u_ref.shape[1] // block_v):
        vs = pl.ds(v * block_v, block_v)
        u = u_ref[:, vs]
        d_p = d_p + dot(do_ref[:, vs], u, trans_b=True)
        if has_erase:
            dz = dot(t_ref[...], du_ref[:, vs], trans_a=True)
            dz_ref[:, vs] = dz.astype(dz_ref.dtype)
            d_a = d_a - dot(dz, u, trans_b=True)
    dp_ref[...] = d_p.astype(dp_ref.dtype)
    if has_erase:
        da_ref[...] = d_a.astype(da_ref.dtype)


def _state_products_kernel(*refs, block_v, has_erase):
    """One chunk's products with its states on BK key channels, over V in blocks of block_v: dO S^T [C, BK],
    U dS'^T [L, BK], with an erase address dZ S^T [L, BK], and rowsum(S * dS') [1, BK] (the state's part of the
    last log-decay's gradient), all float32 (S the chunk's start state, dS' its end state's gradient).

    Refs (blocks): do [C, V], u [L, V], dz [L, V] (erase), s [BK, V], ds [BK, V]; outputs in that order."""
    if has_erase:
        do_ref, u_ref, dz_ref, s_ref, ds_ref, q_out, x_out, y_out, decay_out = refs
    else:
        (do_ref, u_ref, s_ref, ds_ref, q_out, x_out, decay_out), dz_ref, y_out = refs, None, None
    f32 = jnp.float32

    q_state, x_state, y_state, d_decay = 0.0, 0.0, 0.0, 0.0
    for v in range(u_ref.shape[1] // block_v):
        vs = pl.ds(v * block_v, block_v)
        s, ds = s_ref[:, vs], ds_ref[:, vs]
        q_state = q_state + dot(do_ref[:, vs], s, trans_b=True)
        x_state = x_state + dot(u_ref[:, vs], ds, trans_b=True)
        if has_erase:
            y_state = y_state + dot(dz_ref[:, vs], s, trans_b=True)
        d_decay = d_decay + jnp.sum((s.astype(f32) * ds.astype(f32)).T, axis=0, keepdims=True)
    q_out[...], x_out[...], decay_out[...] = q_state, x_state, d_decay
    if has_erase:
        y_out[...] = y_state


def _key_grad_kernel(*refs, block_tokens, per_token, has_erase, has_segments):
    """Row block k (the grid's last axis) of one chunk's gradients on one block of BK key channels (c = 16 P rows):

        dq_k = (dO S^T)_k exp(Gq_k) (rows that see S) + sum_{j <= k} d_q(P_kj)
        dy_k = -(dZ S^T)_k exp(G_k) (rows that see S) + sum_{j <= k} d_y(A_kj)
        dx_k = (U dS'^T)_k exp(G_last - G_k) (rows that reach S') + sum_{i >= k} d_x(P_ik) + d_x(A_ik)
        dgq_k = q_k dq_k,   dg_k = y_k dy_k - x_k dx_k
        d_last_k = colsum(x_k (U dS'^T)_k exp(G_last - G_k)): block k's share of d G_last

    with the pair terms by `block_scores_grad` (one side per call, the forward's references) and the products with
    the states (dO S^T, U dS'^T, dZ S^T) taken as inputs (`_state_products_kernel`). Scalar decays (D = 1): dgq,
    dg and d_last are this K block's channel sums, [rows, 1].

    Channel-wise decays factor the pairs below the diagonal: they share one reference per sum, so the row side's
    decay leaves the sum: for the key blocks j < k, with r the end of block k - 1,
    d_q(P_k<) = exp(Gq_k - r) * sum_j dP_kj (x_j exp(r - G_j)) (dy likewise, on the same x_j tiles), and for the
    row blocks i > k, with r' the end of block k, d_x = exp(r' - G_k) * sum_i dP_ik^T (q_i exp(Gq_i - r')) +
    dA_ik^T (y_i exp(G_i - r')); every factor <= 1. One exponential tile per block instead of two per pair, and
    each block loaded once (measured 1-3% faster than per pair, docs/performance.md); scalar decays, whose pair
    decay is a [c, c] outer difference, keep `block_scores_grad` per pair. (Session 13: the row sides (dq, dy)
    before the key side, for shorter live ranges, spilled more, 508k requests against 475k: not kept.)

    Refs (blocks): q [C, BK], gq [C, D'], x [L, BK], y [L, BK] (erase), g [L, D'] (D' = BK, or 1 for a scalar
    decay), dp [C, L], da [L, L] (erase), q_state [C, BK], x_state [L, BK], y_state [L, BK] (erase; the three state
    products, float32), then seg_q [C], seg [L], seg_prev [1] with segments; outputs, block k's rows: dq [16, BK],
    dgq [16, D'], dx [c, BK], dy [c, BK] (erase), dg [c, D'], d_last [1, D'] (dgq, dg, d_last float32)."""
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    q_ref, gq_ref, x_ref, y_ref, g_ref = take(), take(), take(), take(has_erase), take()
    dp_ref, da_ref = take(), take(has_erase)
    q_state_ref, x_state_ref, y_state_ref = take(), take(), take(has_erase)
    seg_q_ref, seg_ref, prev_ref = take(has_segments), take(has_segments), take(has_segments)
    dq_ref, dgq_ref, dx_ref, dy_ref, dg_ref, d_last_ref = take(), take(), take(), take(has_erase), take(), take()
    f32 = jnp.float32
    block, length, width = block_tokens * per_token, x_ref.shape[0], g_ref.shape[1]
    n = length // block
    rows = [pl.ds(i * block, block) for i in range(n)]
    tokens = [pl.ds(i * block_tokens, block_tokens) for i in range(n)]
    load = lambda ref, s: ref[s, :].astype(f32)  # noqa: E731
    g_last = g_ref[pl.ds(length - 1, 1), :]  # [1, D']
    a_local, q_local = iota(block) > iota(block, 1), causal_query_mask(block_tokens, per_token)
    seg, seg_t, seg_q, seg_prev, seg_last = chunk_segments(seg_q_ref, seg_ref, prev_ref, rows, tokens)

    # the two row sides of the pairs: the queries (token rows, against dP) and the erase addresses (against dA)
    sides = {"q": (q_ref, gq_ref, tokens, dp_ref, q_local, seg_q), "y": (y_ref, g_ref, rows, da_ref, a_local, seg)}

    def pair(side, i, j, grad_of):
        """One side ("a": the rows', "b": the keys') of block pair (i, j)'s gradient: row block i of `side`
        against key block j."""
        a_ref, ga_ref, a_rows, d_ref, local, seg_a = sides[side]
        d = d_ref[a_rows[i], rows[j]].astype(f32)
        mask = pair_mask(local, i, j, seg_a[i], seg_t[j])
        a, b = load(a_ref, a_rows[i]), load(x_ref, rows[j])
        return block_scores_grad(a, ga_ref[a_rows[i], :], b, g_ref[rows[j], :], d, mask, i == j, grad_of)

    present = ("q", "y") if has_erase else ("q",)
    factored = width > 1

    def d_block(d_ref, a_rows, j, seg_a):
        """The cotangent block of rows a_rows against key block j (off the diagonal), within one segment."""
        d = d_ref[a_rows, rows[j]].astype(f32)
        return d if seg_a is None else jnp.where(seg_a == seg_t[j], d, 0.0)

    def keys_before(k):
        """(r, [x_j exp(r - G_j) for the key blocks j < k]) with r the end of block k - 1 (factored)."""
        ref = g_ref[pl.ds(k * block - 1, 1), :]
        return ref, [load(x_ref, rows[j]) * jnp.exp(ref - g_ref[rows[j], :]) for j in range(k)]

    def rows_before(k, side, keys):
        """The a-side gradient of row block k (side "q" or "y") from its pairs with the key blocks j < k."""
        _, ga_ref, a_rows, d_ref, _, seg_a = sides[side]
        if not factored:
            return sum((pair(side, k, j, "a") for j in range(k)), 0.0)
        if k == 0:
            return 0.0
        ref, decayed = keys
        before = sum(dot(d_block(d_ref, a_rows[k], j, seg_a[k]), decayed[j]) for j in range(k))
        return jnp.exp(ga_ref[a_rows[k], :] - ref) * before

    def rows_after(k):
        """The key-side gradient of block k from its pairs with the row blocks i > k, both sides."""
        if k == n - 1:
            return 0.0
        ref = g_ref[pl.ds((k + 1) * block - 1, 1), :] if factored else None
        total = 0.0
        for side in present:
            a_ref, ga_ref, a_rows, d_ref, _, seg_a = sides[side]
            for i in range(k + 1, n):
                if not factored:
                    total = total + pair(side, i, k, "b")
                    continue
                a = load(a_ref, a_rows[i]) * jnp.exp(ga_ref[a_rows[i], :] - ref)
                total = total + dot(d_block(d_ref, a_rows[i], k, seg_a[i]), a, trans_a=True)
        return jnp.exp(ref - g_ref[rows[k], :]) * total if factored else total

    def row_block(k):
        keys = keys_before(k) if factored and k > 0 else None
        q, gq = load(q_ref, tokens[k]), gq_ref[tokens[k], :]
        dq = in_segment(load(q_state_ref, tokens[k]), seg_q[k], seg_prev) * jnp.exp(gq)
        dq = dq + pair("q", k, k, "a") + rows_before(k, "q", keys)
        dq_ref[...] = dq.astype(dq_ref.dtype)
        dgq_ref[...] = decay_width(q * dq, width)

        x, g = load(x_ref, rows[k]), g_ref[rows[k], :]
        dx = load(x_state_ref, rows[k]) * in_segment(jnp.exp(g_last - g), seg[k], seg_last)
        d_last_ref[...] = decay_width(jnp.sum(x * dx, axis=0, keepdims=True), width)
        for side in present:
            dx = dx + pair(side, k, k, "b")
        dx = dx + rows_after(k)
        dx_ref[...] = dx.astype(dx_ref.dtype)
        dg = -x * dx
        if has_erase:
            dy = -in_segment(load(y_state_ref, rows[k]), seg[k], seg_prev) * jnp.exp(g)
            dy = dy + pair("y", k, k, "a") + rows_before(k, "y", keys)
            dy_ref[...] = dy.astype(dy_ref.dtype)
            dg = dg + load(y_ref, rows[k]) * dy
        dg_ref[...] = decay_width(dg, width)

    for k in range(n):  # one static body per row block, the grid's last axis picking it
        pl.when(pl.program_id(4) == k)(functools.partial(row_block, k))


# ----------------------------------------------------------------------------------------------------------
# the backward on prepared inputs
# ----------------------------------------------------------------------------------------------------------


def _decayed_queries(q, gq, seg_q, seg_prev, chunk_size, dtype):
    """Q exp(Gq) [B, T, H, K] in dtype, the queries' view of their chunk's start state: zero on the tokens of a
    segment that began inside their chunk. q [B, T, H, K], gq [B, T, H, D]; seg_q [B, T] and seg_prev [B, N]
    running segment numbers, or None."""
    q_decayed = q.astype(jnp.float32) * jnp.exp(gq)
    if seg_q is not None:
        batch, length = seg_q.shape
        by_chunk = seg_q.reshape(batch, length // chunk_size, chunk_size)
        carry_in = (by_chunk == seg_prev[:, :, None]).reshape(batch, length)
        q_decayed = jnp.where(carry_in[:, :, None, None], q_decayed, 0.0)
    return q_decayed.astype(dtype)


def chunk_backward(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, d_o, d_final, *, chunk_size, interpret,
    storage=None, config=None, forward_config=None, kept=None,
):  # fmt: skip
    """Gradients of `chunk_fwd.chunk_forward` (same prepared inputs and storage) given d_o [B, T, H, V] and d_final
    [B, H, K, V], the cotangents of its output and final state. config: this module's Config (default
    DEFAULT_CONFIG); forward_config: the recompute's chunk_fwd.Config (default chunk_fwd's); kept: the
    forward's `chunk_fwd.ChunkStates` (computed with inverse=True and the same storage and forward_config), or None
    to recompute them.

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
    chunk = kept
    if chunk is None:  # the recompute
        chunk = chunk_fwd.chunk_states(
            *(q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev),
            chunk_size=chunk_size,
            interpret=interpret,
            config=forward_config,
            storage=storage,
            inverse=True,
        )
    scores, w, u, states, t = chunk.scores, chunk.w, chunk.u, chunk.states, chunk.t
    x_to_end, state_decay = chunk.x_to_end, chunk.state_decay
    low = x_to_end.dtype  # the intermediates' dtype
    q_decayed = _decayed_queries(q, gq, seg_q, seg_prev, chunk_size, low)

    block_v = min(config.value_grad_block_v, value)
    du_local = triton_call(
        value_grad_kernel,
        config.value_grad_warps,
        interpret,
        grid=(value // block_v, batch, heads, n_chunks),
        in_specs=[tile_spec(chunk_size, rows), tile_spec(chunk_size, block_v, v_block=True)],
        out_specs=tile_spec(rows, block_v, v_block=True),
        out_shape=shape(z.shape, grad_dtype),
    )(scores, d_o)

    state_block_v = chunk_fwd.sequential_block_v(
        config.state_grad_block_v, batch * heads, value, forward_config.state_programs
    )
    du, d_ends, d_initial = triton_call(
        functools.partial(
            _state_grad_kernel,
            chunk_size=chunk_size,
            per_token=per_token,
            n_chunks=n_chunks,
            has_erase=has_erase,
            operands=chunk_fwd.product_operands(forward_config, storage) if config.low_grads else None,
        ),
        config.state_grad_warps,
        interpret,
        stages=config.state_grad_stages if key <= 128 else 1,
        grid=(value // state_block_v, batch, heads),
        out_shape=[
            shape(z.shape, grad_dtype),
            shape((batch, heads, n_chunks, key, value), grad_dtype),
            shape((batch, heads, key, value), f32),
        ],
    )(*(a for a in (du_local, q_decayed, x_to_end, state_decay, w, d_o, d_final) if a is not None))

    def block_spec(height, width, blocks_of=1):
        """One block (of `blocks_of` per chunk) of rows, the grid's first index picking it, on (n, B, H, N)."""
        return pl.BlockSpec((None, height, None, width), lambda i, b, h, n: (b, n * blocks_of + i, h, 0))

    chunk_spec = lambda height, width: pl.BlockSpec((None, height, None, width), lambda i, b, h, n: (b, n, h, 0))  # noqa: E731
    score_v = min(config.block_v, value)
    d_scores = triton_call(
        functools.partial(_score_grad_kernel, block_v=score_v, has_erase=has_erase),
        config.score_grad_warps,
        interpret,
        grid=(n_blocks, batch, heads, n_chunks),
        in_specs=[block_spec(block_tokens, value, n_blocks), chunk_spec(rows, value)]
        + (
            [pl.BlockSpec((None, rows, None, block), lambda i, b, h, n: (b, n, h, i)), chunk_spec(rows, value)]
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

    state_spec = pl.BlockSpec((None, None, None, block_k, value), lambda j, b, h, n: (b, h, n, j, 0))
    chunk_rows = lambda height: pl.BlockSpec((None, height, None, value), lambda j, b, h, n: (b, n, h, 0))  # noqa: E731
    chunk_keys = lambda height: pl.BlockSpec((None, height, None, block_k), lambda j, b, h, n: (b, n, h, j))  # noqa: E731
    *state_products, d_decay = triton_call(
        functools.partial(_state_products_kernel, block_v=min(config.block_v, value), has_erase=has_erase),
        config.state_products_warps,
        interpret,
        grid=(n_k, batch, heads, n_chunks),
        in_specs=[chunk_rows(chunk_size), chunk_rows(rows)]
        + ([chunk_rows(rows)] if has_erase else [])
        + [state_spec, state_spec],
        out_specs=[chunk_keys(chunk_size), chunk_keys(rows)]
        + ([chunk_keys(rows)] if has_erase else [])
        + [chunk_keys(1)],
        out_shape=[shape((batch, length, heads, key), f32), shape((*x.shape[:-1], key), f32)]
        + ([shape((*x.shape[:-1], key), f32)] if has_erase else [])
        + [shape((batch, n_chunks, heads, key), f32)],
    )(*(a for a in (d_o, u, dz, states, d_ends) if a is not None))

    def k_spec(height, w=block_k):
        return pl.BlockSpec((None, height, None, w), lambda j, b, h, n, i: (b, n, h, j))

    def full(height, w):
        return pl.BlockSpec((None, height, None, w), lambda j, b, h, n, i: (b, n, h, 0))

    def out_spec(height, w=block_k):
        """Row block i's rows of a chunk's (height: the rows per chunk)."""
        return pl.BlockSpec((None, height // n_blocks, None, w), lambda j, b, h, n, i: (b, n * n_blocks + i, h, j))

    decay_spec = lambda height: k_spec(height) if channel else full(height, 1)  # noqa: E731

    *grads, d_last = triton_call(
        functools.partial(
            _key_grad_kernel,
            block_tokens=block_tokens,
            per_token=per_token,
            has_erase=has_erase,
            has_segments=has_segments,
        ),
        config.key_grad_warps,
        interpret,
        grid=(n_k, batch, heads, n_chunks, n_blocks),
        in_specs=[k_spec(chunk_size), decay_spec(chunk_size), k_spec(rows)]
        + ([k_spec(rows)] if has_erase else [])
        + [decay_spec(rows), full(chunk_size, rows)]
        + ([full(rows, rows)] if has_erase else [])
        + [k_spec(chunk_size), k_spec(rows)]
        + ([k_spec(rows)] if has_erase else [])
        + (segment_specs(chunk_size, rows, 1, after=1) if has_segments else []),
        out_specs=[out_spec(chunk_size), out_spec(chunk_size, width), out_spec(rows)]
        + ([out_spec(rows)] if has_erase else [])
        + [out_spec(rows, width), out_spec(n_blocks, width)],
        out_shape=[shape(q.shape, grad_dtype), shape((batch, length, heads, n_k * width), f32)]
        + [shape(x.shape, grad_dtype)]
        + ([shape(x.shape, grad_dtype)] if has_erase else [])
        + [shape((*gcum.shape[:-1], n_k * width), f32), shape((batch, n_chunks * n_blocks, heads, n_k * width), f32)],
    )(
        *(a for a in (q, gq, x, y, gcum, d_p, d_a, *state_products) if a is not None),
        *((seg_q, seg, seg_prev) if has_segments else ()),
    )
    if not channel:
        grads[1], grads[-1] = (jnp.sum(d, axis=-1, keepdims=True) for d in (grads[1], grads[-1]))
        d_last = jnp.sum(d_last, axis=-1, keepdims=True)
    # each chunk's d G_last: its row blocks' shares and the state's term exp(G_last) rowsum(S * dS'), the latter
    # where the chunk's last segment began before it (the state kernels' masked exp(G_last))
    d_state = state_decay * (d_decay if channel else jnp.sum(d_decay, axis=-1, keepdims=True))
    d_last = jnp.sum(d_last.reshape(batch, n_chunks, n_blocks, heads, dim), axis=2) + d_state
    chunks = grads[-1].reshape(batch, n_chunks, rows, heads, dim)
    grads[-1] = chunks.at[:, :, -1].add(d_last).reshape(gcum.shape)
    if has_erase:
        dq, dgq, dx, dy, dgcum = grads
    else:  # U = Z: the values' gradient is dU
        (dq, dgq, dx, dgcum), dy, dz = grads, None, du
    return dq, dgq, dx, dy, dz, dgcum, d_initial
