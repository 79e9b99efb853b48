"""Forward of the chunkwise sub-step form as Pallas GPU kernels (Triton lowering).

Reference: `edarnn.core.chunkwise`; these kernels take the same prepared inputs and must give the same result
to float32 rounding (in float32; 16-bit inputs are read and their intermediates stored in 16 bits, see Config).
Specialised by static flags (scalar or channel-wise decay, with or without an erase address y, with or without
segments; P sub-steps per token):

1. `pair`   (grid B x H x N x n^2, parallel; body tiles.pair_scores_kernel): one program per block pair (i, j)
   of 16-token blocks: the query scores Aqk_ij and, with an erase address, the pair scores A_ij (zeros for j > i).
2. `solve`  (grid B x H x N, only with an erase address; body tiles.solve_kernel): T = (I + A)^-1 from A by block
   substitution, W = T (Y exp G) and U~ = T Z.
   (One fused kernel per chunk for 1 and 2, `tiles.intra_kernel`, the TPU's layout, was 1.08x / 1.48x / 2.83x
   slower here for gated_delta_rule / kda / eda at equal float32 storage, one H200 call each; see Config.)
3. `state`  (grid B x H x V/BV, sequential over chunks inside): U = U~ - W S, the chunk's start state S, and
   S <- Diag(exp G_last) S + (X exp(G_last - G))^T U, with S in registers (or, Config.state_pass
   "associative", the same by XLA's associative scan over the chunks' affine maps).
4. `output` (grid B x H x N x V/BV, parallel; body in pallas_kernels.tiles): O = (Q exp Gq) S + Aqk U.

`chunk_states` (kernels 1 to 3) is also the backward's recompute (chunk_bwd.py), which has the solve kernel write
T = (I + A)^-1 as well.

Arrays keep the public [B, T, H, D] layout: a chunk of one head is a strided [rows, D] tile.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from edarnn import core
from pallas_kernels.tiles import (
    BLOCK_TOKENS,
    dot,
    end_decays,
    output_kernel,
    pair_scores_kernel,
    solve_kernel,
)


class Config(NamedTuple):
    """Launch parameters and storage, by measurement at B=4, T=4096, H=16, K=V=128, bf16 (docs/performance.md,
    H200, 2026-12-01, forward medians, one call per rule): the pair-scores and solve kernels in place of one fused
    intra kernel, both with float32 storage, took gated_delta_rule from 2.46 to 2.27 ms, kda from 4.43 to 2.99 and
    eda from 23.9 to 8.45; 16-bit storage (low_*) then 2.27 -> 1.76, 2.99 -> 2.74 (kda), 8.45 -> 7.71 (eda); solve
    with 4 warps for either P (kda 2.98 with 2; eda 7.10 against 7.71 with 8); pair kernel 4 warps (8: kda 3.71,
    eda 8.64; 2: same as 4 for gated_delta_rule); state kernel blocks of 64 values (32: gated_delta_rule 2.00
    against 1.76); software pipelining of the state kernel's loop (num_stages 2) changed nothing, so every kernel
    has 1. A later call (session 5) gave the default 1.77 / 2.74 / 7.02 ms again.
    low_products (untimed, off): with bfloat16 storage of everything (low_*), the state kernel's products W S and
    (X exp(G_last - G))^T U and the output kernel's (Q exp Gq) S take their computed operands (the running state,
    U before it is stored, the decayed keys and queries) rounded to bfloat16, as flash-linear-attention's kernels
    do, for the 16-bit matrix units; products of two stored tiles are 16-bit with or without it (exact).
    state_pass (untimed, "kernel"): "associative" replaces the state kernel by XLA's batched products: each chunk's
    affine map S -> (Diag(exp G_last) - X~^T W) S + X~^T U~ composed by `lax.associative_scan`
    (`edarnn.core.chunk_states_associative`), then U = U~ - W S for all chunks at once; O(log N) depth instead of
    N sequential steps of B x H x V/64 programs, for when B x H is small and T long (training at 32k: 12 heads).
    The backward's state_grad kernel is replaced the same way (chunk_bwd._state_grads_associative). Its products
    are XLA's float32 ones (low_products does not apply to them)."""

    pair_warps: tuple[int, int] = (4, 4)  # pair-scores kernel, by sub-steps per token
    solve_warps: tuple[int, int] = (4, 4)  # solve kernel, by sub-steps per token
    state_warps: int = 4
    output_warps: int = 4
    state_block_v: int = 64
    output_block_v: int = 64
    low_inputs: bool = True  # q, x, y, z read in the storage dtype (cast where XLA makes them)
    low_intermediates: bool = True  # Aqk, W, U~ in the inputs' storage dtype (bf16 inputs: bf16); A stays f32
    low_states: bool = True  # U and the chunks' start states likewise
    low_products: bool = False  # with bf16 storage: the state and output kernels' products on bf16 operands
    state_pass: str = "kernel"  # "kernel": the sequential state kernel; "associative": XLA, see the docstring


