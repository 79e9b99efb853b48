"""The TPU (Mosaic) kernels of impl="pallas", run under the TPU interpreter on the CPU, agree with the recurrent
form, with and without segments; their backward kernels give the chunk form's gradients; every variant, forward
and backward, lowers for TPU without one (Pallas to Mosaic; Mosaic's own compilation needs a TPU); the decoding
kernel updates the donated state in place."""

import jax
import jax.numpy as jnp
import pytest
from conftest import (
    SEGMENTS,
    VARIANTS,
    T,
    assert_close,
    jit,
    kernel_input_specs,
    loss_fn,
    make_inputs,
    make_segment_ids,
    make_state,
    random_cotangents,
    reference,
    rule_of,
)

from edarnn import rules
from pallas_kernels import forms

KERNEL_RTOL = 2e-5  # the kernels compute in float32, the reference in float64


@pytest.fixture
def tpu_kernels(monkeypatch):
    """Route impl="pallas" to the TPU kernels in TPU interpret mode (on this CPU, rules would pick the GPU ones)."""
    chunkwise, recurrent = forms.chunkwise, forms.recurrent
    monkeypatch.setattr(
        forms, "chunkwise", lambda q, sub, s0, seg, size, *_: chunkwise(q, sub, s0, seg, size, True, "tpu")
    )
    monkeypatch.setattr(forms, "recurrent", lambda q, sub, s0, seg, *_: recurrent(q, sub, s0, seg, True, "tpu"))


def pallas(rule, inputs, initial_state, segment_ids=None):
    """A fresh jit (no cache shared with the GPU-kernel tests) of the rule with impl="pallas", chunks of 16."""
    call = lambda x, s, seg: rules.RULES[rule](**x, initial_state=s, segment_ids=seg, impl="pallas", chunk_size=16)  # noqa: E731
    return jax.jit(call)(inputs, initial_state, segment_ids)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tpu_kernels_match_recurrent(variant, rng, tpu_kernels):
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    assert_close(pallas(rule, inputs, state), reference(rule, inputs, state), KERNEL_RTOL, f"{variant} tpu")


# Scalar and channel decay, with and without an erase address, one and two sub-steps per token.
SEGMENT_VARIANTS = ["gated_delta_rule", "gla-channel", "eda-scalar", "eda-bw"]


