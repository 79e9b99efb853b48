"""Inference: prefill + decode steps reproduce the forward pass for every mixer kind and for batched prompts of
different lengths; cache sizes; sampling; generation; errors."""

import dataclasses
import io

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit, relative_error
from flax import nnx
from test_model import VOCAB, tiny_config

from edarnn import checkpoint, data, generate, inference
from edarnn import config as config_lib
from edarnn import model as M

RTOL = 1e-5  # float32 throughout; the chunk and recurrent forms differ by rounding only


@pytest.fixture(scope="module", autouse=True)
def _release_executables():
    """Drop this module's compiled prefill, decode and sample functions at its end. Every executable XLA:CPU
    compiles holds memory mappings; the suite's total comes near the kernel's limit (vm.max_map_count, 65530 by
    default), beyond which a compile segfaults, and this module's models would add about 7000."""
    yield
    for jitted in (inference._prefill, inference._decode, inference._sample):
        jitted.clear_cache()


def prepared_model(**overrides) -> tuple[M.LM, inference.Prepared]:
    lm = M.LM(tiny_config(**overrides), rngs=nnx.Rngs(0))
    return lm, inference.prepare(lm)


def forward(lm: M.LM, tokens: np.ndarray) -> np.ndarray:
    """The training forward pass's logits [B, T, vocab] (no segment ids)."""
    graphdef, state = nnx.split(lm)
    return np.asarray(jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens, jnp.int32)))


def check_against_forward(lm, model, prompt_lengths, steps, rng, *, equal_lengths_as_none=False):
    """Row b is a random sequence; its first prompt_lengths[b] tokens are prefilled, then `steps` tokens decoded
    one at a time (the sequence's own, teacher-forced). Every step's logits must equal the forward pass's at that
    position."""
    prompt_lengths = np.asarray(prompt_lengths)
    rows = np.arange(len(prompt_lengths))
    sequences = rng.integers(0, VOCAB, (len(prompt_lengths), prompt_lengths.max() + steps))
    expected = forward(lm, sequences)
    tokens, lengths = inference.pad_prompts([s[:n] for s, n in zip(sequences, prompt_lengths, strict=True)])
    logits, cache = inference.prefill(
        model, tokens, None if equal_lengths_as_none else lengths, max_len=tokens.shape[1] + steps
    )
    for step in range(steps + 1):
        position = prompt_lengths - 1 + step
        err = relative_error(logits, expected[rows, position])
        assert err <= RTOL, f"step {step} (positions {position.tolist()}): relative error {err:.2g}"
        if step < steps:
            logits, cache = inference.decode_step(model, cache, sequences[rows, position + 1])


# window 4, chunks of 8: prompts of 1 token, within a window, beyond a window and across chunks; the shortest row
# covers positions 0..steps, the others the later ones.
PROMPT_LENGTHS = [1, 6, 9]


@pytest.mark.parametrize(
    "kind, overrides",
    [(kind, {}) for kind in M.MIXER_KINDS]
    + [
        ("gated_delta_rule", {"conv_size": 0}),
        ("eda", {"conv_size": 1, "tie_embeddings": True}),
        ("eda_channel", {"rule_impl": "pallas"}),  # the GPU kernels in interpret mode: chunk prefill, token decode
    ],
)
def test_prefill_and_decode_equal_the_forward_pass(kind, overrides, rng):
    lm, model = prepared_model(layers=[kind], **overrides)
    check_against_forward(lm, model, PROMPT_LENGTHS, steps=5, rng=rng)


def test_hybrid_prefill_and_decode_equal_the_forward_pass(rng):
    lm, model = prepared_model(n_layers=4, layers=["eda_channel", "swa", "gdn2", "attention"])
    check_against_forward(lm, model, PROMPT_LENGTHS, steps=6, rng=rng)
    check_against_forward(lm, model, [7, 7], steps=3, rng=rng, equal_lengths_as_none=True)  # no segment ids


def test_cache_sizes_and_one_compilation(rng):
    """Recurrent and sliding-window caches do not depend on the prompt length, max_len or the tokens decoded so
    far; a full-attention cache holds max_len tokens; decoding keeps the cache's types (so decode_step compiles
    once) and consumes the donated cache."""
    _, model = prepared_model(n_layers=3, layers=["eda", "swa", "attention"])
    short, long = (rng.integers(0, VOCAB, (2, length)) for length in (3, 17))
    _, short_cache = inference.prefill(model, short, max_len=20)
    _, long_cache = inference.prefill(model, long, max_len=500)
    types = lambda cache: jax.tree.map(jax.typeof, cache)  # noqa: E731
    assert types(short_cache[:2]) == types(long_cache[:2])
    assert short_cache[1].keys.shape[1] == 4  # the window
    assert long_cache[2].keys.shape[1] == 500
    assert inference.cache_bytes(long_cache[2]) > inference.cache_bytes(short_cache[2])

    recurrent_bytes = inference.cache_bytes(long_cache[0])
    expected = 2 * 2 * 8 * 6 * 4 + 4 * 2 * (3 - 1) * 2 * (8 + 8 + 6 + 8)  # state, then conv tails of q, k, v, e
    assert recurrent_bytes == expected
    cache_types = types(long_cache)
    for _ in range(3):
        old = long_cache
        _, long_cache = inference.decode_step(model, long_cache, rng.integers(0, VOCAB, 2))
        assert types(long_cache) == cache_types
        assert all(x.is_deleted() for x in jax.tree.leaves(old))
    assert inference.cache_bytes(long_cache[0]) == recurrent_bytes


