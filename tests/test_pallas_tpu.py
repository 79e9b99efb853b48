"""The TPU (Mosaic) kernels of impl="pallas", run under the TPU interpreter on the CPU, agree with the recurrent
form; their backward kernels give the chunk form's gradients; every variant, forward and backward, lowers for TPU
without one (Pallas to Mosaic; Mosaic's own compilation needs a TPU)."""

import jax
import jax.numpy as jnp
import pytest
from conftest import (
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


@pytest.mark.parametrize("variant", ["gla-channel", "gated_delta_rule", "kda", "eda-scalar", "eda-channel"])
def test_tpu_kernel_grads_match_chunk(variant, rng, tpu_kernels):
    """The TPU backward kernels (tpu/chunk_bwd.py) give the chunk form's gradients of every input and the initial
    state: scalar and channel decay, with and without an erase address, one and two sub-steps per token."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    cotangents = random_cotangents(rng, inputs)

    def grads(impl):  # a fresh jit: no cache shared with the GPU-kernel tests
        return jit(jax.grad(loss_fn(rule, cotangents, impl=impl, chunk_size=16), argnums=(0, 1)))(inputs, state)

    assert_close(grads("pallas"), grads("chunk"), KERNEL_RTOL, f"{variant} tpu grad")


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


@pytest.mark.parametrize("per_token,decay,erase", [(1, "1", True), (1, "K", False), (2, "K", True)])
def test_tpu_backward_kernels_lower_for_tpu(per_token, decay, erase):
    """A training step at a TPU-sized shape: the forward kernels, the intra and state kernels again (recomputed)
    and the three backward kernels lower through Mosaic."""
    q, sub, state, _ = kernel_input_specs(t=128, per_token=per_token, decay=decay, erase=erase, k=128, v=128)

    def loss(q, sub, s0):
        o, final_state = forms.chunkwise(q, sub, s0, None, 64, False, "tpu")
        return jnp.sum(o * o) + jnp.sum(final_state)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    lowered = step.trace(q, sub, state).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 8  # forward 3, recompute 2, backward 3
