"""Bad inputs raise ValueError naming the argument and what was expected."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, make_inputs, make_state, rule_of

from edarnn import rules

B, T, H, K, V = 2, 5, 2, 4, 3
DIMS = dict(B=B, T=T, H=H, h=H, K=K, V=V)  # h: the heads of q and k (H_k), here as many as the value heads


def expected_shape(name: str, *layouts: str) -> str:
    """Regex: the message names `name` and each allowed layout with its sizes, e.g.
    "`g` must have shape [B, T, H] = (2, 5, 2) or [B, T, H, K] = (2, 5, 2, 4)"."""
    names = lambda layout: ", ".join("H_k" if c == "h" else c for c in layout)  # noqa: E731
    wanted = " or ".join(f"[{names(layout)}] = {tuple(DIMS[c] for c in layout)}" for layout in layouts)
    return re.escape(f"`{name}` must have shape {wanted}")


def call(variant, rng, *, replace=None, **options):
    inputs = {**make_inputs(variant, rng, T=T, B=B, H=H, K=K, V=V), **(replace or {})}
    return rules.RULES[rule_of(variant)](**inputs, **options)


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape))


@pytest.mark.parametrize("variant", VARIANTS)
def test_valid_inputs_pass(variant, rng):
    """The baseline the other tests perturb is accepted (so each error below is caused by its one change)."""
    o, state = call(variant, rng, impl="recurrent")
    assert o.shape == (B, T, H, V) and state.shape == (B, H, K, V)


@pytest.mark.parametrize("variant", ["linear_attention", "kda", "eda-bw"])
def test_rank3_q(variant, rng):
    message = f"`q` must have rank 4, [B, T, H, D]; got shape {(B, T, H * K)}"
    with pytest.raises(ValueError, match=re.escape(message)):
        call(variant, rng, replace={"q": normal(rng, B, T, H * K)})


@pytest.mark.parametrize("variant", ["gla-channel", "gated_delta_rule", "eda-scalar"])
def test_v_with_wrong_length(variant, rng):
    got = re.escape(f"; got {(B, T - 1, H, V)}")
    with pytest.raises(ValueError, match=expected_shape("v", "BTHV") + got):
        call(variant, rng, replace={"v": normal(rng, B, T - 1, H, V)})


@pytest.mark.parametrize("variant", ["delta_rule", "gdn2-channel", "eda-channel"])
def test_k_width_differs_from_q(variant, rng):
    with pytest.raises(ValueError, match=expected_shape("k", "BThK")):
        call(variant, rng, replace={"k": normal(rng, B, T, H, K + 1)})


# (variant, argument, wrong shape, expected layouts in the message)
BAD_GATES = [
    ("kda", "g", (B, T, H), ["BTHK"]),
    ("kda", "beta", (B, T, H, K), ["BTH"]),
    ("gla-scalar", "g", (B, T, H, V), ["BTH", "BTHK"]),
    ("gated_delta_rule", "g", (B, T, H, K), ["BTH"]),
    ("gdn2-channel", "w", (B, T, H, K), ["BTH", "BTHV"]),
    ("gdn2-channel", "b", (B, T, H, V), ["BTH", "BTHK"]),
    ("eda-channel", "e", (B, T, H, V), ["BThK"]),
    ("eda-channel", "gamma", (B, T, H, V), ["BTH", "BTHK"]),
    ("eda-bw", "w", (B, T, H, K), ["BTH", "BTHV"]),
]


@pytest.mark.parametrize(
    "variant,name,shape,layouts", BAD_GATES, ids=[f"{variant}-{name}" for variant, name, _, _ in BAD_GATES]
)
def test_gate_with_wrong_shape(variant, name, shape, layouts, rng):
    with pytest.raises(ValueError, match=expected_shape(name, *layouts) + re.escape(f"; got {shape}")):
        call(variant, rng, replace={name: jnp.full(shape, 0.5)})


@pytest.mark.parametrize("variant,name", [("delta_rule", "beta"), ("gla-channel", "g"), ("eda-bw", "w")])
def test_integer_gate(variant, name, rng):
    inputs = make_inputs(variant, rng, T=T, B=B, H=H, K=K, V=V)
    with pytest.raises(ValueError, match=re.escape(f"`{name}` must be a floating-point array")):
        call(variant, rng, replace={name: jnp.zeros(inputs[name].shape, jnp.int32)})


def test_gdn2_same_array_for_b_and_w_is_checked_as_w(rng):
    """gdn2(q, k, v, g, x, x) with x of shape [B, T, H, K], K != V: valid as `b` but not as `w`."""
    x = jnp.full((B, T, H, K), 0.5)
    with pytest.raises(ValueError, match=expected_shape("w", "BTH", "BTHV")):
        call("gdn2-channel", rng, replace={"b": x, "w": x})


@pytest.mark.parametrize("variant", ["gla-scalar", "kda", "eda-channel"])
def test_initial_state_with_wrong_shape(variant, rng):
    state = make_state(rng, B=B, H=H, K=V, V=K)  # K and V swapped
    with pytest.raises(ValueError, match=expected_shape("initial_state", "BHKV")):
        call(variant, rng, initial_state=state)


@pytest.mark.parametrize(
    "segment_ids", [np.zeros((B, T + 1), np.int32), np.zeros((T,), np.int32)], ids=["long", "rank1"]
)
def test_segment_ids_with_wrong_shape(segment_ids, rng):
    with pytest.raises(ValueError, match=expected_shape("segment_ids", "BT")):
        call("gdn2-channel", rng, segment_ids=segment_ids)


def test_float_segment_ids(rng):
    with pytest.raises(ValueError, match=re.escape("`segment_ids` must be integers")):
        call("kda", rng, segment_ids=np.zeros((B, T), np.float32))


def test_unknown_impl(rng):
    with pytest.raises(ValueError, match=r"impl must be one of .*'chunk'.*; got 'fast'"):
        call("eda-channel", rng, impl="fast")


@pytest.mark.parametrize("chunk_size", [48, 0, -16])
def test_chunk_size_not_a_power_of_two(chunk_size, rng):
    message = re.escape(f"`chunk_size` must be a positive power of two or None; got {chunk_size}")
    with pytest.raises(ValueError, match=message):
        call("kda", rng, chunk_size=chunk_size)


@pytest.mark.parametrize("missing", [("b", "w"), ("w",)])
def test_eda_without_beta_or_channel_gates(missing, rng):
    with pytest.raises(ValueError, match=r"`beta` \[B, T, H\].*`b` \[B, T, H, K\].*`w` \[B, T, H, V\]"):
        call("eda-bw", rng, replace=dict.fromkeys(missing))


def test_eda_with_beta_and_channel_gates(rng):
    with pytest.raises(ValueError, match=r"`b` and `w` replace `beta`"):
        call("eda-bw", rng, replace={"beta": jnp.full((B, T, H), 0.5)})


def test_integer_q(rng):
    with pytest.raises(ValueError, match="`q` must be a floating-point array"):
        call("kda", rng, replace={"q": jnp.ones((B, T, H, K), jnp.int32)})


def test_empty_sequence(rng):
    empty = {name: x[:, :0] for name, x in make_inputs("kda", rng, T=T, B=B, H=H, K=K, V=V).items()}
    with pytest.raises(ValueError, match=r"every dimension .* must be >= 1"):
        rules.kda(**empty)


def test_traced_options_are_named_static(rng):
    inputs = make_inputs("kda", rng, T=T, B=B, H=H, K=K, V=V)
    with pytest.raises(ValueError, match=r"`chunk_size` must be .*static"):
        jax.jit(lambda c: rules.kda(**inputs, chunk_size=c))(16)
    with pytest.raises(ValueError, match=r"`normalize_qk` must be True or False.*static"):
        rules.kda(**inputs, normalize_qk=1)


def test_scale_accepts_any_real_scalar_and_rejects_arrays(rng):
    inputs = make_inputs("kda", rng, T=T, B=B, H=H, K=K, V=V)
    expected, _ = rules.kda(**inputs, scale=0.5, impl="recurrent")
    for scale in (np.float32(0.5), jnp.asarray(0.5)):
        np.testing.assert_allclose(rules.kda(**inputs, scale=scale, impl="recurrent")[0], expected, rtol=1e-6)
    traced = jax.jit(lambda s: rules.kda(**inputs, scale=s, impl="recurrent")[0])(0.5)
    np.testing.assert_allclose(traced, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="`scale` must be a real scalar"):
        rules.kda(**inputs, scale=jnp.ones(3))


def test_pallas_value_width_that_its_blocks_cannot_cover(rng):
    inputs = make_inputs("kda", rng, T=T, B=B, H=H, K=K, V=96)
    with pytest.raises(ValueError, match="V must be at most 64 or a multiple of 64; got V = 96"):
        rules.kda(**inputs, impl="pallas")


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ({"K": 48, "V": 32}, "K must be a power of two >= 16; got 48"),
        ({"K": 32, "V": 8}, "V must be a power of two >= 16; got 8"),
        ({"K": 32, "V": 32, "chunk_size": 8}, "chunk_size must be a power of two >= 16; got 8"),
    ],
)
def test_pallas_widths_the_gpu_kernels_cannot_take(dims, message, rng, monkeypatch):
    """On a GPU, the Triton kernels' tiles need K, V and the chunk size to be powers of two of at least 16."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    shape = {name: size for name, size in dims.items() if name != "chunk_size"}
    inputs = make_inputs("kda", rng, T=T, B=B, H=H, **shape)
    chunk_size = dims.get("chunk_size", 16)
    with pytest.raises(ValueError, match=f'impl="pallas" on a GPU: {message}'):
        rules.kda(**inputs, impl="pallas", chunk_size=chunk_size)


