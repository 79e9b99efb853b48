"""The one generic core: the decay-then-edit sub-step and its three forms.

Every rule in `edarnn.rules` is a mapping of its inputs onto a sequence of *sub-steps* (DESIGN.md §1). One
sub-step, with log-decay g, edit address x, read/erase address y and value z, does

    S <- Diag(exp(g)) S                    # passive decay; g <= 0, a scalar or one value per key channel
    S <- S + x (z - S^T y)^T               # active edit (y = None: the purely additive S + x z^T)

Each token applies P sub-steps in order (P = 1 for most rules, 2 for EDA's erase-then-write), then the query
reads the state: o = S^T q. Arrays here are already validated, scaled and in the compute dtype.

Shapes (P sub-steps per token, D = K or 1 for a scalar decay; the sub-steps of token t are rows t P ... t P + P - 1
of the sub-step axis, so that a chunk of C tokens is one contiguous tile of C P rows):
    q:  [B, T, H, K]          query, already multiplied by the scale
    g:  [B, T P, H, D]        log-decay of each sub-step, or [B, T, H, D]: of each token's first sub-step (its
                              later sub-steps do not decay; EDA's layout, which spares the forms a P-times
                              larger array of zeros and its sums)
    x, y: [B, T P, H, K]      edit and read/erase addresses (y may be None)
    z:  [B, T P, H, V]        committed values
    initial_state: [B, H, K, V]
    segment_ids: [B, T] int or None; the state restarts from zero where the id changes.

Each form returns (o [B, T, H, V], final_state [B, H, K, V]) in the compute dtype.
"""

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# Sub-chunk width (in sub-steps) of the channel-wise decay factorisation in the chunk form: exponents inside one
# sub-chunk stay within +-(SUBCHUNK / 2) * |g|, finite in float32 for per-token log-decays down to about -10.
SUBCHUNK = 16
# Chunks per iteration of the sequential loop over chunks (lax.scan's unroll). Measured on an H100
# (docs/performance.md): 8 takes 11% off linear attention's forward (2.36 -> 2.11 ms), no change for the delta rules.
CHUNK_SCAN_UNROLL = 8


class Substeps(NamedTuple):
    """P sub-steps per token; see the module docstring for shapes."""

    g: Array
    x: Array
    y: Array | None
    z: Array


def substep_decays(g: Array, length: int, per_token: int) -> Array:
    """g in either layout of the module docstring -> each sub-step's log-decay [B, T, P, H, D] (zeros after each
    token's first sub-step for the per-token layout)."""
    g = g.reshape(g.shape[0], length, -1, *g.shape[2:])
    return jnp.pad(g, ((0, 0), (0, 0), (0, per_token - g.shape[2]), (0, 0), (0, 0)))


def resets(segment_ids: Array | None, length: int) -> Array | None:
    """[B, T] bool: True at a token whose segment id differs from the previous token's (never at t = 0)."""
    if segment_ids is None:
        return None
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.pad(change, ((0, 0), (1, 0)))[:, :length]