DEFAULT_CONFIG = Config()


def default_config():
    """DEFAULT_CONFIG, read at call time (benchmarks swap it to compare variants in one process)."""
    return DEFAULT_CONFIG


def product_operands(config, storage):
    """The dtype the state and output kernels round their products' computed operands to: bfloat16 with
    config.low_products, bfloat16 storage and every stored operand of those products in it (low_intermediates,
    low_states: else the products would be float32 anyway), else None (float32). float16 storage leaves it off:
    the running state could overflow float16's range."""
    stored_low = config.low_intermediates and config.low_states
    low = storage is not None and jnp.dtype(storage) == jnp.bfloat16 and stored_low
    return jnp.dtype(jnp.bfloat16) if config.low_products and low else None


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


def _state_kernel(*refs, rows, n_chunks, has_erase, has_segments, operands):
    """The sequential pass over one head's chunks for one V block (see the module docstring); operands: the dtype
    the products' computed operands are rounded to (Config.low_products), None for float32."""
    refs = list(refs)
    u_tilde_ref = refs.pop(0)
    w_ref = refs.pop(0) if has_erase else None
    x_ref, g_ref, s0_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    seg_ref, prev_ref = (refs.pop(0), refs.pop(0)) if has_segments else (None, None)
    u_ref, states_ref, final_ref = refs
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = u_ref.shape[-1] // pl.num_programs(2)
    vs = pl.ds(j * block_v, block_v)

    cast = (lambda t: t) if operands is None else (lambda t: t.astype(operands))  # noqa: E731

    def chunk(n, state):
        ts = pl.ds(n * rows, rows)
        x, g = x_ref[b, ts, h, :].astype(jnp.float32), g_ref[b, ts, h, :]
        u = u_tilde_ref[b, ts, h, vs].astype(jnp.float32)
        if has_erase:
            u = u - dot(w_ref[b, ts, h, :], cast(state))
        g_last = g_ref[b, n * rows + rows - 1, h, :].reshape(1, -1)
        segs = (
            (seg_ref[b, ts].reshape(rows, 1), seg_ref[b, n * rows + rows - 1], prev_ref[b, n]) if has_segments else ()
        )
        decay_to_end, state_decay = end_decays(g, g_last, *segs)
        u_ref[b, ts, h, vs] = u.astype(u_ref.dtype)
        states_ref[b, h, n, :, vs] = state.astype(states_ref.dtype)
        return state_decay * state + dot(cast((x * decay_to_end).T), cast(u))

    final_ref[b, h, :, vs] = jax.lax.fori_loop(0, n_chunks, chunk, s0_ref[b, h, :, vs].astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# the forward on prepared inputs
# ----------------------------------------------------------------------------------------------------------


def tile_spec(rows, width, grid_rank=3, v_block=False):
    """BlockSpec of one chunk's rows of a [B, T', H, width...] array on the grid (B, H, N) or (B, H, N, V/BV);
    v_block: the last axis is cut in blocks of `width`, the grid's last index picks one."""
    if grid_rank == 3:
        return pl.BlockSpec((None, rows, None, width), lambda b, h, n: (b, n, h, 0))
    return pl.BlockSpec((None, rows, None, width), lambda b, h, n, j: (b, n, h, j if v_block else 0))


def triton_call(kernel, warps, interpret, **kwargs):
    """pl.pallas_call with the Triton compiler parameters (no software pipelining of loops: see Config)."""
    params = plt.CompilerParams(num_warps=warps, num_stages=1)
    return pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kwargs)


