"""Gradients: the chunk and scan forms differentiate like the recurrent definition, w.r.t. every input; the
chunk form's gradients match finite differences."""

import jax
import numpy as np
import pytest
from conftest import (
    SEGMENTS,
    VARIANTS,
    T,
    assert_close,
    grad_runner,
    make_inputs,
    make_segment_ids,
    make_state,
    random_cotangents,
    rule_of,
)
from jax.test_util import check_grads

from edarnn import rules

SEGMENT_VARIANTS = ["gla-channel", "gated_delta_rule", "gdn2-channel", "eda-bw"]
CASES = [(variant, False) for variant in VARIANTS] + [(variant, True) for variant in SEGMENT_VARIANTS]


@pytest.mark.parametrize("impl", ["chunk", "scan"])
@pytest.mark.parametrize("variant,with_segments", CASES, ids=[f"{v}{'-segments' if s else ''}" for v, s in CASES])
def test_grads_match_recurrent(variant, with_segments, impl, rng):
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T)
    state = make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS) if with_segments else None
    cotangents = random_cotangents(rng, inputs)
    actual = grad_runner(rule, impl, 16)(cotangents, inputs, state, segment_ids)
    expected = grad_runner(rule, "recurrent")(cotangents, inputs, state, segment_ids)
    # one non-zero gradient for every input and the initial state (None inputs, eda-bw's beta, have none)
    assert len(jax.tree.leaves(expected)) == len(jax.tree.leaves(inputs)) + 1
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(expected))
    assert_close(actual, expected, rtol=1e-9, what=f"{variant} {impl} grad")


@pytest.mark.parametrize("variant", ["kda", "gdn2-channel", "eda-channel", "eda-bw"])
def test_chunk_grads_match_finite_differences(variant, rng):
    """check_grads on tiny shapes: 6 tokens in chunks of 4 (a padded tail), with an initial state."""
    rule = rule_of(variant)
    dims = dict(B=1, H=1, K=4, V=3)
    inputs = make_inputs(variant, rng, T=6, **dims)
    names = [name for name, x in inputs.items() if x is not None]
    none_names = [name for name, x in inputs.items() if x is None]

    @jax.jit  # plain jax.jit: check_grads differentiates through it (conftest.jit is top-level only)
    def fn(*arrays):
        *values, initial_state = arrays
        x = {**dict(zip(names, values, strict=True)), **dict.fromkeys(none_names)}
        return rules.RULES[rule](**x, initial_state=initial_state, impl="chunk", chunk_size=4)

    check_grads(fn, (*(inputs[name] for name in names), make_state(rng, **dims)), order=1, modes=["rev"])