def is_power_of_two(n) -> bool:
    """Whether n is an integer (a Python or NumPy one, not a bool) that is a positive power of two."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def blocked_cumsum(x: Array, axis: int, block: int = 8) -> Array:
    """jnp.cumsum(x, axis) in two levels: sums within blocks of `block` elements (or of gcd(length, block)), then
    of the blocks' totals. XLA lowers a cumulative sum to a reduce-window whose work grows with its length (64
    adds per element along chunks of 64: 0.21 ms of kda's Pallas forward at B=4, T=4096, H=16, K=128 on an H200,
    session 8); two short ones take block + length / block."""
    axis = axis % x.ndim
    length = x.shape[axis]
    block = math.gcd(length, block)
    blocks = x.reshape(*x.shape[:axis], length // block, block, *x.shape[axis + 1 :])
    within = jnp.cumsum(blocks, axis=axis + 1)
    totals = jax.lax.slice_in_dim(within, block - 1, block, axis=axis + 1)
    return (within + jnp.cumsum(totals, axis=axis) - totals).reshape(x.shape)


def segment_numbers(segment_ids: Array, length: int) -> Array:
    """[B, T] int32 running segment number (0, 1, 2, ...): a new number wherever the id changes, so that an id
    that comes back later still starts a new segment."""
    return jnp.cumsum(resets(segment_ids, length), axis=1, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# 1. recurrent: the definition
# ----------------------------------------------------------------------------------------------------------


def apply_substep(state: Array, g: Array, x: Array, y: Array | None, z: Array) -> Array:
    """One sub-step. state [B, H, K, V]; g [B, H, D]; x, y [B, H, K]; z [B, H, V]."""
    state = jnp.exp(g)[..., None] * state
    if y is None:
        return state + x[..., :, None] * z[..., None, :]
    read = jnp.einsum("bhk,bhkv->bhv", y, state)
    return state + x[..., :, None] * (z - read)[..., None, :]


def recurrent(q: Array, sub: Substeps, initial_state: Array, segment_ids: Array | None) -> tuple[Array, Array]:
    """Token by token with `lax.scan`: the reference every other form is tested against."""
    batch, length = q.shape[:2]
    reset = resets(segment_ids, length)
    time_major = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)  # noqa: E731
    per_token = lambda a: None if a is None else a.reshape(batch, length, -1, *a.shape[2:])  # noqa: E731
    g = substep_decays(sub.g, length, sub.x.shape[1] // length)
    sub = Substeps(g, *(per_token(t) for t in sub[1:]))  # [B, T, P, H, D]
    xs = (
        time_major(q),
        time_major(sub.g),
        time_major(sub.x),
        time_major(sub.y),
        time_major(sub.z),
        time_major(reset),
    )

    def token(state, inputs):
        q_t, g_t, x_t, y_t, z_t, reset_t = inputs
        if reset_t is not None:
            state = jnp.where(reset_t[:, None, None, None], 0.0, state).astype(state.dtype)
        for p in range(g_t.shape[1]):
            y_p = None if y_t is None else y_t[:, p]
            state = apply_substep(state, g_t[:, p], x_t[:, p], y_p, z_t[:, p])
        return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

    final_state, o = jax.lax.scan(token, initial_state, xs)
    return jnp.moveaxis(o, 0, 1), final_state


# ----------------------------------------------------------------------------------------------------------
# 2. associative scan over per-token affine maps S -> M S + N
# ----------------------------------------------------------------------------------------------------------


def _compose(later: tuple[Array, Array], earlier: tuple[Array, Array]) -> tuple[Array, Array]:
    """(M2, N2) o (M1, N1) = (M2 M1, M2 N1 + N2). M is [..., K] (diagonal) or [..., K, K]; N is [..., K, V]."""
    (m2, n2), (m1, n1) = later, earlier
    if m2.ndim == n2.ndim - 1:  # diagonal transition
        return m2 * m1, m2[..., None] * n1 + n2
    return m2 @ m1, m2 @ n1 + n2


def _apply_map(m: Array, n: Array, state: Array) -> Array:
    """M S + N for the affine map (M, N) of `_compose` (M diagonal [..., K] or [..., K, K]) and S [..., K, V]."""
    return (m[..., None] * state if m.ndim == n.ndim - 1 else m @ state) + n


def _substep_map(g: Array, x: Array, y: Array | None, z: Array) -> tuple[Array, Array]:
    """The affine map of one sub-step: M = (I - x y^T) Diag(exp g) (diagonal when y is None), N = x z^T."""
    alpha = jnp.broadcast_to(jnp.exp(g), x.shape)
    n = x[..., :, None] * z[..., None, :]
    if y is None:
        return alpha, n
    m = jnp.eye(x.shape[-1], dtype=x.dtype) * alpha[..., None, :] - x[..., :, None] * (y * alpha)[..., None, :]
    return m, n


def associative_scan(q: Array, sub: Substeps, initial_state: Array, segment_ids: Array | None):
    """All states at once with `lax.associative_scan` (O(log T) depth). Exact and cheap for additive rules
    (diagonal M); for the delta family it materialises [B, T, H, K, K] and is meant for checking."""
    batch, length = q.shape[:2]
    g = substep_decays(sub.g, length, sub.x.shape[1] // length)
    sub = Substeps(g, *(None if t is None else t.reshape(batch, length, -1, *t.shape[2:]) for t in sub[1:]))
    token_map = None
    for p in range(sub.g.shape[2]):
        y_p = None if sub.y is None else sub.y[:, :, p]
        step_map = _substep_map(sub.g[:, :, p], sub.x[:, :, p], y_p, sub.z[:, :, p])
        token_map = step_map if token_map is None else _compose(step_map, token_map)
    m, n = token_map
    reset = resets(segment_ids, q.shape[1])
    if reset is not None:  # a reset zeroes the incoming state: M -> M 0
        keep = jnp.where(reset, 0.0, 1.0).astype(m.dtype)
        m = m * keep.reshape(keep.shape + (1,) * (m.ndim - 2))
    m, n = jax.lax.associative_scan(lambda a, b: _compose(b, a), (m, n), axis=1)
    states = _apply_map(m, n, initial_state[:, None])
    o = jnp.einsum("bthk,bthkv->bthv", q, states)
    return o, states[:, -1]


# ----------------------------------------------------------------------------------------------------------
# 3. chunkwise (WY / UT form)
# ----------------------------------------------------------------------------------------------------------


def chunk_end_decays(gcum: Array, seg_rows: Array | None = None, seg_prev: Array | None = None, axis: int = -2):
    """(decay_to_end [..., L, D], state_decay [..., 1, D]) of chunks, from their cumulative log-decays gcum
    [..., L, D]: exp(G_last - G) on the rows of each chunk's last segment (0 on rows before it), and exp(G_last)
    where that segment began before the chunk (0 where the state is reset inside it). seg_rows [..., L, 1] and
    seg_prev [..., 1, 1] (the number before the chunk): running segment numbers, or None. axis: where L lies
    (then the shapes above with L, and the 1 of state_decay and seg_prev, on that axis)."""
    length = gcum.shape[axis]
    g_last = jax.lax.slice_in_dim(gcum, length - 1, length, axis=axis)
    decay_to_end, state_decay = jnp.exp(g_last - gcum), jnp.exp(g_last)
    if seg_rows is not None:
        seg_last = jax.lax.slice_in_dim(seg_rows, length - 1, length, axis=axis)
        decay_to_end = jnp.where(seg_rows == seg_last, decay_to_end, 0.0)
        state_decay = jnp.where(seg_last == seg_prev, state_decay, 0.0)
    return decay_to_end, state_decay


def unit_lower_inverse(a: Array) -> Array:
    """(I + a)^-1 for strictly lower-triangular a [..., L, L] (L a power of two), by blocked forward
    substitution: diagonal blocks of size b are merged pairwise, [[T11, 0], [-T22 A21 T11, T22]]."""
    *batch, size, _ = a.shape
    inv = jnp.ones((*batch, size, 1, 1), a.dtype)
    b = 1
    while b < size:
        nb = size // (2 * b)
        blocks = a.reshape(*batch, nb, 2 * b, nb, 2 * b)
        diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., nb, 2b, 2b]
        a21 = diag[..., b:, :b]
        pairs = inv.reshape(*batch, nb, 2, b, b)
        t11, t22 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        t21 = -(t22 @ a21 @ t11)
        top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
        bottom = jnp.concatenate([t21, t22], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        b *= 2
    return inv.reshape(*batch, size, size)


def _block_diagonal(blocks: Array) -> Array:
    """[..., m, r, c] -> [..., m r, m c] with the m blocks on the diagonal and zeros elsewhere."""
    m = blocks.shape[-3]
    on_diagonal = jnp.eye(m, dtype=bool)[:, None, :, None]  # `where`, not a product: blocks may hold inf above
    placed = jnp.where(on_diagonal, blocks[..., :, :, None, :], 0.0)  # their diagonal, masked out later
    return placed.reshape(*blocks.shape[:-3], m * blocks.shape[-2], m * blocks.shape[-1])


def _split(t: Array, blocks: int) -> Array:
    """[..., n, D] -> [..., blocks, n / blocks, D]."""
    return t.reshape(*t.shape[:-2], blocks, t.shape[-2] // blocks, t.shape[-1])


def pair_scores(a: Array, ga: Array, b: Array, gb: Array, mask: Array) -> Array:
    """M[r, s] = sum_k a[r, k] b[s, k] exp(ga[r, k] - gb[s, k]) where mask[r, s], else 0.

    a, ga: [..., R, K], [..., R, D]; b, gb: [..., L, K], [..., L, D]; L = P R (row r sits at a position inside
    columns [P r, P r + P)). The log-decays are cumulative within the chunk and non-increasing, D = 1 for a
    scalar decay (exact: one exponent per pair) or K for a channel-wise decay.
    mask: broadcastable to [..., R, L], lower triangular.

    Channel-wise decays are factorised so that no factor overflows, by halving: the lower-left quadrant of each
    diagonal block (rows after its midpoint, columns before it) is one product referenced to the midpoint, where
    every factor is <= 1; blocks of SUBCHUNK columns are referenced to their middle (|exponent| <= SUBCHUNK / 2
    tokens of decay).
    """
    rows, cols = a.shape[-2], b.shape[-2]
    if gb.shape[-1] == 1:  # scalar decay
        expo = jnp.where(mask, ga[..., :, None, 0] - gb[..., None, :, 0], -jnp.inf)
        return (a @ jnp.swapaxes(b, -1, -2)) * jnp.exp(expo)
    per_row = cols // rows
    full = jnp.zeros((*jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2]), rows, cols), jnp.result_type(a, b))
    size = cols  # columns per diagonal block
    while size > SUBCHUNK:
        half, m = size // 2, cols // size
        a2, ga2 = (_split(t, 2 * m)[..., 1::2, :, :] for t in (a, ga))  # rows after each midpoint
        b2, gb2 = (_split(t, 2 * m)[..., 0::2, :, :] for t in (b, gb))  # columns before it
        ref = gb2[..., -1:, :]  # the midpoint: [..., m, 1, K]
        quadrant = (a2 * jnp.exp(ga2 - ref)) @ jnp.swapaxes(b2 * jnp.exp(ref - gb2), -1, -2)
        quadrant = jnp.pad(quadrant, [(0, 0)] * (quadrant.ndim - 2) + [(half // per_row, 0), (0, half)])
        full = full + _block_diagonal(quadrant)
        size = half
    m = cols // size
    ab, gab = _split(a, m), _split(ga, m)
    bb, gbb = _split(b, m), _split(gb, m)
    ref = gbb[..., size // 2 : size // 2 + 1, :]
    diag = (ab * jnp.exp(gab - ref)) @ jnp.swapaxes(bb * jnp.exp(ref - gbb), -1, -2)
    return jnp.where(mask, full + _block_diagonal(diag), 0.0)


def chunkwise(q: Array, sub: Substeps, initial_state: Array, segment_ids: Array | None, chunk_size: int):
    """Chunks of `chunk_size` tokens: intra-chunk work as matrix products, only the state passes between
    chunks (`lax.scan`). Any T: the tail is padded with identity sub-steps (g = 0, x = 0). Internally
    chunk-major, [N, B, H, rows, D], so the loop over chunks slices its leading axis."""
    batch, length, heads, key = q.shape
    n_sub, value = sub.x.shape[1] // length, sub.z.shape[-1]
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    rows = n_sub * chunk_size  # sub-steps per chunk

    def to_chunks(t):
        """[B, T (P), H, D] -> [N, B, H, C (P), D], zero-padded in time."""
        t = t.reshape(batch, length, -1, heads, t.shape[-1])  # [B, T, 1 or P, H, D]
        t = jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        t = t.reshape(batch, n_chunks, -1, heads, t.shape[-1])
        return jnp.moveaxis(t, (1, 3), (0, 2))  # [N, B, H, C (P), D]

    qc = to_chunks(q)
    g, x, z = to_chunks(sub.g), to_chunks(sub.x), to_chunks(sub.z)
    y = None if sub.y is None else to_chunks(sub.y)
    # [N, B, H, L, D], inclusive, relative to the chunk start; gq: the decay each query sees (after its token's
    # last sub-step)
    if g.shape[-2] == rows:
        gcum = blocked_cumsum(g, axis=-2)
        gq = gcum[..., n_sub - 1 :: n_sub, :]
    else:  # per token: every sub-step of a token sees the decay up to that token
        gq = blocked_cumsum(g, axis=-2)
        gcum = jnp.repeat(gq, n_sub, axis=-2)

    # Masks: causal in sub-step positions, and within one segment.
    pos = jnp.arange(rows)
    qpos = pos[n_sub - 1 :: n_sub]
    mask_a = pos[:, None] > pos[None, :]
    mask_q = qpos[:, None] >= pos[None, :]
    if segment_ids is not None:
        seg = jnp.pad(segment_numbers(segment_ids, length), ((0, 0), (0, pad)), mode="edge")
        seg = seg.reshape(batch, n_chunks, chunk_size)
        seg_prev = jnp.concatenate([seg[:, :1, :1], seg[:, :-1, -1:]], axis=1)  # [B, N, 1]: id before the chunk
        seg, seg_prev = (jnp.moveaxis(t, 1, 0)[:, :, None] for t in (seg, seg_prev))  # [N, B, 1, C or 1]
        seg_sub = jnp.repeat(seg, n_sub, axis=-1)
        mask_a = mask_a & (seg_sub[..., :, None] == seg_sub[..., None, :])
        mask_q = mask_q & (seg[..., :, None] == seg_sub[..., None, :])
        carry_in_sub = (seg_sub == seg_prev)[..., None]  # rows that still see the incoming state
        carry_in_q = (seg == seg_prev)[..., None]

    if y is None:
        u_tilde, w = z, None
    else:
        a = pair_scores(y, gcum, x, gcum, mask_a)
        t_inv = unit_lower_inverse(a)
        u_tilde = t_inv @ z
        w = t_inv @ (y * jnp.exp(gcum))
        if segment_ids is not None:
            w = jnp.where(carry_in_sub, w, 0.0)
    q_decayed = qc * jnp.exp(gq)
    if segment_ids is not None:
        q_decayed = jnp.where(carry_in_q, q_decayed, 0.0)
    segs = (seg_sub[..., None], seg_prev[..., None]) if segment_ids is not None else ()
    decay_to_end, state_decay = chunk_end_decays(gcum, *segs)  # [N, B, H, L, D], [N, B, H, 1, D]
    x_to_end = x * decay_to_end

    state_decay = jnp.swapaxes(state_decay, -1, -2)  # [N, B, H, D, 1]

    # Per chunk, the effective values U = U~ - W S and the next state. Measured on an H100, this reads less than
    # first building each chunk's affine map S -> M S + N (K x K) and looping over those; composing those maps by
    # an associative scan instead (log N depth) was no faster on an H200 (docs/performance.md, session 7).
    def chunk(state, inputs):
        u_tilde_c, w_c, x_to_end_c, decay_c = inputs
        u_c = u_tilde_c if w_c is None else u_tilde_c - w_c @ state
        return decay_c * state + jnp.swapaxes(x_to_end_c, -1, -2) @ u_c, (u_c, state)

    final_state, (u, start_states) = jax.lax.scan(
        chunk, initial_state, (u_tilde, w, x_to_end, state_decay), unroll=min(CHUNK_SCAN_UNROLL, n_chunks)
    )  # u: [N, B, H, L, V]; start_states: [N, B, H, K, V]
    scores = pair_scores(qc, gq, x, gcum, mask_q)  # [N, B, H, C, L]
    o = q_decayed @ start_states + scores @ u  # [N, B, H, C, V]
    o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(batch, n_chunks * chunk_size, heads, value)
    return o[:, :length], final_state
