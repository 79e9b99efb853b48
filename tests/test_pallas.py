"""impl="pallas": the Pallas kernels (run in interpret mode on the CPU) agree with the recurrent form, for any
T (shorter than a chunk: the token-by-token kernel), initial state and segments; the chunkwise backward kernels
give the chunk form's gradients (the token-by-token kernel's VJP is the recurrent form's); every kernel variant,
forward and backward, lowers to Triton for CUDA without a GPU (which catches operations the Triton lowering
lacks). GPU runs: `pytest -m gpu`."""

import contextlib
import re

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
    kernel_input_specs,
    loss_fn,
    make_inputs,
    make_segment_ids,
    make_state,
    random_cotangents,
    reference,
    relative_error,
    rule_of,
    run,
    to_float64,
)
from jax.experimental import pallas as pl

from edarnn import rules
from pallas_kernels import forms
from pallas_kernels.gpu import chunk_bwd, chunk_fwd, mosaic

KERNEL_RTOL = 2e-5  # the kernels compute in float32, the reference in float64


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pallas_matches_recurrent(variant, rng):
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    for initial_state in (None, state):
        actual = run(rule, inputs, initial_state, impl="pallas", chunk_size=16)
        assert_close(actual, reference(rule, inputs, initial_state), KERNEL_RTOL, f"{variant} pallas")


SEGMENT_VARIANTS = ["gla-channel", "gated_delta_rule", "gdn2-channel", "eda-bw"]


@pytest.mark.parametrize("variant", SEGMENT_VARIANTS)
def test_pallas_segments_match_recurrent(variant, rng):
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    actual = run(rule, inputs, state, segment_ids, impl="pallas", chunk_size=16)
    assert_close(actual, reference(rule, inputs, state, segment_ids), KERNEL_RTOL, f"{variant} pallas segments")


@pytest.mark.parametrize("variant", ["gated_delta_rule", "kda", "eda-bw"])
def test_pallas_forward_in_value_blocks(variant, rng, monkeypatch):
    """The forward's state and output kernels with V cut in two blocks (their V grids, chunk_fwd.Config), with an
    initial state and segments: the recurrent form's output and final state."""
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(state_block_v=16, output_block_v=16))
    rule, shape = rule_of(variant), {"K": 32, "V": 32}
    inputs, state = make_inputs(variant, rng, T=T, **shape), make_state(rng, **shape)
    segment_ids = make_segment_ids(rng, SEGMENTS)

    def forward(i, s, seg):  # a fresh jit: conftest's `run` is cached across configurations
        return rules.RULES[rule](**i, initial_state=s, segment_ids=seg, impl="pallas", chunk_size=16)

    actual = jax.jit(forward)(inputs, state, segment_ids)
    assert_close(actual, reference(rule, inputs, state, segment_ids), KERNEL_RTOL, f"{variant} pallas, V blocks")


def test_pallas_eda_solve_in_blocks_of_32_rows(rng, monkeypatch):
    """chunk_fwd.Config.solve_block (16, 32): eda's solve substitutes diagonal blocks of 32 rows, the pair kernel's
    (the default is 16), in chunks of 32 tokens (two blocks of 32 rows: the off-diagonal block too; T = 37, the
    second chunk padded) with segments and an initial state: the recurrent form's output and final state (its
    lowering: test_eda_solve_in_blocks_of_32_rows_lowers_to_triton)."""
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(solve_block=(16, 32)))
    inputs, state = make_inputs("eda-bw", rng, T=T), make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)

    def forward(i, s, seg):  # a fresh jit: conftest's `run` is cached across configurations
        return rules.RULES["eda"](**i, initial_state=s, segment_ids=seg, impl="pallas", chunk_size=32)

    expected = reference("eda", inputs, state, segment_ids)
    assert_close(jax.jit(forward)(inputs, state, segment_ids), expected, KERNEL_RTOL, "eda pallas, solve blocks of 32")


def test_state_passes_narrow_their_value_blocks_for_few_heads():
    """chunk_fwd.sequential_block_v: the widest V block up to the limit that gives the sequential state passes
    Config.state_programs programs (B x H x V / block), never narrower than 16 and always a divisor of V (interpret
    mode takes any V up to 64: a block that does not divide V would leave columns unwritten)."""
    block = chunk_fwd.sequential_block_v
    assert block(64, 4 * 16, 128, 96) == 64  # B=4, H=16: 128 programs
    assert block(64, 2 * 16, 128, 96) == 32  # 64 programs at 64, 128 at 32
    assert block(64, 2 * 6, 128, 96) == 16  # B=2, H=6: 24 programs at 64, 96 at 16
    assert block(64, 1, 128, 96) == 16  # never narrower than 16
    assert block(64, 8, 32, 1) == 32 and block(32, 1000, 128, 96) == 32  # V narrower than the limit; the limit
    assert block(64, 1, 34, 96) == 17 and block(64, 1, 48, 96) == 24 and block(64, 1, 33, 96) == 33  # V not 2^n


@pytest.mark.parametrize("variant", ["gla-channel", "kda"])
def test_pallas_forward_with_a_value_width_not_a_power_of_two(variant, rng):
    """V = 34 (interpret mode takes any V up to 64): every column of the output and final state is written and
    equals the recurrent form's, with one sequence and head (the state passes run two V blocks of 17)."""
    rule, shape = rule_of(variant), {"B": 1, "H": 1, "K": 16, "V": 34}
    inputs, state = make_inputs(variant, rng, T=37, **shape), make_state(rng, **shape)
    actual = jax.jit(lambda i, s: rules.RULES[rule](**i, initial_state=s, impl="pallas", chunk_size=16))(inputs, state)
    assert_close(actual, reference(rule, inputs, state, None), KERNEL_RTOL, f"{variant} pallas, V = 34")


