"""Properties of the rules: state passing, packed sequences, reductions between rules, the one-token steps,
composition with jit / vmap / grad, and chunk == recurrent over random shapes (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    SEGMENTS,
    VARIANTS,
    T,
    assert_close,
    grad_runner,
    jit,
    loss_fn,
    make_inputs,
    make_segment_ids,
    make_state,
    positional_names,
    random_cotangents,
    reference,
    rule_of,
    run,
    unit,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from edarnn import rules


def split_time(inputs, start, stop):
    return {name: None if x is None else x[:, start:stop] for name, x in inputs.items()}


def select_row(inputs, row):
    return {name: None if x is None else x[row : row + 1] for name, x in inputs.items()}


# ----------------------------------------------------------------------------------------------------------
# state passing and packed sequences
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_equals_whole(variant, rng):
    """Running tokens [0, 20) then [20, 37) from the first piece's final state equals running all 37 tokens
    (the split falls inside a chunk of 16)."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T)
    state = make_state(rng)
    o_whole, s_whole = run(rule, inputs, state, impl="chunk", chunk_size=16)
    o_1, s_1 = run(rule, split_time(inputs, 0, 20), state, impl="chunk", chunk_size=16)
    o_2, s_2 = run(rule, split_time(inputs, 20, T), s_1, impl="chunk", chunk_size=16)
    assert_close((jnp.concatenate([o_1, o_2], axis=1), s_2), (o_whole, s_whole), rtol=1e-9, what=variant)


