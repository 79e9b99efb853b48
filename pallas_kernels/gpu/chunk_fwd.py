"""Forward of the chunkwise sub-step form as Pallas GPU kernels (Triton lowering).

Reference: `edarnn.core.chunkwise`; these kernels take the same prepared inputs and must give the same result
to float32 rounding (in float32; 16-bit inputs are read and their intermediates stored in 16 bits, see Config).
Specialised by static flags (scalar or channel-wise decay, with or without an erase address y, with or without
segments; P sub-steps per token):

1. `pair`   (grid n^2 x B x H x N, parallel; body tiles.pair_scores_kernel): one program per block pair (i, j)
   of 16-token blocks: the query scores Aqk_ij and, with an erase address, the pair scores A_ij (zeros for j > i).
   (Session 8, kda's forward: one program per row block i and all its key blocks j <= i, the row side loaded
   once, was 1.9x slower; one per chunk with the key channels in blocks of 32, 1.6x.)
2. `solve`  (grid B x H x N, only with an erase address; body tiles.solve_kernel): T = (I + A)^-1 from A by block
   substitution, W = T (Y exp G) and U~ = T Z.
   (One fused kernel per chunk for 1 and 2, `tiles.intra_kernel`, the TPU's layout, was 1.08x / 1.48x / 2.83x
   slower here for gated_delta_rule / kda / eda at equal float32 storage, one H200 call each; see Config.)
3. `state`  (grid V/BV x B x H, sequential over chunks inside): U = U~ - W S, the chunk's start state S, and
   S <- Diag(exp G_last) S + X~^T U, with S in registers; X~ = X exp(G_last - G) and exp(G_last), masked by
   segments, are prepared by XLA beforehand (`end_decayed_keys`).
4. `output` (grid V/BV x B x H x N, parallel; body in pallas_kernels.tiles): O = (Q exp Gq) S + Aqk U.

Before them, `chunk_cumsum` (grid B x H x N) forms the chunk-local cumulative log-decay that every kernel reads.

`chunk_states` (kernels 1 to 3) is also the backward's recompute (chunk_bwd.py), which has the solve kernel write
T = (I + A)^-1 as well.

Arrays keep the public [B, T, H, D] layout: a chunk of one head is a strided [rows, D] tile.

Grid order: the axes within a chunk or head (block pairs, V or K blocks, row blocks) come first, then B, H, N.
Pallas' Triton lowering folds the leading axes into CUDA's x, the first fastest, and blocks launch in x order, so
the programs that read the same chunk's tiles run side by side and find them in L2. (Chunk-local axes last, the
order before session 12, put those programs B x H x N launches apart: Nsight Compute read twice the pair
kernel's unique bytes from DRAM, at a 33% L2 hit rate; docs/performance.md.)
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from edarnn import core
from pallas_kernels.gpu import mosaic
from pallas_kernels.tiles import (
    BLOCK_TOKENS,
    dot,
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
    eda 8.64; 2: same as 4 for gated_delta_rule; superseded in session 9, below); state kernel blocks of 64
    values (32: gated_delta_rule 2.00 against 1.76). A later call (session 5) gave the default 1.77 / 2.74 / 7.02 ms
    again.
    With bfloat16 storage of everything (low_*), the state kernel's products W S and X~^T U and the output
    kernel's (Q exp Gq) S take their computed operands (the running state, U before it is stored, the decayed
    queries) rounded to bfloat16, as flash-linear-attention's kernels do, for the 16-bit matrix units
    (`product_operands`; session 7: kda's forward 2.74 -> 2.35 ms, fwd+bwd 6.34 -> 6.06 at this shape, 8.44 ->
    5.90 ms forward at B=2, T=32768, H=6); products of two stored tiles are 16-bit in any case (exact).
    Session 7: with X~ and exp(G_last) prepared by XLA (`end_decayed_keys`), the state kernel's loop reads only
    stored tiles and software pipelining pays (state_stages 2, num_stages 1 for the other kernels): kda's forward
    2.32 -> 2.23 ms, gated_delta_rule 1.67 -> 1.58 (it changed nothing while the loop computed its exponentials).
    The associative state pass (XLA's `lax.associative_scan` over the chunks' K x K affine maps, in place of the
    state and state_grad kernels) was measured and deleted: kda 1.67x slower forward at this shape; fwd+bwd
    15.2 ms against 9.8 at B=2, T=32768, H=6.
    Session 8, fewer and larger pair-kernel programs, measured and deleted: one per row block with its key blocks
    in a loop (n programs per chunk instead of n^2, the row side loaded once) took kda's forward from 2.11 to
    3.97 ms (gated_delta_rule 1.56 -> 1.58); one per chunk with the key channels in blocks of 32 (fla's layout)
    from 2.03 to 3.33 ms (2.85 with 2 warps; gated_delta_rule 1.45 -> 2.21, eda 3.89 -> 5.43). Reading the row
    block's log-decays once for both sides (one sub-step per token: gq is gy) left the pair kernel at 559 us
    against 561 (profile): not kept. Session 9, pair kernel on 2 warps (was 4): forward kda 2.02 -> 1.87 ms,
    gated_delta_rule 1.57 -> 1.26, gdn2 2.10 -> 1.95, eda 4.05 -> 3.65 (1 warp: 2.01 / 1.27 / 2.02 / 3.81; the
    pair kernel 555 -> 457 us in kda's profile on 1 warp); solve on 1 warp (kda 2.25 against 2.31, gdn2 2.41
    against 2.08) and the solve's rows read from A's ref (0.99x / 1.04x) not kept."""

    pair_warps: tuple[int, int] = (2, 2)  # pair-scores kernel, by sub-steps per token
    solve_warps: tuple[int, int] = (4, 4)  # solve kernel, by sub-steps per token
    # rows per diagonal block of the solve kernel's substitution, by sub-steps per token (at most a chunk's rows;
    # T is the same matrix either way). eda in blocks of 16 rows (4 chains of 15 steps on [16, 16] tiles per chunk
    # of 64 rows) rather than the pair kernel's 32 (2 chains of 31 on [32, 32]): session 17, H200, B=4 T=4096 H=16
    # K=V=128 bf16, one call: eda's solve 1045 -> 767 us (profile), forward 3.249 -> 2.955 ms, fwd+bwd 7.892 ->
    # 7.439 (variant solve32 is the old default)
    solve_block: tuple[int, int] = (16, 16)
    state_warps: int = 4
    output_warps: int = 4
    state_block_v: int = 64
    output_block_v: int = 64
    low_inputs: bool = True  # q, x, y, z read in the storage dtype (cast where XLA makes them)
    low_intermediates: bool = True  # Aqk, W, U~ in the inputs' storage dtype (bf16 inputs: bf16); A stays f32
    low_states: bool = True  # U and the chunks' start states likewise
    state_stages: int = 2  # Triton num_stages of the state kernel (software pipelining of its loop)
    # the fewest programs the sequential state passes (forward and backward) aim for: their V blocks (state_block_v,
    # chunk_bwd's state_grad_block_v) narrow by halves down to 16 until B x H x V / block reaches it
    # (`sequential_block_v`). Session 11, H200, kda, K = V = 128, one call: at B=2, T=32768, H=6 (24 programs at
    # blocks of 64) blocks of 16 in both passes took the forward from 3.98 to 3.55 ms and forward + backward from
    # 9.79 to 9.03 (32: 3.71 / 9.10; calls differ by about 3%). At B=4, T=4096, H=16 (128 programs at 64) the
    # threshold keeps 64: blocks of 32 were slower there in session 3 (gated_delta_rule 1.76 -> 2.00 ms forward,
    # the state kernel of then). B x H between 24 and 48 (blocks of 32) is not measured.
    state_programs: int = 96
    # the output kernel's backend: "triton" (tiles.output_kernel), "mosaic" (mosaic.output: TMA and wgmma, Hopper;
    # 16-bit storage, chunks of a multiple of 64 tokens) or "auto": mosaic on a Hopper where it takes the inputs,
    # else triton. Session 15, H200, B=4 T=4096 H=16 K=V=128 bf16, one call: the output kernel 173 -> 137 us in
    # kda's profile; forwards kda 1.674 -> 1.634 ms, gdn2 1.736 -> 1.697, gated_delta_rule 1.043 -> 1.021.
    # Session 16, one call: kda 1.500 -> 1.459 ms forward, 4.435 -> 4.392 forward + backward; gdn2 1.562 -> 1.522,
    # 4.616 -> 4.574; the GPU tests pass with "auto" at K = V of 64, 128 and 256, with segments and poisoned outputs
    output_backend: str = "auto"
    # the chunk-local cumulative log-decay (`chunk_cumsum`) and its VJP: True, a Pallas kernel (one program per
    # chunk and head); False, XLA's two-level sum (`edarnn.core.blocked_cumsum`). Session 16, kda's profile: XLA's
    # three fusions 152 us forward (g read three times) and 248 us for the VJP, the kernel 72 and 73 (reading g and
    # writing its sums once is 62 us at 4.3 TB/s); one call, ms: kda 1.472 -> 1.399 forward, 4.448 -> 4.197 fwd+bwd,
    # gdn2 1.534 -> 1.459 / 4.635 -> 4.393, eda 3.249 -> 3.234 / 8.039 -> 7.903, gated_delta_rule unchanged
    cumsum_kernel: bool = True