@pytest.mark.parametrize("variant", ["gated_delta_rule", "kda", "eda"])
def test_pallas_bf16_storage_interpret(variant, rng, monkeypatch):
    """bf16 inputs: the kernels read q, x, y, z and store Aqk, W, U~, X~, U and the states in bf16, and round the
    state and output kernels' computed product operands to bf16 (chunk_fwd.product_operands); output and state
    within 2e-2 (max-abs over max) of the float64 recurrent form on the same bf16 inputs, chunks of 32. The test's
    heads are narrow (few terms per output), so rounding to bf16 alone moves single elements by up to ~6e-3 here;
    the full-width GPU test holds 1e-2."""
    rule = rule_of(variant)
    inputs = make_inputs(variant, rng, T=70)
    low = {
        name: None if x is None else x.astype(jnp.bfloat16 if name in "qkve" else jnp.float32)
        for name, x in inputs.items()
    }
    o, state = jit(lambda i: rules.RULES[rule](**i, impl="pallas", chunk_size=32))(low)
    expected_o, expected_state = reference(rule, low)
    assert o.dtype == jnp.bfloat16
    assert relative_error(o, expected_o) < 2e-2 and relative_error(state, expected_state) < 2e-2
    monkeypatch.setattr(chunk_fwd, "product_operands", lambda config, storage: None)  # float32 products instead
    _, float32_products = jit(lambda i: rules.RULES[rule](**i, impl="pallas", chunk_size=32))(low)  # a fresh trace
    assert relative_error(state, float32_products) > 0  # the rounding took place


def test_product_operands_bfloat16_only_with_bfloat16_storage_of_everything():
    """The state kernels round their products' computed operands to bfloat16 only where every stored operand is
    bfloat16 (else the products stay float32 anyway) and never for float16 storage (the running state's range)."""
    config = chunk_fwd.Config()
    assert chunk_fwd.product_operands(config, "bfloat16") == jnp.bfloat16
    assert chunk_fwd.product_operands(config, "float16") is None
    assert chunk_fwd.product_operands(config, None) is None
    assert chunk_fwd.product_operands(config._replace(low_states=False), "bfloat16") is None
    assert chunk_fwd.product_operands(config._replace(low_intermediates=False), "bfloat16") is None


