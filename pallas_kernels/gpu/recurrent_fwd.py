"""Token-by-token sub-steps as one Pallas GPU kernel (Triton lowering): decoding and short prefills.

Reference: `edarnn.core.recurrent` (same prepared inputs, same result to float32 rounding). Grid B x H x V/BV:
each program keeps its [K, BV] slice of the state in registers, applies every token's P sub-steps in order and
writes the query's read-out after each token; the state is read once and written once, in place (the state
input is aliased to the state output), so a decoding step moves 2 x 4 K V bytes per head and sequence.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def _recurrent_kernel(*refs, length, per_token, has_erase, has_resets):
    refs = list(refs)
    q_ref, g_ref, x_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    y_ref = refs.pop(0) if has_erase else None
    z_ref, state_ref = refs.pop(0), refs.pop(0)
    reset_ref = refs.pop(0) if has_resets else None
    o_ref, new_state_ref = refs
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = new_state_ref.shape[-1] // pl.num_programs(2)
    vs = pl.ds(j * block_v, block_v)

    def token(t, state):
        if has_resets:
            state = jnp.where(reset_ref[b, t] != 0, 0.0, state)
        for p in range(per_token):
            row = t * per_token + p
            state = jnp.exp(g_ref[b, row, h, :].astype(jnp.float32))[:, None] * state
            x = x_ref[b, row, h, :].astype(jnp.float32)[:, None]
            z = z_ref[b, row, h, vs].astype(jnp.float32)[None, :]
            if has_erase:
                y = y_ref[b, row, h, :].astype(jnp.float32)[:, None]
                z = z - jnp.sum(y * state, axis=0, keepdims=True)
            state = state + x * z
        q = q_ref[b, t, h, :].astype(jnp.float32)[:, None]
        o_ref[b, t, h, vs] = jnp.sum(q * state, axis=0).astype(o_ref.dtype)
        return state

    state = state_ref[b, h, :, vs].astype(jnp.float32)
    new_state_ref[b, h, :, vs] = jax.lax.fori_loop(0, length, token, state).astype(new_state_ref.dtype)


def recurrent_forward(q, g, x, y, z, state, resets, *, interpret, block_v=64, warps=8):
    """Sub-steps token by token on prepared inputs: q [B, T, H, K] (scaled), g [B, T P, H, D], x, y [B, T P, H, K]
    (y may be None), z [B, T P, H, V], state [B, H, K, V] float32 (updated in place when donated), resets [B, T]
    int32 (1 where the state restarts) or None. Returns (o [B, T, H, V] in q's dtype, new state). block_v and
    warps by measurement (decode at B=64, H=16, K=V=128 on an H200; docs/performance.md, session 10)."""
    batch, length, heads, _ = q.shape
    value = z.shape[-1]
    block_v = min(block_v, value)
    inputs = [t for t in (q, g, x, y, z, state, resets) if t is not None]
    state_index = 5 if y is not None else 4
    kernel = functools.partial(
        _recurrent_kernel,
        length=length,
        per_token=x.shape[1] // length,
        has_erase=y is not None,
        has_resets=resets is not None,
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, value // block_v),
        out_shape=[
            jax.ShapeDtypeStruct((batch, length, heads, value), q.dtype),
            jax.ShapeDtypeStruct(state.shape, state.dtype),
        ],
        input_output_aliases={state_index: 1},
        interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1),
    )(*inputs)
