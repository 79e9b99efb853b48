"""Chunkwise kernels on Pallas' Mosaic GPU backend (Hopper and newer: TMA copies into swizzled shared memory,
wgmma), beside the Triton lowering's, for the choice of backend (issue 3, item 4; docs/performance.md).

The first is the forward's output kernel (chunk_fwd's kernel 4), chosen by chunk_fwd.Config.output_backend =
"mosaic": one program per chunk, head and V block; its five tiles come in by TMA on one barrier, the decayed
queries Q exp Gq are formed in registers and stored to shared memory, and two wgmma calls accumulate
(Q exp Gq) S + Aqk U in float32 registers; the tile goes out by TMA. Interpret mode (`interpret=True`) is Mosaic
GPU's own interpreter (it simulates shared memory, barriers and wgmma on the CPU), so CI checks the values;
lowering for CUDA on the CPU checks the layouts.

Why a second backend: jax 0.11 deprecates the Triton backend ("will be removed in a future JAX version"; Pallas'
docs recommend Mosaic GPU), and the Triton lowering reaches neither TMA nor wgmma directly. Limits of this
kernel: chunks of a multiple of 64 tokens (wgmma's M); K, L and the V block multiples of 64 (the 128-byte swizzle
of 16-bit rows; 32 and 16 narrower swizzles); the four product operands in one 16-bit dtype (TF32 wgmma takes its
right operand K-major only).
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def mma_transforms(width, dtype):
    """The shared-memory transforms a wgmma operand with rows of `width` elements needs: tiles of 8 rows by the
    widest swizzle (128, 64 or 32 bytes) that divides a row."""
    for swizzle in (128, 64, 32):
        elements = swizzle // jnp.dtype(dtype).itemsize
        if width % elements == 0:
            return plgpu.TilingTransform((8, elements)), plgpu.SwizzleTransform(swizzle)
    raise ValueError(f"a wgmma operand's rows must be a multiple of 16 bytes' elements; got {width} x {dtype}")


def _interpret_params(interpret):
    """Mosaic GPU's interpreter for interpret=True (a private module in jax 0.10.2: no public name for it there)."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415

    return InterpretGPUParams()


def on_hopper() -> bool:
    """Whether JAX's first GPU is a Hopper (compute capability 9.x), whose wgmma this kernel issues (Blackwell's
    matrix instructions are others); False without a GPU (e.g. lowering for CUDA on a CPU)."""
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return False
    return str(getattr(device, "compute_capability", "")).startswith("9.")


def refusal(chunk_size: int, dtypes) -> str | None:
    """Why `output` cannot take chunks of `chunk_size` tokens with q, scores, u and states in `dtypes`, or None."""
    if chunk_size % 64:
        return f"the Mosaic GPU output kernel takes chunks of a multiple of 64 tokens; got {chunk_size}"
    if {jnp.dtype(d) for d in dtypes} not in ({jnp.dtype(jnp.bfloat16)}, {jnp.dtype(jnp.float16)}):
        return (  # TF32 wgmma takes its right operand K-major only, which TMA cannot transpose to
            "the Mosaic GPU output kernel takes q, scores, u and states in one 16-bit dtype (16-bit inputs with"
            f" chunk_fwd.Config's low_* storage); got {[jnp.dtype(d).name for d in dtypes]}"
        )
    return None