def segment_specs(grid_rank, *widths):
    """BlockSpecs of segment arrays ([B, rows of a chunk] or [B, 1]) on a grid (B, H, N) or (B, H, N, ...)."""
    if grid_rank == 3:
        return [pl.BlockSpec((None, r), lambda b, h, n: (b, n)) for r in widths]
    return [pl.BlockSpec((None, r), lambda b, h, n, *_: (b, n)) for r in widths]


def pair_specs(chunk_size, rows, n_blocks, key, dim, has_erase, has_segments):
    """BlockSpecs of the pair-scores kernel on the grid (B, H, N, n_blocks^2): pair p is row block i = p // n,
    key block j = p % n. Inputs q, gq (query block i), x, g (key block j), then y, g (row block i), then the
    segment numbers of block i's tokens and rows and of block j's rows; outputs Aqk, then A."""
    block_tokens, block = chunk_size // n_blocks, rows // n_blocks

    def spec(height, width, which):
        pick = (lambda p: p // n_blocks) if which == "i" else (lambda p: p % n_blocks)
        return pl.BlockSpec((None, height, None, width), lambda b, h, n, p: (b, n * n_blocks + pick(p), h, 0))

    def seg_spec(width, which):
        pick = (lambda p: p // n_blocks) if which == "i" else (lambda p: p % n_blocks)
        return pl.BlockSpec((None, width), lambda b, h, n, p: (b, n * n_blocks + pick(p)))

    ins = [spec(block_tokens, key, "i"), spec(block_tokens, dim, "i"), spec(block, key, "j"), spec(block, dim, "j")]
    ins += [spec(block, key, "i"), spec(block, dim, "i")] if has_erase else []
    ins += [seg_spec(block_tokens, "i"), seg_spec(block, "i"), seg_spec(block, "j")] if has_segments else []
    outs = [
        pl.BlockSpec((None, height, None, block), lambda b, h, n, p: (b, n * n_blocks + p // n_blocks, h, p % n_blocks))
        for height in ((block_tokens, block) if has_erase else (block_tokens,))
    ]
    return ins, outs


def chunk_states(
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
    *,
    chunk_size,
    interpret,
    config=None,
    storage=None,
    inverse=False,
):
    """The pair-scores, solve and state kernels on prepared inputs (see chunk_forward).
    Returns (scores [B, T, H, C P], each token's query scores against its chunk's sub-steps; w [B, T P, H, K],
    None without an erase address; u [B, T P, H, V]; states [B, H, N, K, V], each chunk's start state;
    final_state [B, H, K, V] f32; t [B, T P, H, C P], each chunk's T = (I + A)^-1 (zeros above its diagonal
    blocks) when `inverse` (the backward's recompute) and there is an erase address, else
    None). The scores, w, u~ and t are in `storage` (default float32) when config.low_intermediates, u and the
    states when config.low_states, else float32."""
    config = config or default_config()
    batch, length, heads, key = q.shape
    per_token = x.shape[1] // length
    rows, value, dim = per_token * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    block_tokens = min(BLOCK_TOKENS, chunk_size)
    n_blocks = chunk_size // block_tokens
    has_erase, has_segments = y is not None, seg is not None
    f32 = jnp.float32
    storage = jnp.dtype(storage or f32)
    low = storage if config.low_intermediates else f32
    state_dtype = storage if config.low_states else f32
    operands = product_operands(config, storage)
    t = None
    ins, outs = pair_specs(chunk_size, rows, n_blocks, key, dim, has_erase, has_segments)

    def pair_kernel(*refs):
        p = pl.program_id(3)
        kernel = functools.partial(
            pair_scores_kernel, per_token=per_token, has_erase=has_erase, has_segments=has_segments
        )
        kernel(*refs, i=p // n_blocks, j=p % n_blocks)

    pair_outs = triton_call(
        pair_kernel,
        config.pair_warps[per_token - 1],
        interpret,
        grid=(batch, heads, n_chunks, n_blocks * n_blocks),
        in_specs=ins,
        out_specs=outs,
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, rows), low)]
        + ([jax.ShapeDtypeStruct((batch, length * per_token, heads, rows), f32)] if has_erase else []),
    )(q, gq, x, gcum, *((y, gcum) if has_erase else ()), *((seg_q, seg, seg) if has_segments else ()))
    scores, w, u_tilde = pair_outs[0], None, z
    if has_erase:
        w, u_tilde, *t = triton_call(
            functools.partial(
                solve_kernel,
                block=rows // n_blocks,
                has_segments=has_segments,
                write_inverse=inverse,
            ),
            config.solve_warps[per_token - 1],
            interpret,
            grid=(batch, heads, n_chunks),
            in_specs=[tile_spec(rows, rows), tile_spec(rows, key), tile_spec(rows, value), tile_spec(rows, dim)]
            + (segment_specs(3, rows, 1) if has_segments else []),
            out_specs=[tile_spec(rows, key), tile_spec(rows, value)] + ([tile_spec(rows, rows)] if inverse else []),
            out_shape=[jax.ShapeDtypeStruct(x.shape, low), jax.ShapeDtypeStruct(z.shape, low)]
            + ([jax.ShapeDtypeStruct((batch, length * per_token, heads, rows), low)] if inverse else []),
        )(pair_outs[1], y, z, gcum, *((seg, seg_prev) if has_segments else ()))
        t = t[0] if inverse else None

    if config.state_pass not in ("kernel", "associative"):
        raise ValueError(f'chunk_fwd.Config.state_pass: expected "kernel" or "associative"; got {config.state_pass!r}')
    if config.state_pass == "associative":
        u, states, final_state = _states_associative(
            u_tilde, w, x, gcum, initial_state, seg, seg_prev, rows=rows, state_dtype=state_dtype
        )
        return scores, w, u, states, final_state, t
    state_block_v = min(config.state_block_v, value)
    u, states, final_state = triton_call(
        functools.partial(
            _state_kernel,
            rows=rows,
            n_chunks=n_chunks,
            has_erase=w is not None,
            has_segments=has_segments,
            operands=operands,
        ),
        config.state_warps,
        interpret,
        grid=(batch, heads, value // state_block_v),
        out_shape=[
            jax.ShapeDtypeStruct(z.shape, state_dtype),
            jax.ShapeDtypeStruct((batch, heads, n_chunks, key, value), state_dtype),
            jax.ShapeDtypeStruct((batch, heads, key, value), f32),
        ],
    )(*(t for t in (u_tilde, w, x, gcum, initial_state) if t is not None), *((seg, seg_prev) if has_segments else ()))
    return scores, w, u, states, final_state, t


def to_chunk_major(t, rows):
    """[B, N R, H, D] -> [N, B, H, R, D] (R rows per chunk); running segment numbers [B, N R] -> [N, B, 1, R, 1]."""
    t = t.reshape(t.shape[0], t.shape[1] // rows, rows, *t.shape[2:])
    return jnp.moveaxis(t, (1, 3), (0, 2)) if t.ndim == 5 else jnp.moveaxis(t, 1, 0)[:, :, None, :, None]


def from_chunk_major(t):
    """[N, B, H, R, D] -> [B, N R, H, D]."""
    chunks, batch, heads, rows, width = t.shape
    return jnp.moveaxis(t, (0, 2), (1, 3)).reshape(batch, chunks * rows, heads, width)


def chunk_end_decays(gcum, seg, seg_prev, rows):
    """`edarnn.core.chunk_end_decays` on the kernels' layout: gcum [B, N R, H, D], seg [B, N R] and seg_prev
    [B, N] running segment numbers (or None) -> (decay_to_end [N, B, H, R, D], state_decay [N, B, H, 1, D]), the
    state kernels' masks (tiles.end_decays)."""
    segs = () if seg is None else (to_chunk_major(seg, rows), to_chunk_major(seg_prev, 1))
    return core.chunk_end_decays(to_chunk_major(gcum, rows), *segs)


def _states_associative(u_tilde, w, x, gcum, initial_state, seg, seg_prev, *, rows, state_dtype):
    """The state kernel's results by `edarnn.core.chunk_states_associative` on the kernels' layout
    (Config.state_pass "associative"), float32 throughout.

    u_tilde [B, T P, H, V], w (None without an erase address) and x [B, T P, H, K], gcum [B, T P, H, D],
    initial_state [B, H, K, V]; seg [B, T P] and seg_prev [B, N] running segment numbers, or None; rows = C P.
    Returns (u [B, T P, H, V] and states [B, H, N, K, V] in state_dtype, final_state [B, H, K, V] float32)."""
    f32 = jnp.float32
    decay_to_end, state_decay = chunk_end_decays(gcum, seg, seg_prev, rows)
    u, start, final_state = core.chunk_states_associative(
        initial_state.astype(f32),
        to_chunk_major(u_tilde, rows).astype(f32),
        None if w is None else to_chunk_major(w, rows).astype(f32),
        to_chunk_major(x, rows).astype(f32) * decay_to_end,
        state_decay,
    )
    return from_chunk_major(u).astype(state_dtype), jnp.moveaxis(start, 0, 2).astype(state_dtype), final_state


def chunk_forward(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, *, chunk_size, interpret, config=None, storage=None
):
    """Chunkwise forward on prepared, padded inputs (see pallas_kernels.forms.prepare).

    q [B, T, H, K] (scaled), gq [B, T, H, D] (the chunk-local cumulative log-decay each query sees), x, y
    [B, T P, H, K] (y may be None), z [B, T P, H, V], gcum [B, T P, H, D] (chunk-local cumulative log-decay),
    initial_state [B, H, K, V] f32; seg [B, T P] int32 running segment numbers of the sub-steps, seg_q [B, T]
    those of the tokens and seg_prev [B, N] the number before each chunk, or all three None. T is a multiple
    of chunk_size. storage: the dtype q, x, y, z are read in (config.low_inputs) and the intermediates are stored
    in (config.low_intermediates, low_states), e.g. bfloat16 for bf16 inputs; None: float32.
    Returns (o [B, T, H, V] f32, final_state [B, H, K, V] f32).
    """
    config = config or default_config()
    if storage is not None and config.low_inputs:
        q, x, y, z = (None if t is None else t.astype(storage) for t in (q, x, y, z))
    batch, length, heads, key = q.shape
    rows, value, dim = x.shape[1] // length * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    has_segments = seg is not None
    scores, _, u, states, final_state, _ = chunk_states(
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
        config=config,
        storage=storage,
    )
    output_block_v = min(config.output_block_v, value)
    o = triton_call(
        functools.partial(output_kernel, has_segments=has_segments, operands=product_operands(config, storage)),
        config.output_warps,
        interpret,
        grid=(batch, heads, n_chunks, value // output_block_v),
        in_specs=[
            tile_spec(chunk_size, key, 4),
            tile_spec(chunk_size, dim, 4),
            tile_spec(chunk_size, rows, 4),
            tile_spec(rows, output_block_v, 4, v_block=True),
            pl.BlockSpec((None, None, None, key, output_block_v), lambda b, h, n, j: (b, h, n, 0, j)),
        ]
        + (segment_specs(4, chunk_size, 1) if has_segments else []),
        out_specs=tile_spec(chunk_size, output_block_v, 4, v_block=True),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, value), jnp.float32),
    )(q, gq, scores, u, states, *((seg_q, seg_prev) if has_segments else ()))
    return o, final_state