DEFAULT_CONFIG = Config()


def default_config():
    """DEFAULT_CONFIG, read at call time (benchmarks swap it to compare variants in one process)."""
    return DEFAULT_CONFIG


def product_operands(config, storage):
    """The dtype the state and output kernels round their products' computed operands to: bfloat16 with
    bfloat16 storage and every stored operand of those products in it (low_intermediates, low_states: else the
    products are float32, on X~ stored with the intermediates), else None (float32). float16 storage leaves it
    off: the running state could overflow float16's range."""
    stored_low = config.low_intermediates and config.low_states
    low = storage is not None and jnp.dtype(storage) == jnp.bfloat16 and stored_low
    return jnp.dtype(jnp.bfloat16) if low else None


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------


def _state_kernel(*refs, rows, n_chunks, has_erase, operands):
    """The sequential pass over one head's chunks for one V block (see the module docstring), on the key-side
    operands that XLA prepared (`end_decayed_keys`): no exponentials and no segment masks in the loop. operands:
    the dtype the products' computed operands are rounded to (`product_operands`), None for float32."""
    refs = list(refs)
    u_tilde_ref = refs.pop(0)
    w_ref = refs.pop(0) if has_erase else None
    x_ref, decay_ref, s0_ref, u_ref, states_ref, final_ref = refs
    j, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = u_ref.shape[-1] // pl.num_programs(0)
    vs = pl.ds(j * block_v, block_v)
    cast = (lambda t: t) if operands is None else (lambda t: t.astype(operands))  # noqa: E731

    def chunk(n, state):
        ts = pl.ds(n * rows, rows)
        u = u_tilde_ref[b, ts, h, vs].astype(jnp.float32)
        if has_erase:
            u = u - dot(w_ref[b, ts, h, :], cast(state))
        u_ref[b, ts, h, vs] = u.astype(u_ref.dtype)
        states_ref[b, h, n, :, vs] = state.astype(states_ref.dtype)
        decay = decay_ref[b, n, h, :].reshape(-1, 1)  # [D, 1]
        return decay * state + dot(x_ref[b, ts, h, :], cast(u), trans_a=True)

    final_ref[b, h, :, vs] = jax.lax.fori_loop(0, n_chunks, chunk, s0_ref[b, h, :, vs].astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# the forward on prepared inputs
# ----------------------------------------------------------------------------------------------------------


def tile_spec(rows, width, v_block=False):
    """BlockSpec of one chunk's rows of a [B, T', H, width...] array on a grid (..., B, H, N) (module docstring:
    grid order); v_block: the last axis is cut in blocks of `width`, the grid's first index picks one."""

    def index(*ids):
        assert not v_block or len(ids) > 3, "v_block: the V-block axis comes before (B, H, N)"
        return ids[-3], ids[-1], ids[-2], ids[0] if v_block else 0

    return pl.BlockSpec((None, rows, None, width), index)


def triton_call(kernel, warps, interpret, stages=1, **kwargs):
    """pl.pallas_call with the Triton compiler parameters (by default no software pipelining of loops: see
    Config)."""
    params = plt.CompilerParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kwargs)


