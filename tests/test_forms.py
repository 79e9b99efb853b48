"""Every form (scan, chunk, auto) computes what the recurrent definition computes, for every rule variant."""

import jax.numpy as jnp
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
)

from edarnn import rules


@pytest.mark.parametrize("variant", VARIANTS)
def test_recurrent_is_the_definition(variant, rng):
    """The oracle itself against DESIGN.md §1 in plain numpy, with an initial state and packed segments."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=37)
    state = make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    expected = numpy_definition(rule, inputs, state, segment_ids)
    assert_close(run(rule, inputs, state, segment_ids, impl="recurrent"), expected, rtol=1e-12, what=variant)


FORMS = [("scan", 64), ("chunk", 16), ("chunk", 64), ("auto", 64)]
FORM_IDS = ["scan", "chunk16", "chunk64", "auto"]


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
def test_bfloat16_inputs(variant, rng):
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=37, dtype=jnp.bfloat16)
    o, final_state = run(rule, inputs, impl="chunk")
    assert o.dtype == jnp.bfloat16
    assert final_state.dtype == jnp.float32
    expected = reference(rule, inputs)
    assert_close((o, final_state), expected, rtol=2e-2, what=variant)


def test_auto_picks_pallas_only_on_a_gpu_for_shapes_its_kernels_take(monkeypatch):
    """impl="auto" is "chunk" on this CPU; on a GPU "pallas" for power-of-two heads >= 16 in float32, else "chunk"."""
    assert rules.resolve_impl("auto", 128, 128, 64) == "chunk"
    assert rules.resolve_impl("pallas", 128, 128, 64) == "pallas"
    monkeypatch.setattr(rules.jax, "default_backend", lambda: "gpu")
    assert rules.resolve_impl("auto", 128, 128, 64) == "pallas"
    assert rules.resolve_impl("auto", 128, 64, 16, jnp.float32) == "pallas"
    assert rules.resolve_impl("auto", 96, 128, 64) == "chunk"
    assert rules.resolve_impl("auto", 128, 8, 64) == "chunk"
    assert rules.resolve_impl("auto", 128, 128, 8) == "chunk"
    assert rules.resolve_impl("auto", 128, 128, 64, jnp.float64) == "chunk"
    assert rules.resolve_impl("recurrent", 96, 128, 64) == "recurrent"
