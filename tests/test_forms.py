"""Every form (scan, chunk, auto) computes what the recurrent definition computes, for every rule variant."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    SEGMENTS,
    VARIANTS,
    assert_close,
    make_inputs,
    make_segment_ids,
    make_state,
    numpy_definition,
    reference,
    rule_of,
    run,
    to_float64,
)

from edarnn import core, rules


@pytest.mark.parametrize("variant", VARIANTS)
def test_recurrent_is_the_definition(variant, rng):
    """The oracle itself against DESIGN.md §1 in plain numpy, with an initial state and packed segments."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=37)
    state = make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    expected = numpy_definition(rule, inputs, state, segment_ids)
    assert_close(run(rule, inputs, state, segment_ids, impl="recurrent"), expected, rtol=1e-12, what=variant)


FORMS = [("scan", 64), ("chunk", 16), ("chunk", 64)]
FORM_IDS = ["scan", "chunk16", "chunk64"]


@pytest.mark.parametrize("impl,chunk_size", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("T", [1, 32, 37])  # one token; a multiple of the chunk (16); a prime
@pytest.mark.parametrize("variant", VARIANTS)
def test_form_matches_recurrent_float64(variant, T, with_state, impl, chunk_size, rng):
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T)
    state = make_state(rng) if with_state else None
    actual = run(rule, inputs, state, impl=impl, chunk_size=chunk_size)
    expected = run(rule, inputs, state, impl="recurrent")
    assert actual[0].dtype == actual[1].dtype == jnp.float64
    assert_close(actual, expected, rtol=1e-9, what=f"{variant} {impl}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_matches_recurrent_float64(variant, rng):
    """impl="auto" (on the CPU: the chunk form) at a prime T with an initial state."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=37), make_state(rng)
    actual = run(rule, inputs, state, impl="auto", chunk_size=64)
    assert_close(actual, run(rule, inputs, state, impl="recurrent"), rtol=1e-9, what=f"{variant} auto")


CHANNEL_DECAY = [name for name, (_, gates) in VARIANTS.items() if gates.get("g") == "decay_K"]


@pytest.mark.parametrize("variant", CHANNEL_DECAY)
def test_chunk_float32_strong_channel_decay(variant, rng):
    """Per-token log-decays down to -5 per channel over 130 tokens (3 chunks of 64): the chunk form's decay
    factorisation must neither overflow nor lose precision in float32."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=130, dtype=jnp.float32, max_decay=5.0)
    state = make_state(rng, dtype=jnp.float32)
    o, final_state = run(rule, inputs, state, impl="chunk", chunk_size=64)
    assert o.dtype == final_state.dtype == jnp.float32
    assert_close((o, final_state), reference(rule, inputs, state), rtol=1e-4, what=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("normalize_qk", [False, True], ids=["as_given", "normalized"])
def test_bfloat16_inputs(variant, normalize_qk, rng):
    """bf16 inputs give a bf16 output (also when q and k are normalised inside, in float32) and a float32 state."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=37, dtype=jnp.bfloat16)
    o, final_state = run(rule, inputs, impl="chunk", normalize_qk=normalize_qk)
    assert o.dtype == jnp.bfloat16
    assert final_state.dtype == jnp.float32
    expected = run(rule, to_float64(inputs), impl="recurrent", normalize_qk=normalize_qk)
    assert_close((o, final_state), expected, rtol=2e-2, what=variant)


def test_auto_picks_pallas_only_on_a_gpu_for_shapes_its_kernels_take(monkeypatch):
    """impl="auto" is "chunk" on this CPU; on a GPU "pallas" for heads of 16 to 128 (powers of two), chunks of 16 to
    64, float32 compute and at least one chunk of tokens, else "chunk"."""
    assert rules.resolve_impl("auto", 128, 128, 64, jnp.float32, 4096) == "chunk"
    assert rules.resolve_impl("pallas", 128, 128, 64, jnp.float32, 4096) == "pallas"
    monkeypatch.setattr(rules.jax, "default_backend", lambda: "gpu")
    assert rules.resolve_impl("auto", 128, 128, 64, jnp.float32, 4096) == "pallas"
    assert rules.resolve_impl("auto", 16, 64, 16, jnp.float32, 16) == "pallas"
    for key, value, chunk, dtype, length in [
        (96, 128, 64, jnp.float32, 4096),  # not a power of two
        (256, 128, 64, jnp.float32, 4096),  # wider than tested
        (128, 8, 64, jnp.float32, 4096),
        (128, 128, 128, jnp.float32, 4096),
        (128, 128, 64, jnp.float64, 4096),
        (128, 128, 64, jnp.float32, 63),  # shorter than a chunk
    ]:
        assert rules.resolve_impl("auto", key, value, chunk, dtype, length) == "chunk"
    assert rules.resolve_impl("recurrent", 96, 128, 64) == "recurrent"


@pytest.mark.parametrize(
    "key,value,length,grouped,expected",
    [
        (32, 32, 64, False, "pallas"),
        (32, 64, 64, True, "pallas"),
        (32, 256, 64, False, "chunk"),
        (32, 32, 40, False, "chunk"),
    ],
)
def test_auto_reads_the_sizes_from_the_arguments(key, value, length, grouped, expected, rng, monkeypatch):
    """rules.kda with impl="auto" on a (pretend) GPU: K from q, V from v (grouped values: twice the heads), T from
    the inputs, float32 compute for bf16 inputs; the Pallas path is replaced by a spy that records the call and
    returns zeros of the output's and state's shapes; traced only (the forms' values are other tests' concern)."""
    called = []

    def spy(q, steps, state, segment_ids, chunk_size, storage=None):
        called.append(storage)
        return jnp.zeros((*q.shape[:-1], steps.z.shape[-1]), q.dtype), state

    monkeypatch.setattr(rules.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(rules, "_pallas", spy)
    inputs = make_inputs("kda", rng, T=length, K=key, V=value, H=2)
    if grouped:
        inputs = {**inputs, **{n: jnp.concatenate([inputs[n]] * 2, axis=2) for n in ("v", "g", "beta")}}
    low = {n: x.astype(jnp.bfloat16) if n in "qkv" else x.astype(jnp.float32) for n, x in inputs.items()}

    def trace(inputs, **options):  # the choice is made while tracing: no need to run the chosen form
        return jax.eval_shape(lambda i: rules.kda(**i, impl="auto", chunk_size=64, **options), inputs)

    o, _ = trace(low)
    assert o.dtype == jnp.bfloat16
    assert called == ([jnp.bfloat16] if expected == "pallas" else [])
    if expected == "pallas":  # normalised inside (in float32), still bf16 storage; float32 v: float32 storage
        trace(low, normalize_qk=True)
        trace({**low, "v": low["v"].astype(jnp.float32)})
        assert called[1:] == [jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize(
    ("shape", "axis"), [((3, 64, 2), 1), ((2, 5, 48), -1), ((4, 6), 1), ((3, 5), 1), ((2, 1, 3), 1)]
)
def test_blocked_cumsum_is_the_cumulative_sum(shape, axis, rng):
    """Two-level sums (blocks of 8, of gcd(length, 8) for other lengths) against numpy's running sum, and its
    gradient against jnp.cumsum's."""
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(core.blocked_cumsum(jnp.asarray(x), axis), np.cumsum(x, axis), rtol=1e-12, atol=1e-12)
    weights = jnp.asarray(rng.standard_normal(shape))
    grad = lambda f: jax.grad(lambda t: jnp.sum(weights * f(t, axis)))(jnp.asarray(x))  # noqa: E731
    np.testing.assert_allclose(grad(core.blocked_cumsum), grad(jnp.cumsum), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("variant", "chunk_size", "expected"), [("kda", None, 64), ("eda", None, 32), ("eda", 16, 16)])
def test_default_chunk_is_64_sub_steps(variant, chunk_size, expected, rng, monkeypatch):
    """chunk_size=None: 64 sub-steps per chunk, so 64 tokens for kda and 32 for eda (two sub-steps per token); a
    given chunk_size is taken as it is. The chunk form is replaced by a spy that records its chunk size."""
    sizes = []

    def spy(q, sub, initial_state, segment_ids, chunk_size):
        sizes.append(chunk_size)
        return core.recurrent(q, sub, initial_state, segment_ids)

    monkeypatch.setattr(core, "chunkwise", spy)
    rules.RULES[rule_of(variant)](**make_inputs(variant, rng, T=8), impl="chunk", chunk_size=chunk_size)
    assert sizes == [expected]


@pytest.mark.parametrize(  # the scan form's case is slow (12 s): rules.eda's scan tests run its per-token path too
    "form", ["recurrent", pytest.param("scan", marks=pytest.mark.slow), "chunk", "pallas", "pallas_recurrent"]
)
def test_a_per_token_decay_is_the_first_sub_steps(form, rng):
    """`core`'s two layouts of g with two sub-steps per token (EDA's): g [B, T, H, K] per token gives what the
    per-sub-step layout [B, 2 T, H, K] gives with each token's decay at its first sub-step and 0 at its second, in
    every form (pallas: the GPU chunk kernels in interpret mode, with the cumulative sums over tokens, and the
    token-by-token kernel), with segments and an initial state: the output, the final state and the gradients of
    q, x, y, z and g. T = 37 with chunks of 16 tokens: a padded last chunk."""
    from pallas_kernels import forms  # noqa: PLC0415

    batch, length, heads, key, value = 2, 37, 2, 16, 16
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q = normal(batch, length, heads, key)
    x, y = normal(batch, 2 * length, heads, key) / 4, normal(batch, 2 * length, heads, key) / 4
    z = normal(batch, 2 * length, heads, value)
    g = jnp.asarray(-rng.uniform(0.0, 1.0, (batch, length, heads, key)), jnp.float32)
    state = make_state(rng, B=batch, H=heads, K=key, V=value, dtype=jnp.float32)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    d_o, d_state = normal(batch, length, heads, value), normal(batch, heads, key, value)
    run_form = {
        "recurrent": core.recurrent,
        "scan": core.associative_scan,
        "chunk": lambda *a: core.chunkwise(*a, 16),
        "pallas": lambda *a: forms.chunkwise(*a, 16, True),
        "pallas_recurrent": lambda *a: forms.recurrent(*a, True),
    }[form]

    def loss(per_token, q, x, y, z, g):
        if not per_token:  # each token's decay at its first sub-step, 0 at its second
            g = jnp.stack([g, jnp.zeros_like(g)], axis=2).reshape(x.shape)
        o, final_state = run_form(q, core.Substeps(g, x, y, z), state, segment_ids)
        return jnp.sum(o * d_o) + jnp.sum(final_state * d_state), (o, final_state)

    def outputs_and_grads(per_token):
        grad = jax.grad(functools.partial(loss, per_token), argnums=(0, 1, 2, 3, 4), has_aux=True)
        grads, outputs = grad(q, x, y, z, g)
        return outputs, grads

    assert_close(outputs_and_grads(True), outputs_and_grads(False), 1e-5, f"{form}: per-token decay")