def test_state_kernels_prepared_operands_match_a_loop_over_chunks(rng):
    """chunk_fwd.end_decayed_keys and chunk_bwd._decayed_queries (XLA, the kernels' layout) against a loop over
    chunks and sub-step rows: X exp(G_last - G) on the rows of each chunk's last segment, exp(G_last) where that
    segment began before the chunk, Q exp(Gq) on the tokens of the segment that began before it. Two sub-steps per
    token, chunks of 4 tokens, channel-wise and scalar decays; segments: one boundary inside a chunk, one exactly
    at a chunk's start (the chunk's last segment began at its first row: no state decay), one chunk whole."""
    batch, chunks, chunk, per_token, heads, key = 1, 4, 4, 2, 2, 3
    rows, length = chunk * per_token, chunks * chunk
    seg_q = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]])  # boundaries at token 5 and 8
    seg = np.repeat(seg_q, per_token, axis=1)
    seg_prev = np.concatenate([seg_q[:, :1], seg_q[:, chunk - 1 :: chunk][:, :-1]], axis=1)  # [B, N]
    x = rng.standard_normal((batch, length * per_token, heads, key))
    q = rng.standard_normal((batch, length, heads, key))
    for dim in (key, 1):
        g = -rng.uniform(0, 1, (batch, chunks, rows, heads, dim))
        gcum = np.cumsum(g, axis=2).reshape(batch, length * per_token, heads, dim)
        gq = gcum[:, per_token - 1 :: per_token]
        x_to_end, state_decay = chunk_fwd.end_decayed_keys(
            jnp.asarray(x), jnp.asarray(gcum), jnp.asarray(seg), jnp.asarray(seg_prev), rows, jnp.float32
        )
        q_decayed = chunk_bwd._decayed_queries(
            jnp.asarray(q), jnp.asarray(gq), jnp.asarray(seg_q), jnp.asarray(seg_prev), chunk, jnp.float32
        )
        expected_x, expected_q = np.zeros_like(x), np.zeros_like(q)
        expected_decay = np.zeros((batch, chunks, heads, dim))
        for n in range(chunks):
            last = (n + 1) * rows - 1
            if seg[0, last] == seg_prev[0, n]:
                expected_decay[:, n] = np.exp(gcum[:, last])
            for r in range(n * rows, last + 1):
                if seg[0, r] == seg[0, last]:
                    expected_x[:, r] = x[:, r] * np.exp(gcum[:, last] - gcum[:, r])
            for t in range(n * chunk, (n + 1) * chunk):
                if seg_q[0, t] == seg_prev[0, n]:
                    expected_q[:, t] = q[:, t] * np.exp(gq[:, t])
        assert expected_decay[0, 1].sum() == 0 and expected_decay[0, 2].sum() == 0 and expected_decay[0, 3].all()
        np.testing.assert_allclose(x_to_end, expected_x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state_decay, expected_decay, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(q_decayed, expected_q, rtol=1e-5, atol=1e-6)


@pytest.fixture
def backward_kernels(monkeypatch):
    """Differentiate through the backward kernels, whatever forms.BACKWARD_KERNELS picks by default."""
    monkeypatch.setitem(forms.BACKWARD_KERNELS, "gpu", True)


@pytest.fixture
def fresh_traces():
    """Drop grad_runner's cached jits before and after the test: the kernels' configuration (BACKWARD_KERNELS,
    chunk_bwd.DEFAULT_CONFIG) is read when tracing, so a test that changes it must trace anew, and its traces must
    not outlive it."""
    grad_runner.cache_clear()
    yield
    grad_runner.cache_clear()


@pytest.mark.parametrize("backward", [True, False])
def test_pallas_backward_follows_the_platform_choice(backward, rng, monkeypatch, fresh_traces):
    """Either backward of the chunkwise kernels gives the chunk form's gradients (the default is measured)."""
    monkeypatch.setitem(forms.BACKWARD_KERNELS, "gpu", backward)
    inputs, state = make_inputs("kda", rng, T=T), make_state(rng)
    cotangents = random_cotangents(rng, inputs)
    actual = grad_runner("kda", "pallas", 16)(cotangents, inputs, state, None)
    expected = grad_runner("kda", "chunk", 16)(cotangents, inputs, state, None)
    assert_close(actual, expected, KERNEL_RTOL, f"kda pallas grad, backward kernels {backward}")


GRAD_CASES = [(variant, False) for variant in VARIANTS] + [(variant, True) for variant in SEGMENT_VARIANTS]


@pytest.mark.parametrize(
    "variant,with_segments", GRAD_CASES, ids=[f"{v}{'-segments' if s else ''}" for v, s in GRAD_CASES]
)
def test_pallas_grads_match_chunk(variant, with_segments, rng, backward_kernels):
    """The backward kernels (gpu/chunk_bwd.py) give the chunk form's gradients of every input and the initial
    state: odd T (a padded tail), chunks of 16, segments that cross chunk boundaries."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS) if with_segments else None
    cotangents = random_cotangents(rng, inputs)
    actual = grad_runner(rule, "pallas", 16)(cotangents, inputs, state, segment_ids)
    expected = grad_runner(rule, "chunk", 16)(cotangents, inputs, state, segment_ids)
    assert_close(actual, expected, KERNEL_RTOL, f"{variant} pallas grad")


@pytest.mark.slow  # every other test of impl="pallas" runs the kernel, the default, against the recurrent or chunk form
@pytest.mark.parametrize("variant", ["gated_delta_rule", "kda", "eda-bw"])
def test_cumsum_kernel_matches_xlas(variant, rng, backward_kernels, monkeypatch, fresh_traces):
    """chunk_fwd.Config.cumsum_kernel: the chunk-local cumulative log-decay and its VJP (the sums from each row to
    its chunk's end) by a Pallas kernel give what XLA's two-level sum and its VJP give: the same output, final state
    and gradients of every input. Scalar and channel-wise decays, eda's decay per token (summed over tokens),
    segments, an initial state, odd T."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    cotangents = random_cotangents(rng, inputs)

    def forward_and_grads(in_kernel):  # fresh jits: the configuration is read when tracing
        monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(cumsum_kernel=in_kernel))
        options = {"impl": "pallas", "chunk_size": 16}
        forward = jit(lambda i, s, seg: rules.RULES[rule](**i, initial_state=s, segment_ids=seg, **options))
        grads = jit(jax.grad(loss_fn(rule, cotangents, **options), argnums=(0, 1)))(inputs, state, segment_ids)
        return forward(inputs, state, segment_ids), grads

    assert_close(forward_and_grads(True), forward_and_grads(False), 1e-6, f"{variant} cumsum kernel")


@pytest.mark.parametrize(
    "variant", [*(pytest.param(v, marks=pytest.mark.slow) for v in ("gated_delta_rule", "kda")), "eda-bw"]
)
def test_pallas_kept_chunk_states_give_the_recomputed_gradients(variant, rng, backward_kernels, monkeypatch):
    """Kept chunk states (the default) against `rules.recompute_chunk_states()`: the backward takes the forward's
    chunk states instead of recomputing them; the same kernels on the same inputs, so the gradients equal the
    recompute's (and with them the chunk form's, as test_pallas_grads_match_chunk checks for the kept ones).
    Chunks of 32 (two row blocks), segments, an initial state."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    cotangents = random_cotangents(rng, inputs)

    def grads(keep):  # a fresh jit: the choice is read when tracing
        loss = loss_fn(rule, cotangents, impl="pallas", chunk_size=32)
        with contextlib.nullcontext() if keep else rules.recompute_chunk_states():
            return jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs, state, segment_ids)

    kept, recomputed = grads(True), grads(False)
    assert_close(kept, recomputed, 1e-12, f"{variant} kept chunk states")


@pytest.mark.parametrize("variant", [pytest.param("kda", marks=pytest.mark.slow), "eda-channel"])
def test_pallas_grouped_values(variant, rng, backward_kernels):
    """v, the gates and the state with 3x the heads of q, k and e (grouped values): the recurrent form's output
    and final state, the chunk form's gradients (rules.py repeats q, k, e per value head before the kernels)."""
    rule = rule_of(variant)
    small, wide = make_inputs(variant, rng, T=T, H=2), make_inputs(variant, rng, T=T, H=6)
    grouped = {name: small[name] if name in ("q", "k", "e") else wide[name] for name in wide}
    state = make_state(rng, H=6)
    actual = run(rule, grouped, state, impl="pallas", chunk_size=16)
    assert_close(actual, reference(rule, grouped, state), KERNEL_RTOL, f"{variant} pallas, grouped values")
    cotangents = random_cotangents(rng, wide)
    actual = grad_runner(rule, "pallas", 16)(cotangents, grouped, state, None)
    expected = grad_runner(rule, "chunk", 16)(cotangents, grouped, state, None)
    assert_close(actual, expected, KERNEL_RTOL, f"{variant} pallas grad, grouped values")


@pytest.mark.parametrize("variant", [*SEGMENT_VARIANTS, "kda"])
def test_pallas_grads_across_the_blocks_of_a_chunk(variant, rng, backward_kernels, fresh_traces):
    """Chunks of 32 tokens (two 16-token blocks: the block pairs below the diagonal),
    segments that cross blocks and chunks, an initial state: the chunk form's gradients."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=T), make_state(rng)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    cotangents = random_cotangents(rng, inputs)
    actual = grad_runner(rule, "pallas", 32)(cotangents, inputs, state, segment_ids)
    expected = grad_runner(rule, "chunk", 32)(cotangents, inputs, state, segment_ids)
    assert_close(actual, expected, KERNEL_RTOL, f"{variant} pallas grad, chunks of 32")


@pytest.mark.parametrize("variant", ["kda", "eda-bw"])
def test_pallas_head_size_256(variant, rng, backward_kernels, fresh_traces):
    """K = V = 256 (four K blocks in state_products and key_grad, four V blocks elsewhere), odd T, an initial
    state: the recurrent form's output and final state, and the chunk form's gradients."""
    rule, shape = rule_of(variant), {"B": 1, "H": 1, "K": 256, "V": 256}
    inputs, state = make_inputs(variant, rng, T=37, **shape), make_state(rng, **shape)
    cotangents = random_cotangents(rng, inputs)
    actual = run(rule, inputs, state, impl="pallas", chunk_size=16)
    assert_close(actual, reference(rule, inputs, state), KERNEL_RTOL, f"{variant} pallas, K = V = 256")
    actual = grad_runner(rule, "pallas", 16)(cotangents, inputs, state, None)
    expected = grad_runner(rule, "chunk", 16)(cotangents, inputs, state, None)
    assert_close(actual, expected, KERNEL_RTOL, f"{variant} pallas grad, K = V = 256")


@pytest.mark.parametrize(
    "variant", [*(pytest.param(v, marks=pytest.mark.slow) for v in ("gated_delta_rule", "kda")), "eda-bw"]
)
def test_pallas_grads_in_key_and_value_blocks(variant, rng, backward_kernels, monkeypatch, fresh_traces):
    """The backward kernels with K and V cut in two blocks each (the K grids of state_products and key_grad, a
    scalar decay's partial sums added by XLA; the V loops of score_grad and state_products, state_grad's V grid),
    chunks of 32 (two row blocks), with segments: the chunk form's gradients."""
    config = chunk_bwd.Config(value_grad_block_v=16, state_grad_block_v=16, block_v=16, block_k=16)
    monkeypatch.setattr(chunk_bwd, "DEFAULT_CONFIG", config)
    rule, shape = rule_of(variant), {"K": 32, "V": 32}
    inputs, state = make_inputs(variant, rng, T=T, **shape), make_state(rng, **shape)
    segment_ids = make_segment_ids(rng, SEGMENTS)
    cotangents = random_cotangents(rng, inputs)

    def grads(impl):
        loss = loss_fn(rule, cotangents, impl=impl, chunk_size=32)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(inputs, state, segment_ids)

    assert_close(grads("pallas"), grads("chunk"), KERNEL_RTOL, f"{variant} pallas grad in K and V blocks")


@pytest.mark.parametrize("variant", ["gla-channel", pytest.param("kda", marks=pytest.mark.slow), "eda-bw"])
def test_pallas_key_grad_four_row_blocks(variant, rng, backward_kernels, monkeypatch, fresh_traces):
    """key_grad's factored pairs below the diagonal (channel-wise decays: one reference per row block): the chunk
    form's gradients with chunks of 64 (four row blocks), odd T, an initial state, segments across blocks and one
    starting at a chunk, K in two blocks; without an erase address, with one, and with two sub-steps per token."""
    monkeypatch.setattr(chunk_bwd, "DEFAULT_CONFIG", chunk_bwd.Config(block_k=16))
    rule, shape = rule_of(variant), {"K": 32}
    inputs, state = make_inputs(variant, rng, T=101, **shape), make_state(rng, **shape)
    segment_ids = make_segment_ids(rng, [[30, 1, 40, 30], [64, 37]])
    cotangents = random_cotangents(rng, inputs)
    actual = grad_runner(rule, "pallas", 64)(cotangents, inputs, state, segment_ids)
    expected = grad_runner(rule, "chunk", 64)(cotangents, inputs, state, segment_ids)
    assert_close(actual, expected, KERNEL_RTOL, f"{variant} key_grad, four row blocks")


LOW_PRECISION = {  # (chunk_bwd.Config, chunk_fwd.Config) fields of the bf16 gradient test's cases
    "bf16-grads": ({"low_grads": True}, {}),
    "f32-grads": ({"low_grads": False}, {}),
    "f32-states": ({}, {"low_states": False}),  # bf16 dO against float32 states: mixed-dtype products
}


@pytest.mark.parametrize(
    "variant, precision",
    [  # the non-default settings in the slow suite, but eda's float32 states (mixed-dtype products; its sub-steps
        # cover the others' paths)
        pytest.param(v, p, marks=[pytest.mark.slow] if p != "bf16-grads" and (v, p) != ("eda", "f32-states") else [])
        for v in ["gated_delta_rule", "kda", "eda"]
        for p in LOW_PRECISION
    ],
)
def test_pallas_bf16_grads_interpret(variant, precision, rng, backward_kernels, monkeypatch, fresh_traces):
    """bf16 q, k, v (e): the backward kernels recompute with the forward's 16-bit storage, read dO in bf16 and
    (low_grads) store dU, P^T dO and the end-state gradients in bf16; every gradient within 2e-2 (max-abs over
    max) of the float64 recurrent form's on the same inputs, heads of 32, chunks of 32 (≈7e-3 seen at 64); also
    with the start states and U stored in float32 (chunk_fwd's low_states off)."""
    backward, forward = LOW_PRECISION[precision]
    monkeypatch.setattr(chunk_bwd, "DEFAULT_CONFIG", chunk_bwd.Config(**backward))
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(**forward))
    rule, shape = rule_of(variant), {"B": 1, "H": 2, "K": 32, "V": 32}
    inputs = make_inputs(variant, rng, T=70, **shape)
    low = {n: None if x is None else x.astype(jnp.bfloat16 if n in "qkve" else jnp.float32) for n, x in inputs.items()}
    state = make_state(rng, **shape, dtype=jnp.float32)
    co, cs = random_cotangents(rng, low)

    def grads(impl, args, initial_state):
        def loss(args, initial_state):
            o, final_state = rules.RULES[rule](**args, initial_state=initial_state, impl=impl, chunk_size=32)
            return jnp.sum(o.astype(jnp.float64) * co) + jnp.sum(final_state * cs)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(args, initial_state)

    actual = grads("pallas", low, state)
    assert_close(actual, grads("recurrent", to_float64(low), to_float64(state)), 2e-2, f"{variant} pallas bf16 grad")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pallas_short_sequence_matches_recurrent(variant, rng):
    """T below one chunk runs the token-by-token kernel: with a state, and with segments."""
    rule = rule_of(variant)
    inputs, state = make_inputs(variant, rng, T=7), make_state(rng)
    segment_ids = make_segment_ids(rng, [[3, 4], [1, 6]])
    for segments in (None, segment_ids):
        actual = run(rule, inputs, state, segments, impl="pallas", chunk_size=16)
        assert_close(actual, reference(rule, inputs, state, segments), KERNEL_RTOL, f"{variant} pallas short")