def test_value_heads_not_a_multiple_of_key_heads(rng):
    inputs = make_inputs("kda", rng, T=T, B=B, H=2, K=K, V=V)
    grouped = {**inputs, "v": normal(rng, B, T, 3, V), "g": inputs["g"][:, :, :1].repeat(3, 2)}
    with pytest.raises(ValueError, match="`v` has 3 heads; with grouped values that must be a multiple of the H_k = 2"):
        rules.kda(**{**grouped, "beta": grouped["g"][..., 0]})


def test_step_messages_name_the_steps_shapes(rng):
    """A one-token step's errors speak of its own arguments ([B, H, ...], no time axis), and the rule's own
    messages keep theirs after a step has run."""
    b, h, k, v = 2, 3, 4, 5
    state = jnp.zeros((b, h, k, v))
    q, values, gate = jnp.ones((b, h, k)), jnp.ones((b, h, v)), jnp.ones((b, h))
    with pytest.raises(ValueError, match=re.escape("`g` must have shape [B, H] = (2, 3); got (2, 3, 4)")):
        rules.gated_delta_rule_step(state, q, q, values, jnp.ones((b, h, k)), gate)
    with pytest.raises(ValueError, match=re.escape("`q` must have rank 3, [B, H, D]; got shape (2, 4)")):
        rules.gated_delta_rule_step(state, jnp.ones((b, k)), q, values, gate, gate)
    rules.gated_delta_rule_step(state, q, q, values, gate, gate)  # well-formed
    sequence = jnp.ones((b, 7, h, k))
    with pytest.raises(ValueError, match=re.escape("`g` must have shape [B, T, H] = (2, 7, 3); got (2, 7, 3, 4)")):
        rules.gated_delta_rule(sequence, sequence, jnp.ones((b, 7, h, v)), sequence, jnp.ones((b, 7, h)))
