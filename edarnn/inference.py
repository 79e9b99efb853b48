"""Generation from an edarnn LM: prefill a batch of prompts, decode one token at a time, sample.

    model = inference.prepare(lm)                                    # split once (see Prepared)
    tokens, lengths = inference.pad_prompts([[5, 1, 7], [3, 2]])     # right-aligned, [B, T] and [B]
    logits, cache = inference.prefill(model, tokens, lengths, max_len=64)
    token = inference.sample(logits, jax.random.key(0), temperature=0.8, top_p=0.95)
    logits, cache = inference.decode_step(model, cache, token)       # jitted once, the cache donated
    for token in inference.generate(model, prompts, max_new_tokens=100, top_k=40): ...   # [B] per step

Caches: one per layer, a list of pytrees (edarnn.model.RecurrentCache / AttentionCache, made by LM.prefill and
advanced by LM.decode, the model's own code):
  recurrent mixers  the rule's float32 state [B, H, K, V] and the convolution inputs of the last W - 1 tokens: a
                    fixed size, whatever the prompt or generated length;
  "swa"             a ring buffer of the last `window` keys and values, with each slot's position;
  "attention"       every key and value, up to max_len tokens (prompt and generated): each decoding step
                    attends over all max_len slots (the empty ones masked), so its cost is that of max_len.

Prompts of different lengths are right-aligned: row b holds its lengths[b] tokens at the end, padding before.
The padding is a segment of its own (segment id 0, the prompt 1), and the model's segment handling does the
rest: the recurrent state restarts at the prompt, the convolution does not reach into the padding, attention
does not look at it and RoPE counts positions from the prompt's start. So each row's logits and cache are those
of its prompt alone, and all rows decode in step (one token each per step, each at its own position). A batch of
equal lengths runs without segment ids (the attention mask of segments costs O(T^2) memory; see
edarnn.model.attention).

Prefill runs the chunkwise (or Pallas) form of config.rule_impl over the whole prompt; decoding, the recurrent
form one token at a time (or the Pallas token kernel with rule_impl "pallas").
"""

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edarnn import model as model_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An LM split once for jitted inference (nnx.split takes tens of milliseconds and an nnx.State pytree about
    a millisecond to flatten: too slow per decoded token).

    static: the graph definition and parameter tree structure, a static argument of jit (ModelStructure);
    params: the parameter arrays, a flat list; those of edarnn.model.COMPUTE_DTYPE_PARAMS in the compute dtype
        (the model casts them to it anyway: the same results, less memory and traffic per decoded token);
    vocab_size, windows: the model's vocabulary and its attention layers' windows (None: full attention)."""

    static: "ModelStructure"
    params: list
    vocab_size: int
    windows: tuple[int | None, ...]

    @property
    def full_attention(self) -> bool:
        return None in self.windows


def prepare(lm: model_lib.LM) -> Prepared:
    """`lm` ready for prefill, decode_step and generate (its parameters are shared, not copied)."""
    if not isinstance(lm, model_lib.LM):
        raise ValueError(f"prepare: expected an edarnn.model.LM; got {type(lm).__name__}")
    graphdef, state = nnx.split(lm)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    params = [x.astype(lm.dtype) if _name(path) in model_lib.COMPUTE_DTYPE_PARAMS else x for path, x in leaves]
    windows = tuple(b.mixer.window for b in lm.blocks if isinstance(b.mixer, model_lib.AttentionMixer))
    return Prepared(ModelStructure(graphdef, treedef), params, lm.embed.shape[0], windows)


class ModelStructure:
    """An LM's graph definition and parameter tree structure as one static argument of jit, its hash computed once:
    hashing an nnx GraphDef walks the whole graph (about 5 ms for a 12-layer model), and jit hashes its static
    arguments at every call, which made decoding host-bound."""

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (
            isinstance(other, ModelStructure)
            and self._hash == other._hash
            and (self.graphdef, self.treedef) == (other.graphdef, other.treedef)
        )


def _name(path) -> str:
    """A parameter's own name (e.g. "kernel") from its path in the model state."""
    return [key.key for key in path if isinstance(key, jax.tree_util.DictKey)][-1]


def _merge(static: ModelStructure, params: list) -> model_lib.LM:
    return nnx.merge(static.graphdef, jax.tree.unflatten(static.treedef, params))


@functools.partial(jax.jit, static_argnames=("static", "max_len"))
def _prefill(static, params, tokens, segment_ids, max_len):
    return _merge(static, params).prefill(tokens, segment_ids, max_len)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("cache",))
def _decode(static, params, cache, tokens):
    return _merge(static, params).decode(tokens, cache)


# ----------------------------------------------------------------------------------------------------------
# prompts, prefill, decoding
# ----------------------------------------------------------------------------------------------------------


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (sequences of token ids, of any lengths >= 1) -> (tokens [B, T] int32, right-aligned with pad_id
    before the shorter ones, lengths [B] int32), T the longest prompt's length."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token sequences; got {type(prompts).__name__}")
    rows = []
    for i, prompt in enumerate(prompts):
        row = np.asarray(prompt)
        if row.shape == (0,):
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token (e.g. BOS)")
        if row.ndim != 1 or not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"prompts[{i}] must be a 1-D sequence of int token ids; got {row.dtype}{list(row.shape)}")
        rows.append(row)
    lengths = np.array([len(r) for r in rows], np.int32)
    tokens = np.full((len(rows), lengths.max()), pad_id, np.int32)
    for row, r in zip(tokens, rows, strict=True):
        row[len(row) - len(r) :] = r
    return tokens, lengths