@pytest.mark.parametrize("rule", ["kda", "eda"])
def test_pallas_step_matches_recurrent_step(rule, rng):
    inputs, state = make_inputs(rule, rng, T=1), make_state(rng)
    token = {name: None if x is None else x[:, 0] for name, x in inputs.items()}
    step = rules.__dict__[f"{rule}_step"]
    assert_close(step(state, **token, impl="pallas"), step(state, **token), KERNEL_RTOL, f"{rule} pallas step")


def test_pallas_short_sequence_grads_match_recurrent(rng):
    inputs, state = make_inputs("gdn2-channel", rng, T=5), make_state(rng)
    cotangents = random_cotangents(rng, inputs)
    actual = grad_runner("gdn2", "pallas", 16)(cotangents, inputs, state, None)
    expected = grad_runner("gdn2", "recurrent")(cotangents, inputs, state, None)
    assert_close(actual, expected, 1e-9, "gdn2 pallas short grad")


@pytest.mark.parametrize("impl", ["chunk", "pallas"])
@pytest.mark.parametrize("floor", [-5.0, -10.0])
def test_channel_decay_down_to_the_documented_floor_float32(floor, impl, rng):
    """Per-channel log-decay down to -10 (the documented floor) on many tokens and channels, chunk 64: finite
    and accurate in float32."""
    inputs = make_inputs("eda-channel", rng, T=130, dtype=jnp.float32, max_decay=-floor)
    inputs["g"] = inputs["g"].at[..., :3].set(floor)
    actual = run("eda", inputs, impl=impl, chunk_size=64)
    assert relative_error(actual[0], reference("eda", inputs)[0]) < 1e-4


