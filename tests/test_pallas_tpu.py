"""The TPU (Mosaic) kernels of impl="pallas", run under the TPU interpreter on the CPU, agree with the recurrent
form; their gradients are the chunk form's; every variant lowers for TPU without one."""

import jax
import jax.numpy as jnp
import pytest
from conftest import (
    VARIANTS,
    T,
    assert_close,
    kernel_input_specs,
    make_inputs,
    make_segment_ids,
    make_state,
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


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tpu_recurrent_kernel_matches_recurrent(variant, rng, tpu_kernels):
    """T below one chunk: the token-by-token kernel (decoding, short prefills)."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=5), make_state(rng)
    assert_close(pallas(rule, inputs, state), reference(rule, inputs, state), KERNEL_RTOL, f"{variant} tpu short")


@pytest.mark.parametrize("per_token,decay", [(1, "1"), (1, "K"), (2, "K")])
def test_tpu_recurrent_kernel_lowers_for_tpu(per_token, decay):
    q, sub, state, _ = kernel_input_specs(t=1, per_token=per_token, decay=decay, erase=True, b=2, h=4, k=128, v=128)
    step = jax.jit(lambda q, sub, s0: forms.recurrent(q, sub, s0, None, False, "tpu"))
    lowered = step.trace(q, sub, state).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 1


def test_tpu_kernel_grads_match_chunk(rng, tpu_kernels):
    inputs, state = make_inputs("eda-channel", rng, T=T), make_state(rng)
    cotangent = jnp.asarray(rng.standard_normal(inputs["v"].shape))

    def loss(impl):  # linear in o: the cotangents do not depend on the forward's rounding
        return lambda x, s: jnp.sum(rules.eda(**x, initial_state=s, impl=impl, chunk_size=16)[0] * cotangent)

    expected = jax.grad(loss("chunk"), argnums=(0, 1))(inputs, state)
    assert_close(jax.jit(jax.grad(loss("pallas"), argnums=(0, 1)))(inputs, state), expected, 1e-9, "tpu grad")


def test_tpu_kernels_refuse_segments(rng, tpu_kernels):
    inputs, state = make_inputs("kda", rng, T=T), make_state(rng)
    with pytest.raises(ValueError, match="does not take segment_ids yet"):
        pallas("kda", inputs, state, make_segment_ids(rng, [[20, 17], [37]]))


@pytest.mark.parametrize("per_token,decay,erase", [(1, "1", True), (1, "K", True), (1, "K", False), (2, "K", True)])
def test_tpu_kernels_lower_for_tpu(per_token, decay, erase):
    """At a TPU-sized shape (K = V = 128, chunks of 64): Mosaic's lowering accepts the blocks and the bodies."""
    q, sub, state, _ = kernel_input_specs(t=128, per_token=per_token, decay=decay, erase=erase, k=128, v=128)
    forward = jax.jit(lambda q, sub, s0: forms.chunkwise(q, sub, s0, None, 64, False, "tpu"))
    lowered = forward.trace(q, sub, state).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3  # intra, state, output
