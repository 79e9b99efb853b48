"""The language model: shapes, causality and segment isolation for every mixer kind, bf16, remat, parameter
count and FLOPs formula, config errors."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import jit, relative_error
from flax import nnx

from edarnn import model as M
from edarnn import rules
from pallas_kernels.gpu import chunk_fwd

VOCAB = 13


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    config = dict(
        vocab_size=VOCAB,
        d_model=16,
        n_layers=1,
        layers=["eda"],
        n_heads=2,
        head_dim_k=8,
        head_dim_v=6,
        conv_size=3,
        window=4,
        d_ff=24,
        tie_embeddings=False,
        norm_eps=1e-6,
        rule_impl="auto",
        chunk_size=8,
        dtype="float32",
        remat=False,
    )
    config.update(overrides)
    return ml_collections.ConfigDict(config)


def forward(config, tokens, segment_ids):
    """Logits of a freshly initialised model (seed 0), jitted."""
    graphdef, state = nnx.split(M.LM(config, rngs=nnx.Rngs(0)))
    return jit(lambda state, t, s: nnx.merge(graphdef, state)(t, s))(state, tokens, segment_ids)


def loss(graphdef, state, tokens, segment_ids):
    """Mean next-token cross-entropy of the model (graphdef, state) on tokens [B, T]."""
    logits = nnx.merge(graphdef, state)(tokens[:, :-1], segment_ids[:, :-1])
    targets = tokens[:, 1:]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])


@functools.cache
def loss_and_grads(dtype: str, remat: bool):
    """(loss, grads) of a hybrid model on a fixed packed batch, for one compute dtype and remat setting."""
    config = tiny_config(n_layers=3, layers=["eda_channel", "gdn2", "swa"], dtype=dtype, remat=remat)
    graphdef, state = nnx.split(M.LM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (2, 20)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[1] * 8 + [2] * 12], 2, axis=0), jnp.int32)
    value_and_grad = jit(jax.value_and_grad(functools.partial(loss, graphdef)))
    return value_and_grad(state, tokens, segment_ids)


def max_relative_error(actual, expected) -> float:
    return max(jax.tree.leaves(jax.tree.map(relative_error, actual, expected)))


@pytest.mark.parametrize("kind", M.MIXER_KINDS)
def test_mixer_shapes_causality_and_segments(kind):
    """One forward on five rows: (0) a sequence; (1) the same with a later token changed; (2) two packed documents;
    (3) the second document alone (then padding, its own segment); (4) row 2 without segment ids."""
    config = tiny_config(layers=[kind])
    length, changed, first = 21, 13, 9  # T spans three chunks of 8; the second document starts mid-chunk
    rng = np.random.default_rng(0)
    sequence, docs = rng.integers(0, VOCAB, length), rng.integers(0, VOCAB, length)
    altered = sequence.copy()
    altered[changed] = (altered[changed] + 1) % VOCAB
    alone = np.concatenate([docs[first:], rng.integers(0, VOCAB, first)])
    tokens = np.stack([sequence, altered, docs, alone, docs])
    segment_ids = np.zeros_like(tokens)
    segment_ids[2] = np.repeat([3, 4], [first, length - first])
    segment_ids[3] = np.repeat([5, 6], [length - first, first])

    logits = forward(config, jnp.asarray(tokens, jnp.int32), jnp.asarray(segment_ids, jnp.int32))

    assert logits.shape == (5, length, VOCAB) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # causality: the change at `changed` moves its own logits but none before it
    assert relative_error(logits[1, :changed], logits[0, :changed]) <= 1e-6
    assert relative_error(logits[1, changed], logits[0, changed]) > 1e-3
    # segment isolation: the second document's logits as if it ran alone; without segment ids they differ
    second = length - first
    assert relative_error(logits[2, first:], logits[3, :second]) <= 1e-4
    assert relative_error(logits[4, first:], logits[3, :second]) > 1e-3


def test_bfloat16_compute_is_finite_and_close_to_float32():
    loss32, grads32 = loss_and_grads("float32", False)
    loss16, grads16 = loss_and_grads("bfloat16", False)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))  # params stay float32
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads16))
    assert abs(float(loss16) - float(loss32)) <= 2e-2 * abs(float(loss32))
    assert relative_error(grads16["embed"][...], grads32["embed"][...]) <= 0.1


def test_remat_gives_the_same_gradients():
    loss_plain, grads_plain = loss_and_grads("float32", False)
    loss_remat, grads_remat = loss_and_grads("float32", True)
    assert float(loss_remat) == pytest.approx(float(loss_plain), rel=1e-6)
    assert max_relative_error(grads_remat, grads_plain) <= 1e-5


def test_param_count_by_hand():
    config = tiny_config(n_layers=3, layers=["gated_delta_rule", "eda_channel", "swa"])
    d, h, k, v, w, f, r, n = 16, 2, 8, 6, 3, 24, M.GATE_RANK, VOCAB
    conv_proj = lambda width: d * h * width + w * h * width  # noqa: E731  (projection + short conv)
    readout = h * v + d * h * v + h * v * d  # per-head norm, output gate, output projection
    channel_gate = lambda width: d * r + r * h * width  # noqa: E731
    block = 2 * d + 3 * d * f  # two RMSNorms and SwiGLU
    gated_delta_rule = 2 * conv_proj(k) + conv_proj(v) + (d * h + h + h) + d * h + readout  # decay, beta
    eda_channel = 3 * conv_proj(k) + conv_proj(v) + (channel_gate(k) + h + h * k)  # q, k, e, v, decay
    eda_channel += 2 * channel_gate(k) + channel_gate(v) + readout  # gamma, b, w
    swa = 3 * d * h * v + h * v * d
    expected = n * d + 3 * block + gated_delta_rule + eda_channel + swa + d + d * n

    assert M.count_params(M.LM(config, rngs=nnx.Rngs(0))) == expected
    config.tie_embeddings = True
    assert M.count_params(M.LM(config, rngs=nnx.Rngs(0))) == expected - d * n


def test_flops_per_token():
    config = tiny_config(n_layers=2, layers=["attention"])
    params = M.count_params(nnx.eval_shape(lambda: M.LM(config, rngs=nnx.Rngs(0))))
    for length in (1, 64, 1000):
        attention = 3 * 2 * 4 * config.n_heads * config.head_dim_v * (length + 1) / 2
        assert M.flops_per_token(config, length) == pytest.approx(6 * (params - VOCAB * 16) + attention)
    config.tie_embeddings = True
    assert M.flops_per_token(config, 64) == pytest.approx(6 * (params - VOCAB * 16) + 3 * 2 * 4 * 2 * 6 * 65 / 2)

    for kind in ("swa", "eda", "gdn2"):
        config = tiny_config(layers=[kind])
        params = M.count_params(nnx.eval_shape(lambda c=config: M.LM(c, rngs=nnx.Rngs(0))))
        short, long = (M.flops_per_token(config, length) - 6 * (params - VOCAB * 16) for length in (64, 4096))
        assert short > 0
        assert long == pytest.approx(short, rel=0.03)  # independent of T beyond a chunk or window


@pytest.mark.parametrize(
    "override, field",
    [
        ({"layers": ["eda", "mamba"]}, "layers"),
        ({"layers": []}, "layers"),
        ({"d_model": 0}, "d_model"),
        ({"dtype": "float16"}, "dtype"),
        ({"conv_size": -1}, "conv_size"),
        ({"rule_impl": "fast"}, "rule_impl"),
        ({"layers": ["swa"], "window": 0}, "window"),
        ({"layers": ["attention"], "head_dim_v": 5}, "head_dim_v"),
    ],
)
def test_invalid_config_names_the_field(override, field):
    with pytest.raises(ValueError, match=f"config.model.{field}"):
        M.LM(tiny_config(**override), rngs=nnx.Rngs(0))


def test_invalid_tokens():
    model = M.LM(tiny_config(layers=["swa"]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens"):
        model(jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        model(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 4), jnp.int32))


def test_segment_positions_restart_at_every_change_of_id():
    segment_ids = jnp.asarray([[3, 3, 4, 4, 4, 3], [0, 0, 0, 0, 0, 0]], jnp.int32)
    expected = [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    np.testing.assert_array_equal(M.segment_positions(segment_ids, 6), expected)
    np.testing.assert_array_equal(M.segment_positions(None, 3), [[0, 1, 2]])


def test_remat_does_not_run_the_kernels_forward_twice():
    """With remat, the backward pass recomputes a block but not its rule's Pallas kernels (the policy keeps the rule
    output, and the kernels keep only their inputs there: `rules.recompute_chunk_states`): the gradient's program
    calls as many kernels as without remat with the chunk states recomputed (the forward's, the recompute's and the
    backward's), and more without recomputing (the default outside remat keeps them: forward and backward only). A
    policy that keeps nothing would call more (the forward's kernels again), which the test checks so that it can
    fail. The kernels' preparation is recomputed under remat like the rest of the block, so its cumulative sum is
    XLA's here (chunk_fwd.Config.cumsum_kernel off), not a kernel to count."""

    def kernel_calls(remat, policy=M.SAVE_MIXER_OUTPUT):
        config = tiny_config(n_layers=1, layers=["gdn2"], head_dim_k=16, head_dim_v=16, rule_impl="pallas", remat=remat)
        graphdef, state = nnx.split(M.LM(config, rngs=nnx.Rngs(0)))
        tokens = jnp.zeros((1, 17), jnp.int32)
        patch_config = mock.patch.object(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(cumsum_kernel=False))
        with mock.patch.object(M, "SAVE_MIXER_OUTPUT", policy), patch_config:
            grad = jax.make_jaxpr(jax.grad(loss, argnums=1))(graphdef, state, tokens, jnp.ones_like(tokens))
        return str(grad).count("pallas_call")

    kept = kernel_calls(remat=False)
    with rules.recompute_chunk_states():
        recomputed = kernel_calls(remat=False)
    assert 0 < kept < recomputed and kernel_calls(remat=True) == recomputed
    assert kernel_calls(remat=True, policy=None) > recomputed