def _check_tokens(name: str, tokens, ndim: int, layout: str) -> None:
    if jnp.ndim(tokens) != ndim or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(
            f"{name} must be an int array {layout}; got {jnp.result_type(tokens)}{list(jnp.shape(tokens))}"
        )


def prefill(model: Prepared, tokens, lengths=None, *, max_len: int | None = None) -> tuple[Array, list]:
    """Run the prompts and return what decoding needs.

    tokens: [B, T] int token ids in [0, vocab_size), right-aligned (row b's prompt is its last lengths[b]
        tokens; pad_prompts makes them);
    lengths: [B] ints in [1, T], or None: every row is T tokens;
    max_len: the most tokens (prompt and generated) a sequence will have; the full-attention caches hold that
        many, so it is required for models with full attention. Without: no limit ("swa" caches hold `window`).
    Returns (logits of each prompt's last token [B, vocab_size] float32, the caches: a list, one per layer)."""
    _check_tokens("tokens", tokens, 2, "[B, T]")
    batch, length = jnp.shape(tokens)
    if batch == 0 or length == 0:
        raise ValueError(
            f"tokens [B, T] must hold at least one prompt of at least one token; got shape {(batch, length)}"
        )
    ids = np.asarray(tokens)
    if ids.min() < 0 or ids.max() >= model.vocab_size:
        raise ValueError(f"tokens must be ids in [0, {model.vocab_size}); got values in [{ids.min()}, {ids.max()}]")
    segment_ids = None
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(
                f"lengths must be {batch} ints (one per row of tokens); got {lengths.dtype}{list(lengths.shape)}"
            )
        if lengths.min() < 1 or lengths.max() > length:
            raise ValueError(f"lengths must lie in [1, T = {length}] (no empty prompt); got {lengths.tolist()}")
        if (lengths < length).any():
            segment_ids = (np.arange(length) >= length - lengths[:, None]).astype(np.int32)
    if max_len is None:
        if model.full_attention:
            raise ValueError(
                "max_len (prompt and generated tokens) is required: the model has full attention layers, whose "
                "cache holds max_len tokens"
            )
        max_len = max(length, *(w for w in model.windows if w is not None), 1)
    elif type(max_len) is not int or max_len < length:
        raise ValueError(f"max_len must be an int >= the prompt length T = {length}; got {max_len!r}")
    return _prefill(model.static, model.params, jnp.asarray(tokens, jnp.int32), segment_ids, max_len)


def decode_step(model: Prepared, cache: list, tokens) -> tuple[Array, list]:
    """One token per sequence: tokens [B] int, cache from prefill or the last decode_step -> (logits
    [B, vocab_size] float32, the cache with the token). Jitted once per model and shapes; `cache` is donated
    (updated in place: do not use it afterwards). Full-attention layers give NaN past max_len tokens."""
    _check_tokens("tokens", tokens, 1, "[B]")
    return _decode(model.static, model.params, cache, jnp.asarray(tokens, jnp.int32))


def cache_bytes(cache) -> int:
    """Bytes held by a cache (of one layer, or the list of all)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache))


# ----------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError unless temperature >= 0, top_k None or an int >= 1, top_p None or in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy); got {temperature!r}")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1]; got {top_p!r}")


def sample(
    logits: Array, key: Array, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Array:
    """Next tokens [B] int32 from logits [B, vocab] (a pure function of its arguments: the same key gives the
    same tokens).

    temperature 0: greedy (argmax; top_k, top_p unused). Otherwise a draw from softmax(logits / temperature)
    restricted to the top_k most likely tokens (ties with the k-th kept too) and then to the smallest set of most
    likely tokens whose probability (after top_k, renormalised) reaches top_p (the most likely always kept).
    temperature, top_k and top_p are static under jit."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        ranked = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        smallest_kept = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


_sample = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))


def generate(
    model: Prepared,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
) -> Iterator[np.ndarray]:
    """Continue each prompt (a sequence of token ids; lengths may differ), yielding the next token of every
    prompt, a [B] int32 numpy array, per step: at most max_new_tokens steps, fewer when every row has produced
    eos_id (a row that has repeats eos_id from then on). Sampling as `sample`, step i with the key
    fold_in(key(seed), i)."""
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    tokens, lengths = pad_prompts(prompts)
    logits, cache = prefill(model, tokens, lengths, max_len=tokens.shape[1] + max_new_tokens)
    key = jax.random.key(seed)
    done = np.zeros(len(lengths), bool)
    for step in range(max_new_tokens):
        token = np.asarray(
            _sample(logits, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k, top_p=top_p)
        )
        if eos_id is not None:
            token = np.where(done, eos_id, token).astype(np.int32)
            done |= token == eos_id
        yield token
        if done.all() or step == max_new_tokens - 1:
            return
        logits, cache = decode_step(model, cache, token)