def test_full_attention_past_max_len_gives_nan(rng):
    _, model = prepared_model(layers=["attention"])
    logits, cache = inference.prefill(model, rng.integers(0, VOCAB, (1, 3)), max_len=4)
    logits, cache = inference.decode_step(model, cache, np.array([1]))  # the 4th token: fits
    assert np.all(np.isfinite(logits))
    logits, _ = inference.decode_step(model, cache, np.array([1]))  # the 5th: beyond the cache
    assert np.all(np.isnan(logits))


# ----------------------------------------------------------------------------------------------------------
# sampling and generation
# ----------------------------------------------------------------------------------------------------------

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
DRAWS = 20_000  # frequency errors about sqrt(p (1 - p) / DRAWS) <= 0.0035; tolerances at 4 of those


def frequencies(key=0, **options) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (DRAWS, len(PROBS)))
    tokens = np.asarray(inference.sample(logits, jax.random.key(key), **options))
    return np.bincount(tokens, minlength=len(PROBS)) / DRAWS


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, PROBS),
        ({"temperature": 2.0}, np.sqrt(PROBS) / np.sqrt(PROBS).sum()),
        ({"top_k": 2}, [0.625, 0.375, 0, 0]),
        ({"top_p": 0.7}, [0.625, 0.375, 0, 0]),  # 0.5 < 0.7 <= 0.8
        ({"top_p": 0.85}, np.r_[PROBS[:3] / 0.95, 0]),
        ({"top_p": 0.4}, [1, 0, 0, 0]),  # the most likely is always kept
        ({"top_k": 3, "top_p": 0.84}, [0.625, 0.375, 0, 0]),  # the renormalised top 3: 0.526 + 0.316 > 0.84
        ({"temperature": 5.0, "top_k": 1}, [1, 0, 0, 0]),
        ({"temperature": 0.0}, [1, 0, 0, 0]),
    ],
)
def test_sampling_frequencies(options, expected):
    np.testing.assert_allclose(frequencies(**options), expected, atol=0.014)


def test_sampling_is_seeded_and_greedy_is_argmax(rng):
    logits = jnp.asarray(rng.standard_normal((64, 11)), jnp.float32)
    same = [np.asarray(inference.sample(logits, jax.random.key(3), top_p=0.9)) for _ in range(2)]
    other = np.asarray(inference.sample(logits, jax.random.key(4), top_p=0.9))
    np.testing.assert_array_equal(same[0], same[1])
    assert np.any(same[0] != other)
    np.testing.assert_array_equal(inference.sample(logits, jax.random.key(0), temperature=0), np.argmax(logits, -1))


def test_greedy_generation_follows_the_forward_pass_and_stops_at_eos(rng):
    lm, model = prepared_model(n_layers=2, layers=["eda", "swa"])
    prompts = [list(rng.integers(0, VOCAB, 5)), list(rng.integers(0, VOCAB, 2))]
    generated = np.stack(list(inference.generate(model, prompts, 6, temperature=0)), axis=1)
    assert generated.shape == (2, 6)
    for prompt, continuation in zip(prompts, generated, strict=True):
        sequence = np.asarray(prompt + list(continuation[:-1]))[None]
        np.testing.assert_array_equal(np.argmax(forward(lm, sequence)[0, len(prompt) - 1 :], -1), continuation)

    eos = int(generated[0, 1])  # row 0 stops at step 1; the run ends when row 1 stops too, or after 6 steps
    stopped = np.stack(list(inference.generate(model, prompts, 6, temperature=0, eos_id=eos)), axis=1)
    ends = [int(np.argmax(row == eos)) if eos in row else None for row in generated]
    assert stopped.shape[1] == (6 if ends[1] is None else max(ends) + 1)
    assert np.all(stopped[0, ends[0] :] == eos) and np.all(stopped[:, : ends[0]] == generated[:, : ends[0]])


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, match",
    [([], "non-empty list"), ([[1, 2], []], r"prompts\[1\] is empty"), ([[1.5]], "int token ids"), ("ab", "list")],
)
def test_bad_prompts(prompts, match):
    with pytest.raises(ValueError, match=match):
        inference.pad_prompts(prompts)