@pytest.mark.parametrize("floor,rtol", [(-5.0, 1e-4), (-10.0, 1e-2)])
def test_pallas_grads_down_to_the_documented_floor_float32(floor, rtol, rng, backward_kernels, fresh_traces):
    """The backward kernels at per-channel log-decay down to -10, chunk 64, float32: finite, and close to the
    float64 recurrent form's gradients. At -10 a 16-token block's middle reference (shared with the forward)
    puts factors at exp(+-80), where small products fall below float32's normal range and are flushed: about
    1e-3 of the largest gradient is lost (docs/performance.md); key_grad's references off the diagonal keep every
    factor <= 1."""
    inputs = make_inputs("eda-channel", rng, T=130, dtype=jnp.float32, max_decay=-floor)
    inputs["g"] = inputs["g"].at[..., :3].set(floor)
    state = make_state(rng, dtype=jnp.float32)
    cotangents = random_cotangents(rng, inputs)
    actual = grad_runner("eda", "pallas", 64)(cotangents, inputs, state, None)
    expected = grad_runner("eda", "recurrent")(cotangents, to_float64(inputs), to_float64(state), None)
    assert_close(actual, expected, rtol, f"eda pallas grad, log-decay floor {floor}")


LOWERING_CASES = {  # name: (sub-steps per token, decay width: "1" or "K", erase address y, segments)
    "scalar-decay delta": (1, "1", True, False),
    "channel-decay delta": (1, "K", True, False),
    "channel-decay additive": (1, "K", False, False),
    "eda": (2, "K", True, False),
    "channel-decay delta, segments": (1, "K", True, True),
}


@pytest.fixture
def no_x64():
    """Lower as the library runs, with 64-bit types off (the suite enables them; the Triton lowering of a select
    between two int32 constants differed with them on, hiding a failure on the GPU)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


def _lowering_inputs(case, t, **dims):
    per_token, decay, erase, segments = LOWERING_CASES[case]
    return kernel_input_specs(t=t, per_token=per_token, decay=decay, erase=erase, segments=segments, **dims)


@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_recurrent_kernel_lowers_to_triton(case, no_x64):
    forward = jax.jit(lambda q, sub, s0, seg: forms.recurrent(q, sub, s0, seg, False))
    lowered = forward.trace(*_lowering_inputs(case, 3)).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 1


def test_decode_kernel_updates_the_state_in_place_on_a_gpu(no_x64, monkeypatch):
    """A jitted decoding step with the state donated, lowered for CUDA as on a GPU: the Triton call aliases its
    state operand to its state output (input_output_aliases), and the jitted function its argument to its result,
    so the state is updated in place."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    b, h, k, v = 2, 4, 128, 128
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    token = (spec(b, h, k), spec(b, h, k), spec(b, h, v), spec(b, h, k), spec(b, h))
    step = jax.jit(lambda s, *t: rules.kda_step(s, *t, impl="pallas"), donate_argnums=0)
    text = step.trace(spec(b, h, k, v), *token).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    assert re.search(r"output_operand_alias<output_tuple_indices = \[\d+\], operand_index = \d+", text)
    assert "tf.aliasing_output" in text


def _forward_kernel_count(case):
    """Kernels of one chunkwise forward: the cumulative log-decay, pair scores, solve (with an erase address: it
    inverts I + A), state and output."""
    return 2 + LOWERING_CASES[case][2] + 2


LOWERING_SETTINGS = {  # (storage, chunk_fwd.Config fields) of the lowering tests
    "f32": (None, {}),
    "bf16": (jnp.bfloat16, {}),
    "f32-states": (jnp.bfloat16, {"low_states": False}),  # bf16 inputs against float32 states: mixed products
}
FORWARD_LOWERING = ["f32", "bf16"]
BACKWARD_LOWERING = ["f32", "bf16", "f32-states"]


