"""A peer baseline: the chunked gated delta rule written the way JAX ports of Gated DeltaNet commonly are.

Written by us from the math (DESIGN.md §2) to stand for the usual plain-JAX port (the style of the
Qwen3-Next ports in MaxText / Levanter): everything cast to float32, every contraction at `Precision.HIGHEST`,
chunks of 64, the unit-lower-triangular inverse (I + A)^-1 built row by row in a `fori_loop`, the WY form,
and a `lax.scan` over chunks that carries the [B, H, K, V] state and computes each chunk's output inside the
scan body.

Per chunk, with Γ_t the cumulative decay exp(sum_{s<=t} g_s) inside the chunk and S the incoming state:

    A_ts = β_t k_t·k_s Γ_t/Γ_s  (s < t)      T = (I + A)^-1
    W    = T (β k ⊙ Γ)                       Ũ = T (β v)
    U    = Ũ − W S
    O    = (q ⊙ Γ) S + [(q kᵀ) ⊙ Γ_t/Γ_s ⊙ causal] U
    S'   = Γ_C S + (k ⊙ Γ_C/Γ)ᵀ U
"""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=HIGHEST)


def _unit_lower_inverse_by_rows(a):
    """(I + a)^-1 for strictly lower-triangular a [..., C, C], one row per `fori_loop` iteration.

    With L = -a, T = I + L T, so row i of N = T - I is L_i + sum_{j<i} L_ij N_j: it needs only rows j < i,
    which are final when row i is computed (and L_ij = 0 for j >= i, so summing over all j is safe)."""
    size = a.shape[-1]

    def row(i, n):
        r = n[..., i, :]
        return n.at[..., i, :].set(r + _einsum("...j,...jc->...c", r, n))

    n = jax.lax.fori_loop(1, size, row, -a)
    return n + jnp.eye(size, dtype=a.dtype)


def chunk_gated_delta_rule_common(q, k, v, g, beta, chunk_size=64):
    """Gated DeltaNet, chunkwise. q, k: [B, T, H, K]; v: [B, T, H, V]; g (log-decay), beta: [B, T, H];
    T a multiple of chunk_size; q is scaled by K ** -0.5. Returns (o [B, T, H, V] in q's dtype,
    final_state [B, H, K, V] float32), starting from a zero state."""
    batch, length, heads, key = q.shape
    value = v.shape[-1]
    if length % chunk_size:
        raise ValueError(f"sequence length {length} must be a multiple of chunk_size {chunk_size}")
    n_chunks = length // chunk_size
    out_dtype = q.dtype

    def to_chunks(t):  # [B, T, H, ...] float32 -> [B, H, N, C, ...]
        t = jnp.swapaxes(t.astype(jnp.float32), 1, 2)
        return t.reshape(batch, heads, n_chunks, chunk_size, *t.shape[3:])

    q, k, v, g, beta = map(to_chunks, (q, k, v, g, beta))
    q = q * key**-0.5
    g = jnp.cumsum(g, axis=-1)  # log Γ, [B, H, N, C]
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]

    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    decay = jnp.exp(jnp.where(causal, g[..., :, None] - g[..., None, :], -jnp.inf))  # Γ_t/Γ_s, s <= t
    a = _einsum("bhnik,bhnjk->bhnij", k_beta, k) * jnp.tril(decay, -1)
    t_inv = _unit_lower_inverse_by_rows(a)
    w = _einsum("bhnij,bhnjk->bhnik", t_inv, k_beta * jnp.exp(g)[..., None])
    u_tilde = _einsum("bhnij,bhnjv->bhniv", t_inv, v_beta)

    def chunk(state, inputs):
        q_c, k_c, g_c, decay_c, w_c, u_tilde_c = inputs
        u = u_tilde_c - _einsum("bhck,bhkv->bhcv", w_c, state)
        scores = _einsum("bhik,bhjk->bhij", q_c, k_c) * decay_c
        o = _einsum("bhck,bhkv->bhcv", q_c * jnp.exp(g_c)[..., None], state) + _einsum("bhij,bhjv->bhiv", scores, u)
        g_last = g_c[..., -1:]
        k_to_end = k_c * jnp.exp(g_last - g_c)[..., None]
        state = jnp.exp(g_last)[..., None] * state + _einsum("bhck,bhcv->bhkv", k_to_end, u)
        return state, o

    chunk_major = lambda t: jnp.moveaxis(t, 2, 0)  # noqa: E731
    state0 = jnp.zeros((batch, heads, key, value), jnp.float32)
    final_state, o = jax.lax.scan(chunk, state0, tuple(map(chunk_major, (q, k, g, decay, w, u_tilde))))
    o = jnp.moveaxis(o, 0, 2).reshape(batch, heads, length, value)
    return jnp.swapaxes(o, 1, 2).astype(out_dtype), final_state
