"""Synthetic tasks: functions that draw one row of tokens from a numpy Generator (edarnn.data makes each a grain
source, with its splits, order and sharding). Token layouts, defaults and what each task measures: docs/tasks.md.

    tokens, answers = task.sample(rng, config.data.<task.name>, seq_len)   # [seq_len + 1] int, [seq_len] bool

Input position t predicts tokens[t + 1]; answers[t] marks the scored ones. A query whose answer is several tokens
is scored at consecutive positions (the last token of its prompt, then all but the last answer token).

- "mqar": multi-query associative recall (Zoology, Arora et al. 2023). Tokens: keys [0, K), values [K, K + V),
  filler [K + V, K + V + N) for K, V, N = key_vocab_size, value_vocab_size, noise_vocab_size. A row of T + 1
  tokens opens with num_pairs key-value pairs (keys distinct), then holds num_queries (0: num_pairs) queries
  "key value" of distinct earlier keys, at random pair-aligned places in filler tokens; the loss is on the input
  positions of the queried keys, whose targets are their values.
- needle in a haystack in the style of RULER (Hsieh et al. 2024): "s_niah_1" (one needle in a repeated noise
  sentence), "s_niah_2" (one needle in essay-like filler), "s_niah_3" (as 2, with UUID-like multi-token keys and
  values), "mk_niah" (several needles in essay-like filler, one asked for): needles "NEEDLE key IS value" at
  sentence boundaries, the asked one at a depth drawn from [min_depth, max_depth], then "QUERY key IS" whose
  targets are the value.
- memory editing under interference, where stale content must be removed: "edit_rebind" (keys re-bound to new
  values; a query asks for the latest), "edit_records" (records of several fields, updated a few fields at a time;
  a query asks for a field's latest value), "edit_retract" (bindings deleted by "RETRACT key"; a query of a
  deleted key answers NONE). Each row is the writes, query_gap filler tokens, then queries "QUERY key answer".

A new task is a `Task` appended to TASKS; its check names the field of config.data.<name> that is out of range.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

# ----------------------------------------------------------------------------------------------------------
# tasks and config checks
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic task: `sample(rng, config, seq_len)` draws one row, (tokens [seq_len + 1] int, answers [seq_len]
    bool: which input positions t are scored, i.e. predict tokens[t + 1]); `check(config, seq_len)` raises a
    ValueError naming the field of config.data.<name> that is out of range; ids lie in [0, vocab_size(config))."""

    name: str
    defaults: Mapping[str, Any]
    vocab_size: Callable[[ml_collections.ConfigDict], int]
    check: Callable[[ml_collections.ConfigDict, int], None]
    sample: Callable[[np.random.Generator, ml_collections.ConfigDict, int], tuple[np.ndarray, np.ndarray]]


def check_int(name: str, value, low: int, high: int | None = None):
    """ValueError naming `name` unless `value` is an int in [low, high]."""
    if not isinstance(value, int | np.integer) or value < low or (high is not None and value > high):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r}: expected an integer {expected}")


def check_fraction(name: str, value, low: float = 0.0):
    """ValueError naming `name` unless `value` is a number in [low, 1]."""
    if not isinstance(value, int | float | np.number) or not low <= value <= 1.0:
        raise ValueError(f"{name}={value!r}: expected a number in [{low}, 1]")


def _check_fits(where: str, length: int, seq_len: int, fields: str):
    if length > seq_len + 1:
        raise ValueError(
            f"{where}: a row needs {length} tokens, more than seq_len + 1 = {seq_len + 1}; raise seq_len to "
            f"{length - 1} or lower {fields}"
        )


# ----------------------------------------------------------------------------------------------------------
# multi-query associative recall
# ----------------------------------------------------------------------------------------------------------


def _mqar_vocab_size(config) -> int:
    return config.key_vocab_size + config.value_vocab_size + config.noise_vocab_size