@pytest.mark.parametrize("setting", FORWARD_LOWERING)
@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_chunk_kernels_lower_to_triton(case, setting, monkeypatch, no_x64):
    """The forward kernels, float32 and 16-bit storage of the intermediates (16-bit products)."""
    storage, fields = LOWERING_SETTINGS[setting]
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(**fields))
    forward = jax.jit(lambda q, sub, s0, seg: forms.chunkwise(q, sub, s0, seg, 64, False, "gpu", storage))
    text = forward.trace(*_lowering_inputs(case, 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == _forward_kernel_count(case)
    assert 'name = "_state_kernel"' in text


def test_eda_solve_in_blocks_of_32_rows_lowers_to_triton(monkeypatch, no_x64):
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(solve_block=(16, 32)))
    forward = jax.jit(lambda q, sub, s0, seg: forms.chunkwise(q, sub, s0, seg, 32, False, "gpu", jnp.bfloat16))
    text = forward.trace(*_lowering_inputs("eda", 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == _forward_kernel_count("eda")


BACKWARD_KERNELS = (
    "value_grad_kernel",
    "_state_grad_kernel",
    "_score_grad_kernel",
    "_state_products_kernel",
    "_key_grad_kernel",
)


@pytest.mark.parametrize("setting", BACKWARD_LOWERING)
@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_chunk_backward_kernels_lower_to_triton(case, setting, backward_kernels, monkeypatch, no_x64):
    """A training step's forward and backward at K = V = 128 (two K blocks in state_products and key_grad, two V
    blocks elsewhere), float32 and 16-bit storage (16-bit inputs with float32 states):
    the forward kernels, those between the cumulative sum and the output kernel again (the forward keeping only its
    inputs, the backward recomputes the chunk states: pair, solve, state), the five backward kernels (value_grad,
    state_grad, score_grad, state_products, key_grad) and the cumulative sum's VJP."""
    storage, fields = LOWERING_SETTINGS[setting]
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(**fields))
    text = _lowered_training_step(case, storage, keep=False)
    assert text.count("xla.gpu.triton") == 2 * _forward_kernel_count(case) - 1 + len(BACKWARD_KERNELS)
    assert all(f'name = "{kernel}"' in text for kernel in BACKWARD_KERNELS)


@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_kept_chunk_states_spare_the_recompute_kernels(case, backward_kernels, monkeypatch, no_x64):
    """With the chunk states kept (the default) a training step lowers to the forward's kernels, the five
    backward kernels and the cumulative sum's VJP only: no pair, solve and state kernels again."""
    text = _lowered_training_step(case, jnp.bfloat16)
    assert text.count("xla.gpu.triton") == _forward_kernel_count(case) + len(BACKWARD_KERNELS) + 1


@pytest.mark.parametrize("variant", [pytest.param("gated_delta_rule", marks=pytest.mark.slow), "kda"])
def test_mosaic_output_kernel_matches_the_triton_one(variant, rng, monkeypatch):
    """chunk_fwd.Config.output_backend="mosaic" (gpu/mosaic.py, run by Mosaic GPU's interpreter) against the Triton
    output kernel (interpret mode): bf16 inputs, chunks of 64, two V blocks, an initial state, segments that begin
    inside the first chunk and at the second; both round the same float32 sums to bf16, so they differ by bf16
    rounding at most; the recurrent form (float64) to bf16's precision."""
    rule, shape = rule_of(variant), {"B": 1, "H": 1, "K": 64, "V": 128}
    inputs = make_inputs(variant, rng, T=128, dtype=jnp.bfloat16, max_decay=0.1, **shape)  # the state reaches far
    state, segment_ids = make_state(rng, **shape), make_segment_ids(rng, [[3, 1, 60, 64]])

    def forward(backend):  # a fresh jit per configuration
        monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(output_backend=backend))
        call = lambda i, s, seg: rules.RULES[rule](**i, initial_state=s, segment_ids=seg, impl="pallas")  # noqa: E731
        return jax.jit(call)(inputs, state, segment_ids)

    mosaic, triton = forward("mosaic"), forward("triton")
    assert mosaic[0].dtype == jnp.bfloat16
    assert relative_error(mosaic[0], triton[0]) < 4e-3 and relative_error(mosaic[1], triton[1]) == 0
    expected = reference(rule, to_float64(inputs), state, segment_ids)
    assert relative_error(mosaic[0], expected[0]) < 1e-2


@pytest.mark.parametrize("case", list(LOWERING_CASES))
def test_mosaic_output_kernel_lowers_for_cuda(case, monkeypatch, no_x64):
    """With output_backend="mosaic" the forward lowers for CUDA on the CPU (Mosaic GPU checks its layouts while
    lowering) to one Mosaic GPU kernel, the output, beside the Triton kernels before it."""
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(output_backend="mosaic"))
    forward = jax.jit(lambda q, sub, s0, seg: forms.chunkwise(q, sub, s0, seg, 64, False, "gpu", jnp.bfloat16))
    text = forward.trace(*_lowering_inputs(case, 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == _forward_kernel_count(case) - 1
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1


@pytest.mark.parametrize(
    ("hopper", "storage", "chunk_size", "mosaic_kernels"),
    [(True, jnp.bfloat16, 64, 1), (True, None, 64, 0), (True, jnp.bfloat16, 32, 0), (False, jnp.bfloat16, 64, 0)],
    ids=["hopper-bf16", "hopper-f32", "hopper-chunks-32", "not-hopper"],
)
def test_auto_output_backend_is_mosaic_on_a_hopper_where_it_applies(
    hopper, storage, chunk_size, mosaic_kernels, monkeypatch, no_x64
):
    """output_backend "auto" (the default): the Mosaic GPU kernel on a Hopper for 16-bit storage and chunks of a
    multiple of 64 tokens; the Triton kernel otherwise (float32 storage, eda's chunks of 32, other GPUs)."""
    assert chunk_fwd.DEFAULT_CONFIG.output_backend == "auto"
    monkeypatch.setattr(mosaic, "on_hopper", lambda: hopper)
    forward = jax.jit(lambda q, sub, s0, seg: forms.chunkwise(q, sub, s0, seg, chunk_size, False, "gpu", storage))
    text = forward.trace(*_lowering_inputs("channel-decay delta", 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == mosaic_kernels
    assert text.count("xla.gpu.triton") == _forward_kernel_count("channel-decay delta") - mosaic_kernels


@pytest.mark.parametrize(
    ("storage", "chunk_size", "message"),
    [(None, 64, "one 16-bit dtype"), (jnp.bfloat16, 32, "multiple of 64 tokens")],
)
def test_mosaic_output_kernel_refuses_what_it_cannot_run(storage, chunk_size, message, monkeypatch, no_x64):
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(output_backend="mosaic"))
    forward = jax.jit(lambda q, sub, s0, seg: forms.chunkwise(q, sub, s0, seg, chunk_size, False, "gpu", storage))
    with pytest.raises(ValueError, match=message):
        forward.trace(*_lowering_inputs("channel-decay delta", 128))


def test_an_unknown_output_backend_is_refused(monkeypatch, no_x64):
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(output_backend="cuda"))
    forward = jax.jit(lambda q, sub, s0, seg: forms.chunkwise(q, sub, s0, seg, 64, False, "gpu", jnp.bfloat16))
    with pytest.raises(ValueError, match='output_backend must be "auto", "triton" or "mosaic"; got cuda'):
        forward.trace(*_lowering_inputs("channel-decay delta", 128))


def _lowered_training_step(case, storage, b=1, h=2, keep=True):
    """The lowered text (for CUDA) of a training step's forward and backward at K = V = 128, chunks of 64."""

    def loss(q, sub, s0, seg):
        o, state = forms.chunkwise(q, sub, s0, seg, 64, False, "gpu", storage, keep)
        return jnp.sum(o * o) + jnp.sum(state)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    specs = _lowering_inputs(case, 128, k=128, v=128, b=b, h=h)
    return step.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


def test_launch_grids_put_a_chunks_programs_side_by_side(no_x64):
    """CUDA launches blocks in x order, and Pallas folds a grid's leading axes into x (the first fastest). The
    parallel kernels list their chunk-local axes first, so that a chunk's programs run together and share its
    tiles through L2 (Nsight Compute, session 12); key_grad keeps its row blocks last (4 static bodies: side by
    side they missed the instruction cache); the sequential state passes their V blocks first. Here B=2, H=3,
    N=2 chunks of 64 (4 row blocks), K=V=128 (2 blocks of 64; the state passes' V blocks of 16)."""
    text = _lowered_training_step("channel-decay delta", None, b=2, h=3)
    grids = {}
    for line in text.splitlines():
        if "xla.gpu.triton" in line:
            name = re.search(r'name = "(\w+)"', line).group(1)
            grids[name] = tuple(int(re.search(rf"grid_{axis} = (\d+)", line).group(1)) for axis in "xyz")
    b, h, n_chunks = 2, 3, 2
    local = {"pair_kernel": 16, "output_kernel": 2, "value_grad_kernel": 2, "_score_grad_kernel": 4}
    local["_state_products_kernel"] = 2
    for name, count in local.items():
        assert grids[name] == (count * b, h, n_chunks), name
    assert grids["solve_kernel"] == (b, h, n_chunks)
    assert grids["_state_kernel"] == grids["_state_grad_kernel"] == (8, b, h)
    assert grids["_key_grad_kernel"] == (2 * b * h, n_chunks, 4)


GPU_FORWARD_CASES = {  # (chunk_fwd.Config fields, K = V) of the full-width bf16 test's cases
    "default": ({}, 128),
    "f32-states": ({"low_states": False}, 128),  # float32 states and U: the state kernels' products in float32
    "heads-64": ({}, 64),
    "heads-256": ({}, 256),
    # B x H = 8: the default's state passes run V blocks of 16 (Config.state_programs); this case their widest, 64
    "state-blocks-64": ({"state_programs": 1}, 128),
}
GPU_GRAD_CASES = {name: GPU_FORWARD_CASES[name] for name in ("heads-64", "default", "heads-256", "state-blocks-64")}


def in_bf16(rule, inputs):
    """The arrays of a rule's inputs (q, k, v and eda's e) in bf16, its gates as they are (float32): the inputs of
    the bf16 path, 16-bit storage in the kernels (float32 e would make eda's storage float32)."""
    arrays = 4 if rule == "eda" else 3
    return [x.astype(jnp.bfloat16) if i < arrays else x for i, x in enumerate(inputs)]


def poison_gpu_memory(smallest_bytes: int = 1024) -> None:
    """Fill the device allocator's free memory with NaN, so that output elements a kernel fails to write read as
    NaN: NaN arrays of power-of-two sizes up to 1 GiB, each the largest that fits the pool's largest free block
    (`memory_stats`), or a whole GiB while the pool can still grow to its limit, until no free block of
    `smallest_bytes` is left; then free them. The pool keeps the memory, so every later buffer of `smallest_bytes`
    or more is carved from poisoned memory (if the device refuses the pool's growth, only the memory the pool
    holds is poisoned). Power-of-two sizes keep the fills to at most 21 compiled shapes, however fragmented the
    pool. `test_poisoned_gpu_memory_shows_an_unwritten_block` checks this."""
    device = jax.devices()[0]
    held, can_grow = [], True
    try:
        while True:  # each fill takes at least smallest_bytes of the pool's free memory, or grows the pool
            stats = device.memory_stats()
            grow = can_grow and stats["pool_bytes"] < stats["bytes_limit"]
            free = 1 << 30 if grow else stats["largest_free_block_bytes"]
            if free < smallest_bytes:
                break
            nbytes = 1 << min(30, free.bit_length() - 1)
            try:
                held.append(jnp.full((nbytes // 4,), jnp.nan, jnp.float32).block_until_ready())
            except jax.errors.JaxRuntimeError as error:  # the device refused the pool's growth, or the fill's own
                if "RESOURCE_EXHAUSTED" not in str(error):  # operands took part of the last free block: what is
                    raise  # left is smaller than one fill
                if not grow:
                    break
                can_grow = False
    finally:  # also when interrupted: a held fill would starve the tests that follow
        for array in held:
            array.delete()


@pytest.mark.gpu
def test_poisoned_gpu_memory_shows_an_unwritten_block():
    """A kernel that writes the first of its two output blocks only: after poison_gpu_memory the other reads NaN
    (the check the bf16 tests below rely on)."""

    def first_block_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((16, 16), lambda i: (i, 0))
    x = jnp.ones((32, 16), jnp.float32)
    call = chunk_fwd.triton_call(
        first_block_only,
        4,
        False,
        grid=(2,),
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    )
    compiled = jax.jit(call).lower(x).compile()
    poison_gpu_memory()
    o = np.asarray(compiled(x))
    assert (o[:16] == 1).all() and np.isnan(o[16:]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_FORWARD_CASES))
@pytest.mark.parametrize("rule", ["gated_delta_rule", "kda", "gdn2", "eda"])
def test_pallas_on_gpu_bf16(rule, case, monkeypatch):
    """Full-width heads in bf16 against a float32 recurrent run, device memory poisoned with NaN before the run:
    relative error under 1e-2, no NaN (the default configuration (16-bit products; B x H = 8, so the state passes
    run V blocks of 16), float32 states, K = V of 64, 128 and 256, the state passes at their widest V blocks, 64;
    eda at its default chunks of 32 tokens)."""
    from edarnn.check_forms import random_inputs

    fields, width = GPU_FORWARD_CASES[case]
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(**fields))

    inputs = random_inputs(rule, 2, 1000, 4, width, width)
    expected, expected_state = rules.RULES[rule](*inputs, impl="recurrent")
    low = in_bf16(rule, inputs)
    forward = jax.jit(lambda *a: rules.RULES[rule](*a, impl="pallas")).lower(*low).compile()
    poison_gpu_memory()
    o, state = forward(*low)
    assert o.dtype == jnp.bfloat16 and not np.isnan(np.asarray(o, np.float32)).any()
    assert not np.isnan(np.asarray(state)).any()
    assert relative_error(o, expected) < 1e-2 and relative_error(state, expected_state) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["gated_delta_rule", "kda", "gdn2"])
def test_mosaic_output_kernel_on_gpu_bf16(rule, monkeypatch):
    """The Mosaic GPU output kernel compiled and run (TMA, wgmma) at full-width heads in bf16 with packed sequences,
    device memory poisoned: within 1e-2 of a float32 recurrent run and within bf16 rounding of the Triton kernel."""
    from edarnn.check_forms import random_inputs

    inputs = in_bf16(rule, random_inputs(rule, 2, 1000, 4, 128, 128))
    segment_ids = jnp.asarray(np.searchsorted(np.array([0, 100, 517]), np.arange(1000), side="right"))[None]
    segment_ids = jnp.repeat(segment_ids, 2, axis=0)
    expected = rules.RULES[rule](*[x.astype(jnp.float32) for x in inputs], segment_ids=segment_ids, impl="recurrent")

    def forward(backend):
        monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(output_backend=backend))
        compiled = jax.jit(lambda *a: rules.RULES[rule](*a, segment_ids=segment_ids, impl="pallas")).lower(*inputs)
        compiled = compiled.compile()
        poison_gpu_memory()
        return compiled(*inputs)

    mosaic, triton = forward("mosaic"), forward("triton")
    assert not np.isnan(np.asarray(mosaic[0], np.float32)).any()
    assert relative_error(mosaic[0], expected[0]) < 1e-2 and relative_error(mosaic[0], triton[0]) < 4e-3


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["gated_delta_rule", "kda", "eda"])
def test_pallas_segments_on_gpu_bf16(rule):
    """Packed sequences at full-width heads in bf16 against a float32 recurrent run: segments that begin inside a
    chunk, at a chunk's first token and inside a 16-token block, device memory poisoned; relative error under
    1e-2, no NaN."""
    from edarnn.check_forms import random_inputs

    inputs = random_inputs(rule, 2, 1000, 4, 128, 128)
    starts = np.array([[0, 100, 128, 517, 900], [0, 64, 65, 300, 999]])
    segment_ids = jnp.asarray(np.stack([np.searchsorted(row, np.arange(1000), side="right") for row in starts]))
    expected, expected_state = rules.RULES[rule](*inputs, segment_ids=segment_ids, impl="recurrent")
    low = in_bf16(rule, inputs)
    forward = jax.jit(lambda *a: rules.RULES[rule](*a, segment_ids=segment_ids, impl="pallas")).lower(*low).compile()
    poison_gpu_memory()
    o, state = forward(*low)
    assert not np.isnan(np.asarray(o, np.float32)).any() and not np.isnan(np.asarray(state)).any()
    assert relative_error(o, expected) < 1e-2 and relative_error(state, expected_state) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["gated_delta_rule", "kda", "gdn2", "eda"])
