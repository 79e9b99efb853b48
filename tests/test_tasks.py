"""edarnn.tasks: needle-in-a-haystack and memory-editing rows checked against references that re-read each row
(token layouts as docs/tasks.md states them), determinism, held-out splits, config errors, batches of make_loader."""

import numpy as np
import pytest

from edarnn import data, tasks

NIAH = ("s_niah_1", "s_niah_2", "s_niah_3", "mk_niah")
EDITING = ("edit_rebind", "edit_records", "edit_retract")
PAD, NEEDLE, IS, QUERY = 0, 1, 2, 3  # needle tasks
EDIT_QUERY, RETRACT, NONE = 0, 1, 2  # editing tasks (RETRACT, NONE: edit_retract)


def task_config(name, **fields):
    config = data.default_config()
    config.source = name
    config[name].update(fields)
    return config


def rows(config, count=8, *, split="train", seed=0, seq_len=128) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `count` rows of a split as (tokens [seq_len + 1], loss_mask [seq_len])."""
    examples = data.SOURCES[config.source].examples(config[config.source], split=split, seed=seed, seq_len=seq_len)
    return [
        (np.concatenate([e["inputs"], e["targets"][-1:]]), e["loss_mask"]) for e in (examples[i] for i in range(count))
    ]


def scored(expected_positions, seq_len) -> np.ndarray:
    mask = np.zeros(seq_len, np.float32)
    mask[list(expected_positions)] = 1.0
    return mask


# ----------------------------------------------------------------------------------------------------------
# through make_loader; determinism; splits
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NIAH + EDITING)
def test_batches_of_make_loader(name):
    """Each task at its defaults runs through make_loader into [B, T] batches of ids below its vocabulary size,
    with some scored positions in every row, whole-row segments, and targets the next inputs."""
    config = task_config(name)
    loader = data.make_loader(config, split="eval", seed=0, batch_size=4, seq_len=96, shard_index=1, shard_count=2)
    iterator = iter(loader)
    for batch in (next(iterator), next(iterator)):
        assert all(batch[field].shape == (2, 96) for field in ("inputs", "targets", "segment_ids", "loss_mask"))
        assert batch["inputs"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
        assert batch["inputs"].min() >= 0 and batch["targets"].max() < data.vocab_size(config)
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["segment_ids"], 1)
        assert set(np.unique(batch["loss_mask"])) == {0.0, 1.0}


@pytest.mark.parametrize("name", NIAH + EDITING)
def test_deterministic_from_seed_split_and_index(name):
    config = task_config(name)
    first = rows(config, 4, seed=5)
    for (a, mask_a), (b, mask_b) in zip(first, rows(config, 4, seed=5), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(mask_a, mask_b)
    assert [r[0].tolist() for r in first] != [r[0].tolist() for r in rows(config, 4, seed=6)]
    assert [r[0].tolist() for r in first] != [r[0].tolist() for r in rows(config, 4, seed=5, split="eval")]
    assert len({tuple(r[0]) for r in first}) == 4


TINY = {  # so few distinct rows that independent train and eval draws would collide
    "s_niah_1": dict(key_vocab_size=2, value_vocab_size=2, noise_sentence_len=3),
    "s_niah_2": dict(key_vocab_size=4, value_vocab_size=4, context_len=8),  # no haystack
    "s_niah_3": dict(key_vocab_size=2, key_len=2, value_vocab_size=4, value_len=1, context_len=10),
    "mk_niah": dict(num_needles=2, key_vocab_size=2, value_vocab_size=2, context_len=12),
    "edit_rebind": dict(num_keys=1, num_rebinds=1, key_vocab_size=2, value_vocab_size=3, noise_vocab_size=1),
    "edit_records": dict(
        num_records=1, num_fields=1, num_updates=1, record_vocab_size=2, value_vocab_size=3, noise_vocab_size=1
    ),
    "edit_retract": dict(num_keys=2, num_retractions=1, key_vocab_size=2, value_vocab_size=2, noise_vocab_size=1),
}


@pytest.mark.parametrize("name", NIAH + EDITING)
def test_splits_disjoint(name):
    """With few distinct rows a split repeats rows, yet no eval row is a train row (one epoch of each)."""
    config = task_config(name, **TINY[name], num_train_examples=120, num_eval_examples=40)
    drawn = {}
    for split in data.SPLITS:
        loader = data.make_loader(config, split=split, seed=1, batch_size=40, seq_len=16, num_epochs=1)
        tokens = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in loader]  # whole rows
        drawn[split] = [tuple(row) for batch in tokens for row in batch.tolist()]
    assert len(drawn["train"]) == 120 and len(set(drawn["train"])) < 120  # repeats: the row space is small
    assert len(set(drawn["eval"])) > 1
    assert not set(drawn["train"]) & set(drawn["eval"])


# ----------------------------------------------------------------------------------------------------------
# needle in a haystack
# ----------------------------------------------------------------------------------------------------------


def niah_reference(tokens, mask, config, seq_len):
    """Re-reads a needle row left to right: needles "NEEDLE key IS value" in the haystack, then one "QUERY key IS
    value", then PAD; checks its layout and that the scored positions are the query's IS and value tokens (but the
    last) with the asked needle's value as targets. Returns (the haystack's word offsets with the needles cut out,
    the offset in it of each needle, that of the asked one)."""
    key_len, value_len = config.key_len, config.value_len
    keys, values = 4, 4 + config.key_vocab_size
    words = values + config.value_vocab_size
    context = config.context_len or seq_len + 1
    assert np.all(tokens[context:] == PAD) and np.all(tokens[:context] != PAD)
    found, haystack, offsets, p = {}, [], {}, 0
    while tokens[p] != QUERY:
        if tokens[p] == NEEDLE:
            key = tuple(tokens[p + 1 : p + 1 + key_len])
            assert tokens[p + 1 + key_len] == IS and key not in found
            value = tokens[p + 2 + key_len : p + 2 + key_len + value_len]
            assert all(keys <= k < values for k in key) and np.all((values <= value) & (value < words))
            found[key], offsets[key] = value, len(haystack)
            p += 2 + key_len + value_len
        else:
            assert tokens[p] >= words
            haystack.append(int(tokens[p]) - words)
            p += 1
    assert len(found) == config.get("num_needles", 1)
    key = tuple(tokens[p + 1 : p + 1 + key_len])
    assert tokens[p + 1 + key_len] == IS and p + 2 + key_len + value_len == context
    answer_at = np.arange(p + 1 + key_len, p + 1 + key_len + value_len)
    np.testing.assert_array_equal(mask, scored(answer_at, seq_len))
    np.testing.assert_array_equal(tokens[answer_at + 1], found[key])
    return haystack, list(offsets.values()), offsets[key]


@pytest.mark.parametrize("name", NIAH)
@pytest.mark.parametrize(
    "fields", [{}, {"context_len": 70, "key_len": 3, "value_len": 2, "key_vocab_size": 5, "value_vocab_size": 7}]
)
def test_niah_answers_and_haystack(name, fields):
    """Every row parses as the documented layout. The noise haystack is its sentence (the ids 0 .. n - 1) over and
    over, the essay haystack whole sentences of the templates (the first may be cut), both ending with a whole
    sentence; needles lie between sentences."""
    seq_len = 100
    config = task_config(name, **fields)
    classes = [c for c, words in tasks.ESSAY_WORDS.items() for _ in words]  # by word offset
    templates = [tuple(t.split()) for t in tasks.ESSAY_TEMPLATES]
    for tokens, mask in rows(config, 6, seq_len=seq_len):
        haystack, offsets, _ = niah_reference(tokens, mask, config[name], seq_len)
        if name == "s_niah_1":
            last = config[name].noise_sentence_len - 1
            assert haystack[-1] == last and np.all(np.diff(haystack) % (last + 1) == 1)
            assert all(at == 0 or haystack[at - 1] == last for at in offsets)
            continue
        sentences, sentence = [], []
        for word in haystack:
            sentence.append(classes[word])
            if sentence[-1] == ".":
                sentences.append(tuple(sentence))
                sentence = []
        assert not sentence and len(sentences) > 1
        assert all(s in templates for s in sentences[1:])
        assert any(t[len(t) - len(sentences[0]) :] == sentences[0] for t in templates)
        assert all(at == 0 or classes[haystack[at - 1]] == "." for at in offsets)


@pytest.mark.parametrize("name", NIAH)
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_niah_depth(name, depth):
    """With min_depth = max_depth = d, the asked needle has d of the haystack before it, to the nearest sentence
    boundary (within half the longest sentence)."""
    seq_len = 200
    config = task_config(name, min_depth=depth, max_depth=depth)
    longest = config[name].get("noise_sentence_len", max(len(t.split()) for t in tasks.ESSAY_TEMPLATES))
    for tokens, mask in rows(config, 6, seq_len=seq_len):
        haystack, _, asked = niah_reference(tokens, mask, config[name], seq_len)
        assert abs(asked - depth * len(haystack)) <= longest / 2


def test_niah_depths_spread():
    """The default depth range puts the asked needle anywhere: early and late."""
    config = task_config("mk_niah")
    depths = []
    for tokens, mask in rows(config, 40, seq_len=100):
        haystack, _, asked = niah_reference(tokens, mask, config.mk_niah, 100)
        depths.append(asked / len(haystack))
    assert min(depths) < 0.2 and max(depths) > 0.8


# ----------------------------------------------------------------------------------------------------------
# memory editing
# ----------------------------------------------------------------------------------------------------------


def edit_sections(tokens, mask, config, seq_len, *, noise: int, query_len: int):
    """Splits an editing row as documented: writes from the start, then exactly query_gap filler tokens, then
    num_queries (0: `all_queries`) queries of query_len tokens "QUERY prompt answer", then filler. Checks that
    the scored positions are the last prompt token of each query. Returns (the writes' tokens, [(prompt, answer)])."""
    is_noise = tokens >= noise
    end = int(np.argmax(is_noise | (tokens == EDIT_QUERY)))  # the writes hold neither filler nor QUERY
    starts = np.flatnonzero(tokens == EDIT_QUERY)
    assert starts[0] == end + config.query_gap and np.all(is_noise[end : starts[0]])
    np.testing.assert_array_equal(starts, starts[0] + query_len * np.arange(len(starts)))
    assert np.all(is_noise[starts[-1] + query_len :]) and not np.any(is_noise[starts[0] : starts[-1] + query_len])
    np.testing.assert_array_equal(mask, scored(starts + query_len - 2, seq_len))
    queries = [(tuple(tokens[s + 1 : s + query_len - 1]), tokens[s + query_len - 1]) for s in starts]
    assert len({prompt for prompt, _ in queries}) == len(queries)  # distinct keys asked
    return tokens[:end], queries


@pytest.mark.parametrize(
    "fields",
    [{}, {"num_keys": 5, "num_rebinds": 4, "num_queries": 3, "query_gap": 17, "value_vocab_size": 2}],
)
def test_edit_rebind_answers(fields):
    """A dict replays the writes "key value"; every key is written 1 + num_rebinds times, each time to a new value;
    each query's target is the latest value."""
    seq_len = 128
    config = task_config("edit_rebind", **fields)
    c = config.edit_rebind
    keys, values, noise = 1, 1 + c.key_vocab_size, 1 + c.key_vocab_size + c.value_vocab_size
    for tokens, mask in rows(config, 6, seq_len=seq_len):
        writes, queries = edit_sections(tokens, mask, c, seq_len, noise=noise, query_len=3)
        latest, history = {}, {}
        for key, value in writes.reshape(-1, 2):
            assert keys <= key < values <= value < noise
            history.setdefault(key, []).append(value)
            latest[key] = value
        assert len(history) == c.num_keys
        assert all(len(h) == 1 + c.num_rebinds and np.all(np.diff(h) != 0) for h in history.values())
        assert len(queries) == (c.num_queries or c.num_keys)
        assert all(answer == latest[key] for (key,), answer in queries)


@pytest.mark.parametrize(
    "fields",
    [{}, {"num_records": 3, "num_fields": 5, "num_updates": 7, "fields_per_update": 3, "num_queries": 6}],
)
def test_edit_records_answers(fields):
    """A dict of (record, field) replays the writes "record field value field value ..."; a record's first write
    sets every field, each later one fields_per_update fields to new values; a query "record field" targets the
    field's latest value."""
    seq_len = 160
    config = task_config("edit_records", query_gap=5, **fields)
    c = config.edit_records
    records, fields_start = 1, 1 + c.record_vocab_size
    values, noise = fields_start + c.num_fields, fields_start + c.num_fields + c.value_vocab_size
    for tokens, mask in rows(config, 6, seq_len=seq_len):
        writes, queries = edit_sections(tokens, mask, c, seq_len, noise=noise, query_len=4)
        latest, updates, p = {}, 0, 0
        while p < len(writes):
            record, p, written = writes[p], p + 1, {}
            assert records <= record < fields_start
            while p < len(writes) and writes[p] >= fields_start:
                field, value = writes[p : p + 2]
                assert fields_start <= field < values <= value < noise and field not in written
                assert latest.get((record, field)) != value  # a new value
                written[field], p = value, p + 2
            first = not any(r == record for r, _ in latest)
            assert len(written) == (c.num_fields if first else c.fields_per_update)
            updates += not first
            latest.update({(record, field): value for field, value in written.items()})
        assert updates == c.num_updates and len(latest) == c.num_records * c.num_fields
        assert len(queries) == (c.num_queries or c.num_records * c.num_fields)
        assert all(answer == latest[prompt] for prompt, answer in queries)


@pytest.mark.parametrize("fields", [{}, {"num_keys": 6, "num_retractions": 6, "num_queries": 4, "query_gap": 9}])
def test_edit_retract_answers(fields):
    """A dict replays "key value" (bind) and "RETRACT key" (delete an existing binding); num_retractions keys are
    deleted; a query targets the key's value, or NONE when it was deleted."""
    seq_len = 96
    config = task_config("edit_retract", **fields)
    c = config.edit_retract
    keys, values, noise = 3, 3 + c.key_vocab_size, 3 + c.key_vocab_size + c.value_vocab_size
    answers = set()
    for tokens, mask in rows(config, 8, seq_len=seq_len):
        writes, queries = edit_sections(tokens, mask, c, seq_len, noise=noise, query_len=3)
        bound, retracted = {}, set()
        for first, second in writes.reshape(-1, 2):
            if first == RETRACT:
                assert second in bound and second not in retracted
                retracted.add(second)
                del bound[second]
            else:
                assert keys <= first < values <= second < noise and first not in bound and first not in retracted
                bound[first] = second
        assert len(retracted) == c.num_retractions and len(bound) + len(retracted) == c.num_keys
        assert len(queries) == (c.num_queries or c.num_keys)
        assert all(answer == bound.get(key, NONE) for (key,), answer in queries)
        answers |= {answer == NONE for _, answer in queries}
    assert answers == ({True} if c.num_retractions == c.num_keys else {True, False})


# ----------------------------------------------------------------------------------------------------------
# vocabularies and bad configs
# ----------------------------------------------------------------------------------------------------------


def test_vocab_sizes():
    """The documented layouts: specials first, then keys, values (and fields), haystack words or filler."""
    sizes = dict(key_vocab_size=10, value_vocab_size=20)
    assert data.vocab_size(task_config("s_niah_1", **sizes, noise_sentence_len=7)) == 4 + 10 + 20 + 7
    assert len(set(tasks.ESSAY_VOCAB)) == len(tasks.ESSAY_VOCAB) == 115
    for name in ("s_niah_2", "s_niah_3", "mk_niah"):
        assert data.vocab_size(task_config(name, **sizes)) == 4 + 10 + 20 + 115
    assert data.vocab_size(task_config("edit_rebind", **sizes, noise_vocab_size=3)) == 1 + 10 + 20 + 3
    assert data.vocab_size(task_config("edit_retract", **sizes, noise_vocab_size=3)) == 3 + 10 + 20 + 3
    records = dict(record_vocab_size=10, num_fields=4, value_vocab_size=20, noise_vocab_size=3)
    assert data.vocab_size(task_config("edit_records", **records)) == 1 + 10 + 4 + 20 + 3


@pytest.mark.parametrize(
    "name, fields, message",
    [
        ("s_niah_1", dict(key_len=0), "data.s_niah_1.key_len=0"),
        ("s_niah_1", dict(noise_sentence_len=0), "data.s_niah_1.noise_sentence_len=0"),
        ("s_niah_1", dict(context_len=130), r"data.s_niah_1.context_len=130: expected an integer in \[0, 129\]"),
        ("s_niah_1", dict(num_needles=2), r"data.s_niah_1: missing fields \[\], unknown fields \['num_needles'\]"),
        ("s_niah_2", dict(min_depth=1.5), r"data.s_niah_2.min_depth=1.5: expected a number in \[0.0, 1\]"),
        ("s_niah_2", dict(value_vocab_size=0), "data.s_niah_2.value_vocab_size=0"),
        ("s_niah_3", dict(min_depth=0.5, max_depth=0.25), r"data.s_niah_3.max_depth=0.25: .* in \[0.5, 1\]"),
        ("s_niah_3", dict(context_len=20), "data.s_niah_3.context_len=20: the needles, query and answer take 36"),
        ("mk_niah", dict(num_needles=0), "data.mk_niah.num_needles=0"),
        ("mk_niah", dict(num_needles=5, key_vocab_size=2), "data.mk_niah.key_vocab_size=2 with key_len=1 has fewer"),
        ("mk_niah", dict(num_needles=40), "data.mk_niah.context_len=0: .* take 164 tokens, .* num_needles"),
        ("edit_rebind", dict(num_keys=0), "data.edit_rebind.num_keys=0"),
        ("edit_rebind", dict(key_vocab_size=4), "data.edit_rebind.key_vocab_size=4"),
        ("edit_rebind", dict(value_vocab_size=1), "data.edit_rebind.value_vocab_size=1"),
        ("edit_rebind", dict(num_queries=9), "data.edit_rebind.num_queries=9"),
        ("edit_rebind", dict(query_gap=-1), "data.edit_rebind.query_gap=-1"),
        ("edit_rebind", dict(noise_vocab_size=0), "data.edit_rebind.noise_vocab_size=0"),
        ("edit_rebind", dict(num_rebinds=7), "data.edit_rebind: a row needs 152 tokens, .* lower num_keys, num_reb"),
        ("edit_records", dict(fields_per_update=4), "data.edit_records.fields_per_update=4"),
        ("edit_records", dict(num_updates=-1), "data.edit_records.num_updates=-1"),
        ("edit_records", dict(record_vocab_size=3), "data.edit_records.record_vocab_size=3"),
        ("edit_records", dict(num_queries=13), "data.edit_records.num_queries=13"),
        ("edit_records", dict(query_gap=40), "data.edit_records: a row needs 134 tokens, .* or query_gap"),
        ("edit_retract", dict(num_retractions=9), "data.edit_retract.num_retractions=9"),
        ("edit_retract", dict(num_keys=30, key_vocab_size=30), "data.edit_retract: a row needs 158 tokens"),
    ],
)
def test_bad_config_names_the_field(name, fields, message):
    with pytest.raises(ValueError, match=message):
        data.make_loader(task_config(name, **fields), split="train", seed=0, batch_size=2, seq_len=128)