@pytest.mark.parametrize("variant", SEGMENT_VARIANTS)
def test_tpu_kernels_segments_match_recurrent(variant, rng, tpu_kernels):
    """Packed sequences: odd T, an initial state, segments of one token and segments across chunk boundaries."""
    rule = rule_of(variant)
    inputs, state, segment_ids = make_inputs(variant, rng, T=T), make_state(rng), make_segment_ids(rng, SEGMENTS)
    expected = reference(rule, inputs, state, segment_ids)
    assert_close(pallas(rule, inputs, state, segment_ids), expected, KERNEL_RTOL, f"{variant} tpu segments")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tpu_recurrent_kernel_matches_recurrent(variant, rng, tpu_kernels):
    """T below one chunk: the token-by-token kernel (decoding, short prefills)."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=5), make_state(rng)
    assert_close(pallas(rule, inputs, state), reference(rule, inputs, state), KERNEL_RTOL, f"{variant} tpu short")


@pytest.mark.parametrize("variant", SEGMENT_VARIANTS)
def test_tpu_recurrent_kernel_segments_match_recurrent(variant, rng, tpu_kernels):
    """The token-by-token kernel resets the state where the segment id changes (at the second token too)."""
    rule = rule_of(variant)
    inputs, state, segment_ids = (
        make_inputs(variant, rng, T=7),
        make_state(rng),
        make_segment_ids(rng, [[3, 4], [1, 6]]),
    )
    expected = reference(rule, inputs, state, segment_ids)
    assert_close(pallas(rule, inputs, state, segment_ids), expected, KERNEL_RTOL, f"{variant} tpu short segments")


@pytest.mark.parametrize("per_token,decay,segments", [(1, "1", False), (1, "K", True), (2, "K", True)])
def test_tpu_recurrent_kernel_lowers_for_tpu_in_place(per_token, decay, segments):
    """A decoding step (three tokens: a short prefill, with resets) lowers for TPU; the kernel's state operand is
    the donated state argument itself and aliases its new state, which the step returns in the same buffer."""
    q, sub, state, seg = kernel_input_specs(
        t=3, per_token=per_token, decay=decay, erase=True, segments=segments, b=2, h=4, k=128, v=128
    )
    step = jax.jit(lambda q, sub, s0, seg: forms.recurrent(q, sub, s0, seg, False, "tpu"), donate_argnums=2)
    text = step.trace(q, sub, state, seg).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1
    state_arg = 5  # q, g, x, y, z, then the state
    assert f"%arg{state_arg}: tensor<2x4x128x128xf32> {{tf.aliasing_output = 1 : i32}}" in text
    call = next(line for line in text.splitlines() if "stablehlo.custom_call @tpu_custom_call" in line)
    operands = call.split("@tpu_custom_call(")[1].split(")")[0].split(", ")
    assert operands[state_arg] == f"%arg{state_arg}"
    assert f"output_tuple_indices = [1], operand_index = {state_arg}," in call


SLOW_EDA = ("eda-scalar", "eda-channel")
GRAD_CASES = [(v, False) for v in ["gla-channel", "gated_delta_rule", "kda", "eda-scalar", "eda-channel"]] + [
    (v, True) for v in SEGMENT_VARIANTS
]


@pytest.mark.parametrize(
    "variant,with_segments",
    [  # a variant with a segments case runs without segments in the slow suite only (10-15 s a case), and eda (20 s
        # a case) once by default, with channel gates and segments
        pytest.param(v, s, marks=[pytest.mark.slow] if (not s and v in SEGMENT_VARIANTS) or v in SLOW_EDA else [])
        for v, s in GRAD_CASES
    ],
    ids=[f"{v}{'-segments' if s else ''}" for v, s in GRAD_CASES],
)
def test_tpu_kernel_grads_match_chunk(variant, with_segments, rng, tpu_kernels):
    """The TPU backward kernels (tpu/chunk_bwd.py) give the chunk form's gradients of every input and the initial
    state: scalar and channel decay, with and without an erase address, one and two sub-steps per token, odd T,
    segments across chunk boundaries."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS) if with_segments else None
    cotangents = random_cotangents(rng, inputs)

    def grads(impl):  # a fresh jit: no cache shared with the GPU-kernel tests
        loss = loss_fn(rule, cotangents, impl=impl, chunk_size=16)
        return jit(jax.grad(loss, argnums=(0, 1)))(inputs, state, segment_ids)

    assert_close(grads("pallas"), grads("chunk"), KERNEL_RTOL, f"{variant} tpu grad")


# (sub-steps per token, decay width, erase address y, segments)
LOWERING_CASES = [(1, "1", True, False), (1, "K", True, False), (1, "K", False, False), (2, "K", True, False)]
LOWERING_CASES += [(1, "1", True, True), (1, "K", False, True), (2, "K", True, True)]


@pytest.mark.parametrize("per_token,decay,erase,segments", LOWERING_CASES)
def test_tpu_kernels_lower_for_tpu(per_token, decay, erase, segments):
    """At a TPU-sized shape (K = V = 128, chunks of 64): Mosaic's lowering accepts the blocks and the bodies."""
    specs = kernel_input_specs(t=128, per_token=per_token, decay=decay, erase=erase, segments=segments, k=128, v=128)
    forward = jax.jit(lambda q, sub, s0, seg: forms.chunkwise(q, sub, s0, seg, 64, False, "tpu"))
    lowered = forward.trace(*specs).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3  # intra, state, output


@pytest.mark.parametrize(
    "per_token,decay,erase,segments", [case for case in LOWERING_CASES if case != (1, "K", True, False)]
)
def test_tpu_backward_kernels_lower_for_tpu(per_token, decay, erase, segments):
    """A training step at a TPU-sized shape: the forward kernels, the intra and state kernels again (recomputed)
    and the three backward kernels lower through Mosaic."""
    specs = kernel_input_specs(t=128, per_token=per_token, decay=decay, erase=erase, segments=segments, k=128, v=128)

    def loss(q, sub, s0, seg):
        o, final_state = forms.chunkwise(q, sub, s0, seg, 64, False, "tpu")
        return jnp.sum(o * o) + jnp.sum(final_state)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    lowered = step.trace(*specs).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 8  # forward 3, recompute 2, backward 3