def test_pallas_decode_step_on_gpu(rule):
    """One decoding step for a batch of 64, state donated (updated in place), device memory poisoned with NaN
    before the step: the recurrent step's output and state."""
    from edarnn.check_forms import random_inputs

    token = [x[:, 0] for x in random_inputs(rule, 64, 1, 16, 128, 128)]
    state = jax.random.normal(jax.random.key(0), (64, 16, 128, 128), jnp.float32)
    step = rules.__dict__[f"{rule}_step"]
    with jax.default_matmul_precision("highest"):  # not TF32
        expected = step(state, *token)
    decode = jax.jit(lambda s, *t: step(s, *t, impl="pallas"), donate_argnums=0)
    decode = decode.lower(state, *token).compile()
    poison_gpu_memory()
    actual = decode(state.copy(), *token)
    assert relative_error(actual[0], expected[0]) < 1e-4 and relative_error(actual[1], expected[1]) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["gated_delta_rule", "kda", "gdn2", "eda"])
def test_pallas_prefill_on_gpu(rule):
    """A prefill shorter than a chunk (29 tokens, below eda's 32-token chunks: the token-by-token kernel for every
    rule) from a given state, device memory poisoned: the recurrent form's output and final state."""
    from edarnn.check_forms import random_inputs

    inputs = random_inputs(rule, 8, 29, 16, 128, 128)
    state = jax.random.normal(jax.random.key(0), (8, 16, 128, 128), jnp.float32)
    with jax.default_matmul_precision("highest"):  # not TF32
        expected = rules.RULES[rule](*inputs, initial_state=state, impl="recurrent")
    lowered = jax.jit(lambda s, *a: rules.RULES[rule](*a, initial_state=s, impl="pallas")).lower(state, *inputs)
    assert "_recurrent_kernel" in lowered.as_text()
    prefill = lowered.compile()
    poison_gpu_memory()
    o, final_state = prefill(state, *inputs)
    assert relative_error(o, expected[0]) < 1e-4 and relative_error(final_state, expected[1]) < 1e-4