def output(q, gq, scores, u, states, seg_q, seg_prev, *, chunk_size, block_v, out_dtype, interpret=False):
    """O = (Q exp Gq) S + Aqk U per chunk, as chunk_fwd's output kernel.

    q [B, T, H, K] (scaled), gq [B, T, H, D] float32 (D = 1 or K), scores (Aqk) [B, T, H, L], u [B, T P, H, V],
    states [B, H, N, K, V] (each chunk's start state); seg_q [B, T] and seg_prev [B, N] int32 (segment numbers of
    the tokens and before each chunk) or None: tokens of a segment that began inside the chunk do not see its
    start state (their gq is set to -inf here, by XLA). q, scores, u and states share one 16-bit dtype.
    Returns o [B, T, H, V] in out_dtype."""
    batch, length, heads, key = q.shape
    rows, value = u.shape[1] // length * chunk_size, u.shape[-1]
    n_chunks, dtype = length // chunk_size, q.dtype
    reason = refusal(chunk_size, [t.dtype for t in (q, scores, u, states)])
    if reason:
        raise ValueError(reason)
    if seg_q is not None:  # exp(-inf) = 0: those rows take nothing from the start state
        sees_state = seg_q == jnp.repeat(seg_prev, chunk_size, axis=1)
        gq = jnp.where(sees_state[:, :, None, None], gq, -jnp.inf)
    scalar_decay = gq.shape[-1] == 1
    if scalar_decay:  # [B, H, T]: a chunk's log-decays contiguous, as TMA needs (16-byte rows)
        gq = gq[..., 0].transpose(0, 2, 1)

    def body(q_hbm, gq_hbm, scores_hbm, u_hbm, s_hbm, o_hbm, q_tile, g_tile, a_tile, u_tile, s_tile, qd, o_tile, ready):
        b, h, n, j = (jax.lax.axis_index(axis) for axis in "bhnj")
        tokens, steps, values = pl.ds(n * chunk_size, chunk_size), pl.ds(n * rows, rows), pl.ds(j * block_v, block_v)
        plgpu.copy_gmem_to_smem(q_hbm.at[b, tokens, h], q_tile, ready)
        plgpu.copy_gmem_to_smem(gq_hbm.at[b, h, tokens] if scalar_decay else gq_hbm.at[b, tokens, h], g_tile, ready)
        plgpu.copy_gmem_to_smem(scores_hbm.at[b, tokens, h], a_tile, ready)
        plgpu.copy_gmem_to_smem(u_hbm.at[b, steps, h, values], u_tile, ready)
        plgpu.copy_gmem_to_smem(s_hbm.at[b, h, n, :, values], s_tile, ready)
        plgpu.barrier_wait(ready)
        if scalar_decay:  # a column of the accumulator's layout (the interpreter has no layout_cast), along K
            g = g_tile[...] if interpret else plgpu.layout_cast(g_tile[...], plgpu.Layout.WGMMA.reduce(1))
            decay = jax.lax.broadcast_in_dim(jnp.exp(g), (chunk_size, key), (0,))
        else:
            decay = jnp.exp(g_tile[...])
        qd[...] = (q_tile[...].astype(jnp.float32) * decay).astype(dtype)
        plgpu.commit_smem()

        def products(acc):
            plgpu.wgmma(acc, qd, s_tile)
            plgpu.wgmma(acc, a_tile, u_tile)
            return acc[...]

        o_tile[...] = pl.run_scoped(products, plgpu.ACC((chunk_size, block_v), jnp.float32)).astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_tile, o_hbm.at[b, tokens, h, values])
        plgpu.wait_smem_to_gmem(0)

    def tile(shape, tile_dtype=dtype):
        return plgpu.SMEM(shape, tile_dtype, transforms=mma_transforms(shape[-1], tile_dtype))

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((batch, length, heads, value), out_dtype),
        grid=(batch, heads, n_chunks, value // block_v),
        grid_names=tuple("bhnj"),
        scratch_types=[
            tile((chunk_size, key)),
            plgpu.SMEM((chunk_size,), jnp.float32) if scalar_decay else tile((chunk_size, key), jnp.float32),
            tile((chunk_size, rows)),
            tile((rows, block_v)),
            tile((key, block_v)),
            tile((chunk_size, key)),
            tile((chunk_size, block_v), out_dtype),
            plgpu.Barrier(num_arrivals=5),
        ],
        interpret=_interpret_params(interpret),
    )(q, gq, scores, u, states)