def _mqar_check(config, seq_len: int):
    where = "data.mqar"
    check_int(f"{where}.num_pairs", config.num_pairs, 1)
    check_int(f"{where}.num_queries", config.num_queries, 0, config.num_pairs)
    check_int(f"{where}.key_vocab_size", config.key_vocab_size, config.num_pairs)
    check_int(f"{where}.value_vocab_size", config.value_vocab_size, 1)
    check_int(f"{where}.noise_vocab_size", config.noise_vocab_size, 1)
    pairs, queries = config.num_pairs, config.num_queries or config.num_pairs
    if 2 * (pairs + queries) > seq_len + 1:
        raise ValueError(
            f"{where}.num_pairs={pairs} with {queries} queries needs seq_len >= {2 * (pairs + queries) - 1} "
            f"(2 tokens per pair and per query); got seq_len={seq_len}"
        )


def _mqar_sample(rng: np.random.Generator, config, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    pairs, queries = config.num_pairs, config.num_queries or config.num_pairs
    keys = rng.choice(config.key_vocab_size, pairs, replace=False)
    values = config.key_vocab_size + rng.integers(0, config.value_vocab_size, pairs)
    noise = config.key_vocab_size + config.value_vocab_size  # the first filler id
    tokens = noise + rng.integers(0, config.noise_vocab_size, seq_len + 1)
    tokens[0 : 2 * pairs : 2], tokens[1 : 2 * pairs : 2] = keys, values
    slots = np.sort(rng.choice((seq_len + 1 - 2 * pairs) // 2, queries, replace=False))
    at, asked = 2 * pairs + 2 * slots, rng.choice(pairs, queries, replace=False)
    tokens[at], tokens[at + 1] = keys[asked], values[asked]
    answers = np.zeros(seq_len, bool)
    answers[at] = True
    return tokens, answers


MQAR = Task(
    name="mqar",
    defaults={
        "num_pairs": 8,
        "num_queries": 0,  # 0: every key is asked once
        "key_vocab_size": 64,
        "value_vocab_size": 64,
        "noise_vocab_size": 16,
    },
    vocab_size=_mqar_vocab_size,
    check=_mqar_check,
    sample=_mqar_sample,
)


# ----------------------------------------------------------------------------------------------------------
# needle in a haystack
# ----------------------------------------------------------------------------------------------------------

NIAH_PAD, NIAH_NEEDLE, NIAH_IS, NIAH_QUERY = 0, 1, 2, 3
"""The special ids of the needle tasks; keys, values and the haystack's words follow (see _niah_ranges)."""

# The essay-like haystack: one token per word, sentences from ESSAY_TEMPLATES with a uniform word of each class.
ESSAY_WORDS = {
    word_class: tuple(words.split())
    for word_class, words in {
        "det": "the a every one this that some no",
        "adj": "old quiet bright small distant green heavy early narrow silent warm broken gentle hidden golden "
        "patient curious tired careful simple",
        "noun": "river city teacher garden letter mountain window farmer story bridge engine market child forest "
        "painter harbor lamp road village winter student kitchen song island doctor clock field ship friend book",
        "verb": "watched found carried painted followed opened remembered built crossed answered visited described "
        "repaired noticed borrowed wrote sold heard kept moved",
        "intransitive": "slept waited arrived laughed wandered rested vanished returned listened smiled",
        "adv": "slowly quietly again later often carefully suddenly together yesterday soon",
        "prep": "near beside under behind across through above beyond along inside",
        "conj": "and but while because so",
        ",": ",",
        ".": ".",
    }.items()
}
ESSAY_TEMPLATES = (
    "det noun intransitive .",
    "det adj noun intransitive adv .",
    "det noun verb det noun .",
    "det adj noun verb det adj noun .",
    "det noun verb det noun prep det noun .",
    "det noun intransitive , conj det noun verb det noun .",
    "prep det noun , det adj noun intransitive .",
    "det noun prep det noun verb det noun adv .",
    "adv , det noun verb det adj noun .",
)
ESSAY_VOCAB = tuple(word for words in ESSAY_WORDS.values() for word in words)
"""The essay haystack's words in id order: word i has id 4 + key_vocab_size + value_vocab_size + i."""

_CLASS_SIZES = np.array([len(words) for words in ESSAY_WORDS.values()])
_CLASS_FIRST = np.cumsum(_CLASS_SIZES) - _CLASS_SIZES
_TEMPLATE_CLASSES = [np.array([list(ESSAY_WORDS).index(c) for c in t.split()]) for t in ESSAY_TEMPLATES]
_TEMPLATE_LENGTHS = np.array([len(t) for t in _TEMPLATE_CLASSES])


def _num_needles(config) -> int:
    return config.get("num_needles", 1)  # the single-needle tasks have no field


def _haystack_vocab_size(haystack: str, config) -> int:
    return config.noise_sentence_len if haystack == "noise" else len(ESSAY_VOCAB)


def _niah_ranges(haystack: str, config) -> tuple[int, int, int, int]:
    """The first ids of keys, values and haystack words, and the vocabulary size."""
    keys = NIAH_QUERY + 1
    values = keys + config.key_vocab_size
    words = values + config.value_vocab_size
    return keys, values, words, words + _haystack_vocab_size(haystack, config)


def _niah_example_len(config) -> int:
    """Tokens of a row's needles, query and answer (the rest of the example is haystack)."""
    key_len, value_len = config.key_len, config.value_len
    return _num_needles(config) * (2 + key_len + value_len) + 2 + key_len + value_len


def _niah_check(name: str, haystack: str, config, seq_len: int):
    where = f"data.{name}"
    for field in ("key_vocab_size", "key_len", "value_vocab_size", "value_len"):
        check_int(f"{where}.{field}", config[field], 1)
    if "num_needles" in config:
        check_int(f"{where}.num_needles", config.num_needles, 1)
        if config.key_vocab_size**config.key_len < config.num_needles:
            raise ValueError(
                f"{where}.key_vocab_size={config.key_vocab_size} with key_len={config.key_len} has fewer than "
                f"num_needles={config.num_needles} distinct keys"
            )
    if haystack == "noise":
        check_int(f"{where}.noise_sentence_len", config.noise_sentence_len, 1)
    check_fraction(f"{where}.min_depth", config.min_depth)
    check_fraction(f"{where}.max_depth", config.max_depth, low=config.min_depth)
    least = _niah_example_len(config)
    check_int(f"{where}.context_len", config.context_len, 0, seq_len + 1)
    if (config.context_len or seq_len + 1) < least:
        raise ValueError(
            f"{where}.context_len={config.context_len}: the needles, query and answer take {least} tokens, more "
            f"than the context (0: the row, seq_len + 1 = {seq_len + 1}); raise it or lower key_len, value_len"
            + (", num_needles" if "num_needles" in config else "")
        )


def _sentences(haystack: str, rng: np.random.Generator, config, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`length` haystack words (offsets from the first word id) that end with a whole sentence, and the sentence
    boundaries in them: [0, ..., length], sorted. Noise: the ids 0 .. noise_sentence_len - 1 in order, repeated;
    essay: sentences of ESSAY_TEMPLATES, each word uniform in its class."""
    if haystack == "noise":
        count, sentence = -(-length // config.noise_sentence_len), np.arange(config.noise_sentence_len)
        words, lengths = np.tile(sentence, count), np.full(count, len(sentence))
    else:
        templates = rng.integers(0, len(_TEMPLATE_CLASSES), length // _TEMPLATE_LENGTHS.min() + 1)
        classes = np.concatenate([_TEMPLATE_CLASSES[t] for t in templates])
        words = _CLASS_FIRST[classes] + rng.integers(0, _CLASS_SIZES[classes])
        lengths = _TEMPLATE_LENGTHS[templates]
    cut = len(words) - length  # drop the start, so that the haystack ends with a whole sentence
    ends = np.cumsum(lengths) - cut
    return words[cut:], np.concatenate([[0], ends[ends > 0]])


def _distinct_keys(rng: np.random.Generator, count: int, length: int, vocab_size: int) -> np.ndarray:
    """[count, length] keys of `length` ids in [0, vocab_size), no two equal."""
    keys, seen = [], set()
    while len(keys) < count:
        key = rng.integers(0, vocab_size, length)
        if tuple(key) not in seen:
            keys.append(key)
            seen.add(tuple(key))
    return np.stack(keys)


def _niah_sample(haystack: str, rng: np.random.Generator, config, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    key_start, value_start, word_start, _ = _niah_ranges(haystack, config)
    needles, value_len = _num_needles(config), config.value_len
    context = config.context_len or seq_len + 1
    keys = key_start + _distinct_keys(rng, needles, config.key_len, config.key_vocab_size)
    values = value_start + rng.integers(0, config.value_vocab_size, (needles, value_len))
    words, boundaries = _sentences(haystack, rng, config, context - _niah_example_len(config))
    words = word_start + words
    asked = rng.integers(0, needles)
    at = rng.choice(boundaries, needles)  # the distractors at random boundaries, the asked one at its depth
    depth = rng.uniform(config.min_depth, config.max_depth) * len(words)
    at[asked] = boundaries[np.argmin(np.abs(boundaries - depth))]
    pieces, previous = [], 0
    for i in np.lexsort((rng.permutation(needles), at)):  # by boundary, needles at one boundary in random order
        pieces += [words[previous : at[i]], [NIAH_NEEDLE], keys[i], [NIAH_IS], values[i]]
        previous = at[i]
    pieces += [words[previous:], [NIAH_QUERY], keys[asked], [NIAH_IS], values[asked]]
    tokens = np.full(seq_len + 1, NIAH_PAD)
    tokens[:context] = np.concatenate(pieces)
    answers = np.zeros(seq_len, bool)
    answers[context - value_len - 1 : context - 1] = True  # the query's IS, then the value but its last token
    return tokens, answers


_NIAH_DEFAULTS = {
    "context_len": 0,  # tokens of haystack, needles, query and answer; 0: the row (seq_len + 1); PAD after
    "min_depth": 0.0,  # the asked needle's depth (haystack tokens before it / all) is uniform in [min, max]
    "max_depth": 1.0,
    "key_vocab_size": 64,
    "key_len": 1,  # tokens per key
    "value_vocab_size": 64,
    "value_len": 1,  # tokens per value
}


def _niah(name: str, haystack: str, **defaults) -> Task:
    return Task(
        name=name,
        defaults={**_NIAH_DEFAULTS, **defaults},
        vocab_size=lambda config: _niah_ranges(haystack, config)[3],
        check=functools.partial(_niah_check, name, haystack),
        sample=functools.partial(_niah_sample, haystack),
    )


S_NIAH_1 = _niah("s_niah_1", "noise", noise_sentence_len=10)
S_NIAH_2 = _niah("s_niah_2", "essay")
S_NIAH_3 = _niah("s_niah_3", "essay", key_vocab_size=16, key_len=8, value_vocab_size=16, value_len=8)
MK_NIAH = _niah("mk_niah", "essay", num_needles=4)


# ----------------------------------------------------------------------------------------------------------
# memory editing
# ----------------------------------------------------------------------------------------------------------

EDIT_QUERY = 0
"""The query marker of the editing tasks (id 0 of each); their other ids follow (see docs/tasks.md)."""
RETRACT_MARK, RETRACT_NONE = 1, 2
"""edit_retract's retraction marker and the answer for a deleted key."""


def _check_edit(where: str, config, seq_len: int, items: int, writes: int, query_len: int, fields: str):
    """The fields every editing task has (num_queries of at most `items` items, query_gap, noise_vocab_size), and
    that a row of `writes` tokens, query_gap filler and the queries (`query_len` tokens each, marker included)
    fits; `fields`: those that set the row's length."""
    check_int(f"{where}.num_queries", config.num_queries, 0, items)
    check_int(f"{where}.query_gap", config.query_gap, 0)
    check_int(f"{where}.noise_vocab_size", config.noise_vocab_size, 1)
    length = writes + config.query_gap + query_len * (config.num_queries or items)
    _check_fits(where, length, seq_len, fields)


def _new_value(rng: np.random.Generator, vocab_size: int, old: int) -> int:
    """A value in [0, vocab_size) other than `old` (-1: any), uniformly."""
    value = rng.integers(0, vocab_size - (old >= 0))
    return value + (0 <= old <= value)


def _edit_row(rng: np.random.Generator, config, seq_len: int, writes: list, queries: list, noise: int):
    """(tokens, answers) of a row: the writes (token lists), query_gap filler tokens, each query as
    [EDIT_QUERY, *prompt, answer] (queries: lists prompt + [answer]), then filler to the end; the filler is
    uniform in [noise, noise + noise_vocab_size). Scored: the last prompt token of each query."""
    tokens = noise + rng.integers(0, config.noise_vocab_size, seq_len + 1)
    written = np.concatenate(writes)
    tokens[: len(written)] = written
    answers = np.zeros(seq_len, bool)
    at = len(written) + config.query_gap
    for query in queries:
        tokens[at : at + len(query) + 1] = [EDIT_QUERY, *query]
        at += len(query) + 1
        answers[at - 2] = True
    return tokens, answers


def _rebind_check(config, seq_len: int):
    where = "data.edit_rebind"
    check_int(f"{where}.num_keys", config.num_keys, 1)
    check_int(f"{where}.num_rebinds", config.num_rebinds, 0)
    check_int(f"{where}.key_vocab_size", config.key_vocab_size, config.num_keys)
    check_int(f"{where}.value_vocab_size", config.value_vocab_size, 2)
    writes = 2 * config.num_keys * (1 + config.num_rebinds)
    _check_edit(where, config, seq_len, config.num_keys, writes, 3, "num_keys, num_rebinds, num_queries or query_gap")


def _rebind_sample(rng: np.random.Generator, config, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    count, key_vocab, value_vocab = config.num_keys, config.key_vocab_size, config.value_vocab_size
    keys = 1 + rng.choice(key_vocab, count, replace=False)
    values = np.full(count, -1)  # the latest value of each key
    writes = []
    for i in rng.permutation(np.repeat(np.arange(count), 1 + config.num_rebinds)):
        values[i] = _new_value(rng, value_vocab, values[i])
        writes.append([keys[i], 1 + key_vocab + values[i]])
    asked = rng.choice(count, config.num_queries or count, replace=False)
    queries = [[keys[i], 1 + key_vocab + values[i]] for i in asked]
    return _edit_row(rng, config, seq_len, writes, queries, noise=1 + key_vocab + value_vocab)


EDIT_REBIND = Task(
    name="edit_rebind",
    defaults={
        "num_keys": 8,
        "num_rebinds": 2,  # per key: each key is bound, then re-bound this many times, each time to a new value
        "num_queries": 0,  # 0: every key is asked once
        "query_gap": 0,  # filler tokens between the last write and the first query
        "key_vocab_size": 64,
        "value_vocab_size": 64,
        "noise_vocab_size": 16,
    },
    vocab_size=lambda config: 1 + config.key_vocab_size + config.value_vocab_size + config.noise_vocab_size,
    check=_rebind_check,
    sample=_rebind_sample,
)


def _records_check(config, seq_len: int):
    where = "data.edit_records"
    check_int(f"{where}.num_records", config.num_records, 1)
    check_int(f"{where}.num_fields", config.num_fields, 1)
    check_int(f"{where}.num_updates", config.num_updates, 0)
    check_int(f"{where}.fields_per_update", config.fields_per_update, 1, config.num_fields)
    check_int(f"{where}.record_vocab_size", config.record_vocab_size, config.num_records)
    check_int(f"{where}.value_vocab_size", config.value_vocab_size, 2)
    records, fields = config.num_records, config.num_fields
    writes = records * (1 + 2 * fields) + config.num_updates * (1 + 2 * config.fields_per_update)
    lengths = "num_records, num_fields, num_updates, fields_per_update, num_queries or query_gap"
    _check_edit(where, config, seq_len, records * fields, writes, 4, lengths)


def _records_sample(rng: np.random.Generator, config, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    count, fields, value_vocab = config.num_records, config.num_fields, config.value_vocab_size
    field_start = 1 + config.record_vocab_size
    value_start = field_start + fields
    records = 1 + rng.choice(config.record_vocab_size, count, replace=False)
    values = np.full((count, fields), -1)  # the latest value of each field of each record
    updates = np.bincount(rng.integers(0, count, config.num_updates), minlength=count)
    writes = []
    for i in rng.permutation(np.repeat(np.arange(count), 1 + updates)):  # a record's first write sets every field
        first = values[i, 0] < 0
        written = rng.permutation(fields) if first else rng.choice(fields, config.fields_per_update, replace=False)
        write = [records[i]]
        for f in written:
            values[i, f] = _new_value(rng, value_vocab, values[i, f])
            write += [field_start + f, value_start + values[i, f]]
        writes.append(write)
    asked = rng.choice(count * fields, config.num_queries or count * fields, replace=False)
    record, field = np.divmod(asked, fields)
    queries = [[records[r], field_start + f, value_start + values[r, f]] for r, f in zip(record, field, strict=True)]
    return _edit_row(rng, config, seq_len, writes, queries, noise=value_start + value_vocab)


EDIT_RECORDS = Task(
    name="edit_records",
    defaults={
        "num_records": 4,
        "num_fields": 3,  # every record has the fields 0 .. num_fields - 1
        "num_updates": 6,  # in all, each of a uniformly drawn record
        "fields_per_update": 1,  # distinct fields an update writes
        "num_queries": 0,  # 0: every (record, field) is asked once
        "query_gap": 0,  # filler tokens between the last write and the first query
        "record_vocab_size": 64,
        "value_vocab_size": 64,
        "noise_vocab_size": 16,
    },
    vocab_size=lambda config: (
        1 + config.record_vocab_size + config.num_fields + config.value_vocab_size + config.noise_vocab_size
    ),
    check=_records_check,
    sample=_records_sample,
)


def _retract_check(config, seq_len: int):
    where = "data.edit_retract"
    check_int(f"{where}.num_keys", config.num_keys, 1)
    check_int(f"{where}.num_retractions", config.num_retractions, 0, config.num_keys)
    check_int(f"{where}.key_vocab_size", config.key_vocab_size, config.num_keys)
    check_int(f"{where}.value_vocab_size", config.value_vocab_size, 1)
    writes = 2 * (config.num_keys + config.num_retractions)
    _check_edit(
        where, config, seq_len, config.num_keys, writes, 3, "num_keys, num_retractions, num_queries or query_gap"
    )


def _retract_sample(rng: np.random.Generator, config, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    count, key_vocab, value_vocab = config.num_keys, config.key_vocab_size, config.value_vocab_size
    key_start = RETRACT_NONE + 1
    value_start = key_start + key_vocab
    keys = key_start + rng.choice(key_vocab, count, replace=False)
    values = value_start + rng.integers(0, value_vocab, count)
    retracted = np.zeros(count, bool)
    retracted[rng.choice(count, config.num_retractions, replace=False)] = True
    bound, writes = np.zeros(count, bool), []
    for i in rng.permutation(np.repeat(np.arange(count), 1 + retracted)):  # a key's first write binds it
        writes.append([RETRACT_MARK, keys[i]] if bound[i] else [keys[i], values[i]])
        bound[i] = True
    asked = rng.choice(count, config.num_queries or count, replace=False)
    queries = [[keys[i], RETRACT_NONE if retracted[i] else values[i]] for i in asked]
    return _edit_row(rng, config, seq_len, writes, queries, noise=value_start + value_vocab)


EDIT_RETRACT = Task(
    name="edit_retract",
    defaults={
        "num_keys": 8,
        "num_retractions": 4,  # distinct keys deleted, each some time after its binding
        "num_queries": 0,  # 0: every key is asked once
        "query_gap": 0,  # filler tokens between the last write and the first query
        "key_vocab_size": 64,
        "value_vocab_size": 64,
        "noise_vocab_size": 16,
    },
    vocab_size=lambda config: 3 + config.key_vocab_size + config.value_vocab_size + config.noise_vocab_size,
    check=_retract_check,
    sample=_retract_sample,
)


TASKS = (MQAR, S_NIAH_1, S_NIAH_2, S_NIAH_3, MK_NIAH, EDIT_REBIND, EDIT_RECORDS, EDIT_RETRACT)
"""Every synthetic task; edarnn.data registers each as the source named task.name."""