DECAY_POSITION = {"gated_delta_rule": 3, "kda": 3, "gdn2": 3, "eda": 4}  # where random_inputs puts the log-decay


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["kda", "gdn2", "eda"])
def test_pallas_decay_floor_on_gpu_bf16(rule, backward_kernels):
    """Channel-wise log-decays uniform in [-5, 0] per token and channel (the floor the issue names) at full-width
    heads, q, k, v in bf16, device memory poisoned: output, final state and every gradient finite; the output within
    1e-2 of a float32 recurrent run."""
    from edarnn.check_forms import random_inputs

    inputs = list(random_inputs(rule, 2, 1000, 4, 128, 128))
    position = DECAY_POSITION[rule]
    inputs[position] = -5.0 * jax.random.uniform(jax.random.key(3), inputs[position].shape)
    expected, _ = rules.RULES[rule](*inputs, impl="recurrent")
    low = in_bf16(rule, inputs)

    def loss(args):
        o, final_state = rules.RULES[rule](*args, impl="pallas")
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(final_state), o

    step = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(low).compile()
    poison_gpu_memory()
    (value, o), grads = step(low)
    assert np.isfinite(float(value)) and relative_error(o, expected) < 1e-2
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_GRAD_CASES))
@pytest.mark.parametrize("rule", ["gated_delta_rule", "kda", "gdn2", "eda"])
def test_pallas_grads_on_gpu_bf16(rule, case, backward_kernels, monkeypatch):
    """Gradients of every input and the initial state at full-width heads (K = V of 64, 128, 256), q, k, v (and e)
    in bf16, against a float32 recurrent run, device memory poisoned with NaN before the run: relative error under
    2e-2, finite; also with the state passes' widest V blocks."""
    fields, width = GPU_GRAD_CASES[case]
    monkeypatch.setattr(chunk_fwd, "DEFAULT_CONFIG", chunk_fwd.Config(**fields))
    from edarnn.check_forms import random_inputs

    inputs = random_inputs(rule, 2, 1000, 4, width, width)
    keys = jax.random.split(jax.random.key(1), 3)
    state = jax.random.normal(keys[0], (2, 4, width, width), jnp.float32)
    co = jax.random.normal(keys[1], (2, 1000, 4, width), jnp.float32)
    cs = jax.random.normal(keys[2], (2, 4, width, width), jnp.float32)

    def grads(impl, args, poison=False):
        def loss(args, initial_state):
            o, final_state = rules.RULES[rule](*args, initial_state=initial_state, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * co) + jnp.sum(final_state * cs)

        step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(args, state).compile()
        if poison:
            poison_gpu_memory()
        return step(args, state)

    with jax.default_matmul_precision("highest"):
        expected = grads("recurrent", inputs)
    low = tuple(in_bf16(rule, inputs))
    actual = grads("pallas", low, poison=True)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert relative_error(a, e) < 2e-2