def segment_specs(*widths, after=0):
    """BlockSpecs of segment arrays ([B, rows of a chunk] or [B, 1]) on a grid (..., B, H, N) (module docstring:
    grid order), or with `after` more axes after N (key_grad's row blocks)."""
    return [pl.BlockSpec((None, r), lambda *ids: (ids[-3 - after], ids[-1 - after])) for r in widths]


def pair_specs(chunk_size, rows, n_blocks, key, dim, has_erase, has_segments):
    """(in_specs, out_specs) of the pair-scores kernel on the grid (n_blocks^2, B, H, N): program p is row block
    i = p // n_blocks and key block j = p % n_blocks, and writes block (i, j). Inputs q, gq (query block i), x, g
    (key block j), then y, g (row block i), then the segment numbers of block i's tokens and rows and of block j's
    rows; outputs Aqk, then A."""
    block_tokens, block = chunk_size // n_blocks, rows // n_blocks
    row_block = lambda n, p: n * n_blocks + p // n_blocks  # noqa: E731
    key_block = lambda n, p: n * n_blocks + p % n_blocks  # noqa: E731

    def row_side(height, width):
        return pl.BlockSpec((None, height, None, width), lambda p, b, h, n: (b, row_block(n, p), h, 0))

    def key_side(width):
        return pl.BlockSpec((None, block, None, width), lambda p, b, h, n: (b, key_block(n, p), h, 0))

    def segments(height, block_of):
        return pl.BlockSpec((None, height), lambda p, b, h, n: (b, block_of(n, p)))

    ins = [row_side(block_tokens, key), row_side(block_tokens, dim), key_side(key), key_side(dim)]
    ins += [row_side(block, key), row_side(block, dim)] if has_erase else []
    if has_segments:
        ins += [segments(block_tokens, row_block), segments(block, row_block), segments(block, key_block)]
    outs = [
        pl.BlockSpec((None, height, None, block), lambda p, b, h, n: (b, row_block(n, p), h, p % n_blocks))
        for height in ((block_tokens, block) if has_erase else (block_tokens,))
    ]
    return ins, outs