def test_bad_prefill_and_decode_arguments():
    _, model = prepared_model(n_layers=2, layers=["swa", "attention"])
    tokens = np.ones((2, 5), np.int32)
    cases = [
        (dict(tokens=tokens.astype(np.float32), max_len=8), "tokens must be an int array"),
        (dict(tokens=tokens[0], max_len=8), r"tokens must be an int array \[B, T\]"),
        (dict(tokens=tokens[:, :0], max_len=8), "at least one token"),
        (dict(tokens=tokens + VOCAB, max_len=8), f"ids in \\[0, {VOCAB}\\)"),
        (dict(tokens=tokens, lengths=[5, 0], max_len=8), r"lengths must lie in \[1, T = 5\]"),
        (dict(tokens=tokens, lengths=[5], max_len=8), "lengths must be 2 ints"),
        (dict(tokens=tokens), "max_len .* is required"),
        (dict(tokens=tokens, max_len=4), "max_len must be an int >= the prompt length T = 5"),
    ]
    for arguments, match in cases:
        with pytest.raises(ValueError, match=match):
            inference.prefill(model, **arguments)
    _, cache = inference.prefill(model, tokens, max_len=8)
    with pytest.raises(ValueError, match=r"tokens must be an int array \[B\]"):
        inference.decode_step(model, cache, tokens[:, :1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(inference.generate(model, [[1]], 0))
    with pytest.raises(ValueError, match="edarnn.model.LM"):
        inference.prepare(model)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_options(options, match):
    with pytest.raises(ValueError, match=match):
        inference.sample(jnp.zeros((1, 3)), jax.random.key(0), **options)


def test_prepared_weights_in_the_compute_dtype_give_the_same_logits(rng):
    """prepare stores COMPUTE_DTYPE_PARAMS in the compute dtype: bit for bit the logits of the float32 weights."""
    lm, model = prepared_model(n_layers=2, layers=["eda_channel", "swa"], dtype="bfloat16")
    assert {x.dtype.name for x in model.params} == {"bfloat16", "float32"}
    float32 = dataclasses.replace(model, params=jax.tree.leaves(nnx.state(lm)))
    tokens = rng.integers(0, VOCAB, (2, 9))
    (stored, stored_cache), (cast, cast_cache) = (inference.prefill(m, tokens) for m in (model, float32))
    np.testing.assert_array_equal(stored, cast)
    stored, _ = inference.decode_step(model, stored_cache, tokens[:, 0])
    cast, _ = inference.decode_step(float32, cast_cache, tokens[:, 0])
    np.testing.assert_array_equal(stored, cast)


# ----------------------------------------------------------------------------------------------------------
# the command line: a checkpoint as edarnn.train writes it
# ----------------------------------------------------------------------------------------------------------


def save_run(workdir, step: int, source: str = "bytes") -> M.LM:
    """A work dir with checkpoint `step` of a random tiny model on `source` data (an "optimizer state" beside it,
    as edarnn.train saves); returns the model."""
    config = config_lib.defaults()
    config.model.update(
        vocab_size=data.BYTES.eos + 1, d_model=16, n_layers=2, layers=("eda", "swa"), n_heads=2, d_ff=24, window=4
    )
    config.data.source = source
    config.train.async_checkpoints = False
    lm = M.LM(config.model, rngs=nnx.Rngs(step))
    params = nnx.state(lm, nnx.Param)
    manager = checkpoint.make_manager(str(workdir / "checkpoints"), config.train)
    iterator = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
    state = {"params": params, "opt_state": jax.tree.map(jnp.zeros_like, params)}
    checkpoint.save(manager, step, state, iterator, config)
    manager.close()
    return lm


def test_command_line_continues_a_prompt_from_a_checkpoint(tmp_path):
    save_run(tmp_path, 3)
    lm = save_run(tmp_path, 7)  # the newest, loaded by default
    loaded, _, step = generate.load(str(tmp_path))
    assert step == 7
    for saved, restored in zip(jax.tree.leaves(nnx.state(lm)), jax.tree.leaves(nnx.state(loaded)), strict=True):
        np.testing.assert_array_equal(saved, restored)

    prompt = "héllo"
    expected = list(inference.generate(inference.prepare(lm), [generate.encode(prompt)], 12, temperature=0))
    expected = bytes(int(t[0]) for t in expected if t[0] < 256).decode("utf-8", errors="replace")
    out = io.StringIO()
    generate.main(["--workdir", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0"], out)
    assert out.getvalue().splitlines()[1:] == (prompt + expected).splitlines()

    out = io.StringIO()  # a batch of two prompts, sampled: each printed after its prompt
    batch = ["--prompt", "a", "--prompt", "bcd", "--step", "3", "--top-k", "5", "--max-new-tokens", "4"]
    generate.main(["--workdir", str(tmp_path), *batch], out)
    assert "--- 'a'\na" in out.getvalue() and "--- 'bcd'\nbcd" in out.getvalue()


def test_command_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints/"):
        generate.load(str(tmp_path))
    save_run(tmp_path, 2, source="synthetic")
    with pytest.raises(ValueError, match=r"--step 5: .* holds the steps \[2\]"):
        generate.load(str(tmp_path), 5)
    with pytest.raises(ValueError, match="byte-level models"):
        generate.main(["--workdir", str(tmp_path), "--prompt", "x"])