@pytest.mark.parametrize("impl", ["recurrent", "scan", "chunk"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_segment_ids_equal_separate_runs(variant, impl, rng):
    """Packed sequences equal each sequence run on its own; the initial state is the first segment's only."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T)
    state = make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    o, final_state = run(rule, inputs, state, segment_ids, impl=impl, chunk_size=16)
    for row, lengths in enumerate(SEGMENTS):
        start, row_state = 0, state[row : row + 1]
        for length in lengths:
            piece = split_time(select_row(inputs, row), start, start + length)
            o_piece, s_piece = run(rule, piece, row_state, impl="recurrent")
            what = f"{variant} {impl} row {row} tokens [{start}, {start + length})"
            assert_close(o[row : row + 1, start : start + length], o_piece, rtol=1e-9, what=what)
            start, row_state = start + length, None
        assert_close(final_state[row : row + 1], s_piece, rtol=1e-9, what=f"{variant} {impl} final state")


@pytest.mark.parametrize("impl", ["recurrent", "scan", "chunk"])
@pytest.mark.parametrize("variant", ["linear_attention", "kda"])
def test_segment_ids_reset_at_every_change(variant, impl, rng):
    """The state restarts wherever the id changes, also where an id recurs later in the sequence: with ids
    1 1 2 2 1 1 the second run of 1s is a new segment (the documented "restarts where the id changes")."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=6, B=1)
    segment_ids = jnp.asarray([[1, 1, 2, 2, 1, 1]], jnp.int32)
    o, final_state = run(rule, inputs, None, segment_ids, impl=impl, chunk_size=16)
    for start in (0, 2, 4):
        o_piece, s_piece = run(rule, split_time(inputs, start, start + 2), impl="recurrent")
        assert_close(o[:, start : start + 2], o_piece, rtol=1e-9, what=f"{variant} {impl} tokens {start}+")
    assert_close(final_state, s_piece, rtol=1e-9, what=f"{variant} {impl} final state")


# ----------------------------------------------------------------------------------------------------------
# reductions: a rule with some inputs fixed is another rule
# ----------------------------------------------------------------------------------------------------------


def channel(gate, D):
    """A scalar gate [B, T, H] broadcast over D channels: [B, T, H, D]."""
    return jnp.broadcast_to(gate[..., None], (*gate.shape, D))


def without(inputs, *names):
    return {name: x for name, x in inputs.items() if name not in names}


# name -> (variant of the reference rule, transform(inputs, rng) -> (rule, inputs of that rule))
REDUCTIONS = {
    "gdn2(b=w=beta)==kda": (
        "kda",
        lambda x, rng: (
            "gdn2",
            {
                **without(x, "beta"),
                "b": channel(x["beta"], x["k"].shape[-1]),
                "w": channel(x["beta"], x["v"].shape[-1]),
            },
        ),
    ),
    "kda(broadcast g)==gated_delta_rule": (
        "gated_delta_rule",
        lambda x, rng: ("kda", {**x, "g": channel(x["g"], x["k"].shape[-1])}),
    ),
    "eda(gamma=0)==gated_delta_rule": (
        "gated_delta_rule",
        lambda x, rng: (
            "eda",
            {
                **x,
                "e": jnp.asarray(unit(rng.standard_normal(x["k"].shape))),
                "gamma": jnp.zeros_like(x["beta"]),
            },
        ),
    ),
    "eda(gamma=0)==kda": (
        "kda",
        lambda x, rng: (
            "eda",
            {**x, "e": jnp.asarray(unit(rng.standard_normal(x["k"].shape))), "gamma": jnp.zeros_like(x["g"])},
        ),
    ),
    "gated_delta_rule(g=0)==delta_rule": (
        "delta_rule",
        lambda x, rng: ("gated_delta_rule", {**x, "g": jnp.zeros_like(x["beta"])}),
    ),
    "gla(g=0)==linear_attention": (
        "linear_attention",
        lambda x, rng: ("gla", {**x, "g": jnp.zeros(x["q"].shape[:3])}),
    ),
    "gla(channel g=0)==linear_attention": (
        "linear_attention",
        lambda x, rng: ("gla", {**x, "g": jnp.zeros(x["q"].shape)}),
    ),
    "eda(b=w=beta)==eda(beta)": (
        "eda-channel",
        lambda x, rng: (
            "eda",
            {
                **x,
                "beta": None,
                "b": channel(x["beta"], x["k"].shape[-1]),
                "w": channel(x["beta"], x["v"].shape[-1]),
            },
        ),
    ),
}


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reduction(reduction, impl, rng):
    variant, transform = REDUCTIONS[reduction]
    inputs = make_inputs(variant, rng, T=T)
    state = make_state(rng)
    rule, reduced_inputs = transform(inputs, rng)
    actual = run(rule, reduced_inputs, state, impl=impl, chunk_size=16)
    expected = run(rule_of(variant), inputs, state, impl=impl, chunk_size=16)
    assert_close(actual, expected, rtol=1e-9, what=reduction)


# ----------------------------------------------------------------------------------------------------------
# one-token steps, normalize_qk
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_reproduces_recurrent(variant, rng):
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T)
    state = make_state(rng)
    o_expected, s_expected = run(rule, inputs, state, impl="recurrent")
    step = jit(getattr(rules, f"{rule}_step"))
    names = positional_names(rule)
    at = lambda x, t: None if x is None else x[:, t]  # noqa: E731
    s = state
    for t in range(T):
        keywords = {name: at(x, t) for name, x in inputs.items() if name not in names}
        o_t, s = step(s, *(at(inputs[name], t) for name in names), **keywords)
        assert o_t.shape == o_expected[:, t].shape
        assert_close(o_t, o_expected[:, t], rtol=1e-12, what=f"{variant} token {t}")
    assert_close(s, s_expected, rtol=1e-12, what=f"{variant} final state")


@pytest.mark.parametrize("variant", ["kda", "eda-bw"])
def test_step_accepts_keyword_arguments(variant, rng):
    """The steps take "the same arguments as the rule without the time axis": by keyword as well."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=1)
    state = make_state(rng)
    o_expected, s_expected = run(rule, inputs, state, impl="recurrent")
    token = {name: None if x is None else x[:, 0] for name, x in inputs.items()}
    o, s = jit(getattr(rules, f"{rule}_step"))(state, **token)
    assert_close((o, s), (o_expected[:, 0], s_expected), rtol=1e-12, what=variant)


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
def test_scale(impl, rng):
    """`scale` multiplies q in place of the default K ** -0.5."""
    inputs = make_inputs("eda-channel", rng, T=T)
    scale = float(rng.uniform(0.1, 2.0))
    actual = run("eda", inputs, impl=impl, chunk_size=16, scale=scale)
    rescaled = {**inputs, "q": inputs["q"] * scale * inputs["q"].shape[-1] ** 0.5}
    assert_close(actual, run("eda", rescaled, impl=impl, chunk_size=16), rtol=1e-12)


@pytest.mark.parametrize("variant", ["kda", "eda-channel"])
def test_normalize_qk(variant, rng):
    """normalize_qk=True on unnormalised q, k (and e) equals passing them L2-normalised."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T)
    directions = ("q", "k", "e")
    scaled = {
        n: x * jnp.asarray(rng.uniform(0.5, 3.0, (*x.shape[:-1], 1))) if n in directions else x
        for n, x in inputs.items()
    }
    normalised = {
        n: x / jnp.linalg.norm(x, axis=-1, keepdims=True) if n in directions else x for n, x in inputs.items()
    }
    actual = run(rule, scaled, impl="chunk", chunk_size=16, normalize_qk=True)
    expected = run(rule, normalised, impl="chunk", chunk_size=16)
    assert_close(actual, expected, rtol=1e-5, what=variant)


# ----------------------------------------------------------------------------------------------------------
# composition with jax transformations
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["gla-channel", "kda", "gdn2-channel", "eda-bw"])
def test_jit_of_grad_equals_grad(variant, rng):
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T)
    state = make_state(rng)
    cotangents = random_cotangents(rng, inputs)
    jitted = grad_runner(rule, "chunk", 16)(cotangents, inputs, state, None)
    loss = loss_fn(rule, cotangents, impl="chunk", chunk_size=16)
    # grad of jit, not jit of grad (plain jax.jit: compiler options are for top-level jits only)
    outside = jax.grad(jax.jit(loss), argnums=(0, 1))(inputs, state)
    assert_close(jitted, outside, rtol=1e-12, what=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_vmap_equals_loop(variant, rng):
    """vmap over an extra leading axis of every input equals a Python loop over it."""
    rule = rule_of(variant)
    n = 3
    batch = [make_inputs(variant, rng, T=T) for _ in range(n)]
    states = [make_state(rng) for _ in range(n)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batch)
    vmapped = jit(jax.vmap(lambda x, s: rules.RULES[rule](**x, initial_state=s, impl="chunk", chunk_size=16)))
    o, final_states = vmapped(stacked, jnp.stack(states))
    for i in range(n):
        expected = run(rule, batch[i], states[i], impl="chunk", chunk_size=16)
        assert_close((o[i], final_states[i]), expected, rtol=1e-12, what=f"{variant} [{i}]")


# ----------------------------------------------------------------------------------------------------------
# chunk == recurrent over random shapes
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, database=None)
@given(
    variant=st.sampled_from(sorted(VARIANTS)),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 40), st.integers(1, 2), st.integers(1, 8), st.integers(1, 6)),
    chunk_size=st.sampled_from([4, 8, 16]),
    dtype=st.sampled_from([jnp.float32, jnp.float64]),
    with_state=st.booleans(),
    with_segments=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_chunk_matches_recurrent_random_shapes(variant, shape, chunk_size, dtype, with_state, with_segments, seed):
    B, T, H, K, V = shape
    rng = np.random.default_rng(seed)
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=T, B=B, H=H, K=K, V=V, dtype=dtype)
    state = make_state(rng, B=B, H=H, K=K, V=V, dtype=dtype) if with_state else None
    segment_ids = None
    if with_segments:  # a new segment at each token with probability 1/4
        segment_ids = jnp.asarray(np.cumsum(rng.random((B, T)) < 0.25, axis=1), jnp.int32)
    o, final_state = run(rule, inputs, state, segment_ids, impl="chunk", chunk_size=chunk_size)
    assert o.dtype == dtype and o.shape == (B, T, H, V) and final_state.shape == (B, H, K, V)
    rtol = 1e-9 if dtype == jnp.float64 else 1e-4
    assert_close((o, final_state), reference(rule, inputs, state, segment_ids), rtol=rtol, what=variant)


@pytest.mark.parametrize("impl", ["recurrent", "chunk"])
@pytest.mark.parametrize("variant", ["gla-scalar", "kda", "gdn2-channel", "eda-channel"])
def test_grouped_values_equal_repeated_keys(variant, impl, rng):
    """v (and the gates, and the state) with 3x the heads of q, k and e equals repeating q, k, e per value head."""
    rule = rule_of(variant)
    small = make_inputs(variant, rng, T=T, H=2)
    wide = make_inputs(variant, rng, T=T, H=6)
    grouped = {name: small[name] if name in ("q", "k", "e") else wide[name] for name in wide}
    repeated = {name: x.repeat(3, axis=2) if name in ("q", "k", "e") else x for name, x in grouped.items()}
    state = make_state(rng, H=6)
    assert_close(
        run(rule, grouped, state, impl=impl, chunk_size=16),
        run(rule, repeated, state, impl=impl, chunk_size=16),
        1e-12,
        f"{variant} grouped values",
    )