class ChunkStates(NamedTuple):
    """What the pair-scores, solve and state kernels give (`chunk_states`): the forward's intermediates and the
    backward's recompute. P sub-steps per token, R = C P rows per chunk, N chunks."""

    scores: jax.Array  # [B, T, H, C P]: each token's query scores against its chunk's sub-steps (Aqk)
    w: jax.Array | None  # [B, T P, H, K], W = T (Y exp G); None without an erase address
    u: jax.Array  # [B, T P, H, V], U = U~ - W S
    states: jax.Array  # [B, H, N, K, V], each chunk's start state
    final_state: jax.Array  # [B, H, K, V] float32
    t: jax.Array | None  # [B, T P, H, R], each chunk's (I + A)^-1 (zeros above its diagonal blocks), or None
    x_to_end: jax.Array  # [B, T P, H, K], X exp(G_last - G), zero before the chunk's last segment
    state_decay: jax.Array  # [B, N, H, D] float32, exp(G_last), zero where the last segment began in the chunk


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
    """The pair-scores, solve and state kernels on prepared inputs (see chunk_forward) -> ChunkStates. t only
    when `inverse` (the backward's recompute) and there is an erase address. The scores, w, u~, t and x_to_end
    are in `storage` (default float32) when config.low_intermediates, u and the states when config.low_states,
    else float32."""
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
        p = pl.program_id(0)
        pair_scores_kernel(
            *refs, i=p // n_blocks, j=p % n_blocks, per_token=per_token, has_erase=has_erase, has_segments=has_segments
        )

    pair_outs = triton_call(
        pair_kernel,
        config.pair_warps[per_token - 1],
        interpret,
        grid=(n_blocks * n_blocks, batch, heads, n_chunks),
        in_specs=ins,
        out_specs=outs,
        out_shape=[jax.ShapeDtypeStruct((batch, length, heads, rows), low)]
        + ([jax.ShapeDtypeStruct((batch, length * per_token, heads, rows), f32)] if has_erase else []),
    )(
        q,
        gq,
        x,
        gcum,
        *((y, gcum) if has_erase else ()),
        *((seg_q, seg, seg) if has_segments else ()),
    )
    scores, w, u_tilde = pair_outs[0], None, z
    if has_erase:
        w, u_tilde, *t = triton_call(
            functools.partial(
                solve_kernel,
                block=min(config.solve_block[per_token - 1], rows),
                has_segments=has_segments,
                write_inverse=inverse,
            ),
            config.solve_warps[per_token - 1],
            interpret,
            grid=(batch, heads, n_chunks),
            in_specs=[tile_spec(rows, rows), tile_spec(rows, key), tile_spec(rows, value), tile_spec(rows, dim)]
            + (segment_specs(rows, 1) if has_segments else []),
            out_specs=[tile_spec(rows, key), tile_spec(rows, value)] + ([tile_spec(rows, rows)] if inverse else []),
            out_shape=[jax.ShapeDtypeStruct(x.shape, low), jax.ShapeDtypeStruct(z.shape, low)]
            + ([jax.ShapeDtypeStruct((batch, length * per_token, heads, rows), low)] if inverse else []),
        )(pair_outs[1], y, z, gcum, *((seg, seg_prev) if has_segments else ()))
        t = t[0] if inverse else None

    x_to_end, state_decay = end_decayed_keys(x, gcum, seg, seg_prev, rows, low)
    state_block_v = sequential_block_v(config.state_block_v, batch * heads, value, config.state_programs)
    u, states, final_state = triton_call(
        functools.partial(_state_kernel, rows=rows, n_chunks=n_chunks, has_erase=w is not None, operands=operands),
        config.state_warps,
        interpret,
        stages=config.state_stages,
        grid=(value // state_block_v, batch, heads),
        out_shape=[
            jax.ShapeDtypeStruct(z.shape, state_dtype),
            jax.ShapeDtypeStruct((batch, heads, n_chunks, key, value), state_dtype),
            jax.ShapeDtypeStruct((batch, heads, key, value), f32),
        ],
    )(*(t for t in (u_tilde, w, x_to_end, state_decay, initial_state) if t is not None))
    return ChunkStates(scores, w, u, states, final_state, t, x_to_end, state_decay)


def sequential_block_v(limit: int, batch_heads: int, value: int, programs: int) -> int:
    """V block of a sequential state pass (one program per sequence, head and V block): min(limit, value), halved
    while batch_heads x value / block < programs, as long as the half is at least 16 and divides value
    (Config.state_programs)."""
    block = min(limit, value)
    while batch_heads * (value // block) < programs and block // 2 >= 16 and value % (block // 2) == 0:
        block //= 2
    return block


def _cumsum_kernel(g_ref, out_ref, *, reverse):
    g = g_ref[...].astype(jnp.float32)
    sums = jnp.cumsum(g, axis=0)  # Triton's scan has no reverse: the sums from the end are total - sums + g
    out_ref[...] = jnp.sum(g, axis=0, keepdims=True) - sums + g if reverse else sums


def _chunk_sums(g, rows, interpret, reverse):
    """Cumulative sums of g [B, T', H, D] over the rows of each chunk of `rows` (from the end: `reverse`), float32,
    one Triton program per chunk and head."""
    batch, length, heads, dim = g.shape
    return triton_call(
        functools.partial(_cumsum_kernel, reverse=reverse),
        4,
        interpret,
        grid=(batch, heads, length // rows),
        in_specs=[tile_spec(rows, dim)],
        out_specs=tile_spec(rows, dim),
        out_shape=jax.ShapeDtypeStruct(g.shape, jnp.float32),
    )(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def chunk_cumsum(g, rows, interpret):
    """g [B, T', H, D] -> its cumulative sum over the rows of each chunk of `rows` (T' a multiple of it), float32,
    by a Pallas kernel; its VJP, the sum from each row to its chunk's end, by the same kernel."""
    return _chunk_sums(g, rows, interpret, reverse=False)


def _chunk_cumsum_forward(g, rows, interpret):
    return chunk_cumsum(g, rows, interpret), None


def _chunk_cumsum_backward(rows, interpret, _residuals, d_gcum):
    return (_chunk_sums(d_gcum, rows, interpret, reverse=True),)


chunk_cumsum.defvjp(_chunk_cumsum_forward, _chunk_cumsum_backward)


def end_decayed_keys(x, gcum, seg, seg_prev, rows, dtype):
    """The state kernels' key-side operands, by XLA in one element-wise pass (parallel over chunks, so the
    sequential kernels take no exponentials or segment masks): `edarnn.core.chunk_end_decays` on the kernels'
    layout. x [B, T P, H, K], gcum [B, T P, H, D]; seg [B, T P] and seg_prev [B, N] running segment numbers, or
    None; rows = C P. Returns (x_to_end = X exp(G_last - G) [B, T P, H, K] in dtype, state_decay = exp(G_last)
    [B, N, H, D] float32), masked by segments."""
    batch, length, heads, dim = gcum.shape
    by_chunk = lambda t: t.reshape(batch, length // rows, rows, *t.shape[2:])  # noqa: E731
    segs = () if seg is None else (by_chunk(seg)[:, :, :, None, None], seg_prev[:, :, None, None, None])
    decay_to_end, state_decay = core.chunk_end_decays(by_chunk(gcum), *segs, axis=2)  # rows on axis 2, no transposes
    x_to_end = by_chunk(x).astype(jnp.float32) * decay_to_end
    return x_to_end.reshape(x.shape).astype(dtype), state_decay[:, :, 0]


def chunk_forward(
    q, gq, x, y, z, gcum, initial_state, seg, seg_q, seg_prev, *, chunk_size, interpret, config=None, storage=None,
    inverse=False,
):  # fmt: skip
    """Chunkwise forward on prepared, padded inputs (see pallas_kernels.forms.prepare).

    q [B, T, H, K] (scaled), gq [B, T, H, D] (the chunk-local cumulative log-decay each query sees), x, y
    [B, T P, H, K] (y may be None), z [B, T P, H, V], gcum [B, T P, H, D] (chunk-local cumulative log-decay),
    initial_state [B, H, K, V] f32; seg [B, T P] int32 running segment numbers of the sub-steps, seg_q [B, T]
    those of the tokens and seg_prev [B, N] the number before each chunk, or all three None. T is a multiple
    of chunk_size. storage: the dtype q, x, y, z are read in (config.low_inputs) and the intermediates are stored
    in (config.low_intermediates, low_states), e.g. bfloat16 for bf16 inputs; None: float32.
    Returns (o [B, T, H, V] in storage (the caller's output dtype; rounded once, in the kernel), final_state
    [B, H, K, V] f32, the chunk states (`ChunkStates`, with T where `inverse`: what the backward kernels need
    when the forward keeps them, `pallas_kernels.forms.chunkwise`)).
    """
    config = config or default_config()
    if config.output_backend not in ("auto", "triton", "mosaic"):
        raise ValueError(
            f'chunk_fwd.Config.output_backend must be "auto", "triton" or "mosaic"; got {config.output_backend}'
        )
    if storage is not None and config.low_inputs:
        q, x, y, z = (None if t is None else t.astype(storage) for t in (q, x, y, z))
    batch, length, heads, key = q.shape
    rows, value, dim = x.shape[1] // length * chunk_size, z.shape[-1], gcum.shape[-1]
    n_chunks = length // chunk_size
    has_segments = seg is not None
    chunk = chunk_states(
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
        inverse=inverse,
    )
    output_block_v = min(config.output_block_v, value)
    backend = config.output_backend
    if backend == "auto":
        operands = (q.dtype, chunk.scores.dtype, chunk.u.dtype, chunk.states.dtype)
        takes = not interpret and mosaic.on_hopper() and mosaic.refusal(chunk_size, operands) is None
        backend = "mosaic" if takes else "triton"
    if backend == "mosaic":
        o = mosaic.output(
            q,
            gq.astype(jnp.float32),
            chunk.scores,
            chunk.u,
            chunk.states,
            seg_q,
            seg_prev,
            chunk_size=chunk_size,
            block_v=output_block_v,
            out_dtype=jnp.dtype(storage or jnp.float32),
            interpret=interpret,
        )
        return o, chunk.final_state, chunk
    o = triton_call(
        functools.partial(output_kernel, has_segments=has_segments, operands=product_operands(config, storage)),
        config.output_warps,
        interpret,
        grid=(value // output_block_v, batch, heads, n_chunks),
        in_specs=[
            tile_spec(chunk_size, key),
            tile_spec(chunk_size, dim),
            tile_spec(chunk_size, rows),
            tile_spec(rows, output_block_v, v_block=True),
            pl.BlockSpec((None, None, None, key, output_block_v), lambda j, b, h, n: (b, h, n, 0, j)),
        ]
        + (segment_specs(chunk_size, 1) if has_segments else []),
        out_specs=tile_spec(chunk_size, output_block_v, v_block=True),
        out_shape=jax.ShapeDtypeStruct((batch, length, heads, value), jnp.dtype(storage or jnp.float32)),
    )(q, gq, chunk.scores, chunk.u, chunk.states, *((seg_q, seg_prev) if has_segments else ()))
    return o, chunk.final_state, chunk
