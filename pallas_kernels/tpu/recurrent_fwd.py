"""Token-by-token sub-steps as one Pallas TPU kernel (Mosaic TPU): decoding and prefills shorter than a chunk.

Reference: `edarnn.core.recurrent`. Grid B x H x V/BV, all parallel: each step holds its [K, BV] state slice in
VMEM, applies the (few, statically unrolled) tokens' sub-steps and writes each query's read-out; the state input
is aliased to the state output (in place when donated). Arrays are head-major, [B, H, T, D]. Every vector is a
[1, D] row: outer products and read-outs are 2-D products, and a channel-wise decay multiplies by Diag(exp g) as
a product too (no transposes of rows into columns). Segment resets come as one row of lanes per sequence,
[B, 1, T] int32 (a block equal to the array's last two dimensions); a reset zeroes the state before the token's
sub-steps (never at the first token, `edarnn.core.resets`, so a one-token decoding step has none to apply).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tiles import dot


def _recurrent_kernel(*refs, length, per_token, has_erase, has_resets):
    refs = list(refs)
    take = lambda present=True: refs.pop(0) if present else None  # noqa: E731
    q_ref, g_ref, x_ref, y_ref, z_ref = take(), take(), take(), take(has_erase), take()
    state_ref, reset_ref = take(), take(has_resets)
    o_ref, new_state_ref = refs
    state = state_ref[...].astype(jnp.float32)
    key = state.shape[0]
    eye = jax.lax.broadcasted_iota(jnp.int32, (key, key), 0) == jax.lax.broadcasted_iota(jnp.int32, (key, key), 1)
    load = lambda ref, r: ref[pl.ds(r, 1), :].astype(jnp.float32)  # noqa: E731  (row r as [1, D])
    for t in range(length):
        if has_resets and t > 0:
            state = jnp.where(jnp.max(reset_ref[:, pl.ds(t, 1)]) != 0, 0.0, state)
        for p in range(per_token):
            r = t * per_token + p
            decay = jnp.exp(load(g_ref, r))
            state = decay * state if decay.shape[1] == 1 else dot(jnp.where(eye, decay, 0.0), state)
            x, z = load(x_ref, r), load(z_ref, r)
            if has_erase:
                z = z - dot(load(y_ref, r), state)
            state = state + dot(x, z, trans_a=True)
        o_ref[pl.ds(t, 1), :] = dot(load(q_ref, t), state).astype(o_ref.dtype)
    new_state_ref[...] = state.astype(new_state_ref.dtype)


def recurrent_forward(q, g, x, y, z, state, resets, *, interpret):
    """Sub-steps token by token on prepared [B, T, H, D] inputs, as `pallas_kernels.gpu.recurrent_fwd`: state
    [B, H, K, V] float32 (updated in place when donated), resets [B, T] int32 (1 where the state restarts) or
    None. Returns (o [B, T, H, V] in q's dtype, new state)."""
    batch, length, heads, key = q.shape
    value = z.shape[-1]
    block_v = 128 if value % 128 == 0 else value
    rows = x.shape[1]
    inputs = [jnp.swapaxes(t, 1, 2) for t in (q, g, x, y, z) if t is not None] + [state]
    state_index = len(inputs) - 1
    inputs += [] if resets is None else [resets.reshape(batch, 1, length)]

    def time_rows(n, width, v_block=False):
        return pl.BlockSpec((None, None, n, width), lambda b, h, j: (b, h, 0, j if v_block else 0))

    state_spec = pl.BlockSpec((None, None, key, block_v), lambda b, h, j: (b, h, 0, j))
    in_specs = [time_rows(length, key), time_rows(rows, g.shape[-1]), time_rows(rows, key)]
    in_specs += [time_rows(rows, key)] if y is not None else []
    in_specs += [time_rows(rows, block_v, True), state_spec]
    in_specs += [] if resets is None else [pl.BlockSpec((None, 1, length), lambda b, h, j: (b, 0, 0))]
    kernel = functools.partial(
        _recurrent_kernel,
        length=length,
        per_token=rows // length,
        has_erase=y is not None,
        has_resets=resets is not None,
    )
    o, new_state = pl.pallas_call(
        kernel,
        grid=(batch, heads, value // block_v),
        in_specs=in_specs,
        out_specs=[time_rows(length, block_v, True), state_spec],
        out_shape=[
            jax.ShapeDtypeStruct((batch, heads, length, value), q.dtype),
            jax.ShapeDtypeStruct(state.shape, state.dtype),
        ],
        input_output_aliases={state_index: 1},
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
    )(*inputs)
    return jnp.swapaxes(o, 1, 2), new_state
