"""edarnn.data: batch layout, determinism, held-out splits, MQAR answers, packing, sharding, exact resumption."""

import json

import numpy as np
import pytest

from edarnn import data

BYTE_PAD, BYTE_BOS, BYTE_EOS = 256, 257, 258  # the documented byte-tokenizer ids
FIELDS = ("inputs", "targets", "segment_ids", "loss_mask")


def mqar_config(**fields):
    config = data.default_config()
    config.mqar.update(fields)
    return config


def bytes_config(path, **fields):
    config = data.default_config()
    config.source = "bytes"
    config.bytes.update({"path": str(path), "eval_fraction": 0.3, **fields})
    return config


def loader(config, **kwargs):
    """make_loader with small defaults: the train split, seed 0, batches of 4 rows of 32 tokens."""
    return data.make_loader(config, **{"split": "train", "seed": 0, "batch_size": 4, "seq_len": 32, **kwargs})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of 40 files of random bytes (every byte value, lengths 0..300, two nested levels); returns
    (path, [the non-empty files' contents])."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    contents = []
    for i in range(40):
        path = root / ("a" if i % 3 else "b/c") / f"doc{i:02d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        content = rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes()
        path.write_bytes(content)
        contents += [content] if content else []
    return root, contents


@pytest.fixture
def configs(corpus) -> dict:
    return {"mqar": mqar_config(num_train_examples=64), "bytes": bytes_config(corpus[0])}


def take(iterable, n) -> list:
    """n batches of a loader (from its start) or of an iterator (from where it is)."""
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.keys() == e.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], e[name], err_msg=name)


def rows_of(batches) -> list[tuple]:
    """Every row of the batches as a hashable tuple of its four arrays."""
    return [
        tuple(tuple(batch[name][i].tolist()) for name in FIELDS)
        for batch in batches
        for i in range(len(batch["inputs"]))
    ]


def windows_of(batches, pad=BYTE_PAD) -> list[tuple]:
    """Unpacks packed rows into each segment's token window (its first input, then its targets), checking every
    row on the way: segment ids 1..n then 0; padding is `pad` and unscored; inputs are the targets shifted by one."""
    windows = []
    for inputs, targets, segment_ids, mask in (map(np.array, row) for row in rows_of(batches)):
        np.testing.assert_array_equal(mask, (segment_ids > 0).astype(np.float32))
        assert np.all(inputs[segment_ids == 0] == pad) and np.all(targets[segment_ids == 0] == pad)
        ids = segment_ids[segment_ids > 0]
        assert np.all(np.diff(ids) >= 0) and np.all(segment_ids[len(ids) :] == 0)
        np.testing.assert_array_equal(np.unique(ids), np.arange(1, ids.max() + 1))
        for segment in np.unique(ids):
            x, y = inputs[segment_ids == segment], targets[segment_ids == segment]
            np.testing.assert_array_equal(x[1:], y[:-1])
            windows.append((int(x[0]), *y.tolist()))
    return windows


# ----------------------------------------------------------------------------------------------------------
# layout and determinism
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["mqar", "bytes"])
@pytest.mark.parametrize("shard_count", [1, 2])
def test_batch_shapes_and_dtypes(configs, source, shard_count):
    config = configs[source]
    vocab = data.vocab_size(config)
    dtypes = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "loss_mask": np.float32}
    for batch in take(loader(config, shard_count=shard_count), 3):
        assert batch.keys() == dtypes.keys()
        for name, dtype in dtypes.items():
            assert batch[name].shape == (4 // shard_count, 32) and batch[name].dtype == dtype, name
        for name in ("inputs", "targets"):
            assert 0 <= batch[name].min() and batch[name].max() < vocab


@pytest.mark.parametrize("source", ["mqar", "bytes"])
def test_deterministic_from_seed(configs, source):
    config = configs[source]
    assert_same_batches(take(loader(config, seed=3), 4), take(loader(config, seed=3), 4))
    assert rows_of(take(loader(config, seed=3), 4)) != rows_of(take(loader(config, seed=4), 4))


def test_vocab_sizes():
    assert data.vocab_size(mqar_config(key_vocab_size=10, value_vocab_size=20, noise_vocab_size=3)) == 33
    assert data.vocab_size(bytes_config("unused")) == 259


# ----------------------------------------------------------------------------------------------------------
# MQAR
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_queries", [0, 3])
def test_mqar_answers(num_queries):
    """Recomputes each row's answers from its context: the loss is on the queried keys, their targets are the
    values bound to them; everything else is filler."""
    pairs, keys, values, noise, seq_len = 6, 10, 7, 5, 40
    config = mqar_config(
        num_pairs=pairs, num_queries=num_queries, key_vocab_size=keys, value_vocab_size=values, noise_vocab_size=noise
    )
    for inputs, targets, segment_ids, mask in map(np.array, rows_of(take(loader(config, seq_len=seq_len), 4))):
        np.testing.assert_array_equal(inputs[1:], targets[:-1])
        np.testing.assert_array_equal(segment_ids, np.ones(seq_len))
        context = inputs[: 2 * pairs]
        bound = dict(zip(context[0::2].tolist(), context[1::2].tolist(), strict=True))
        assert len(bound) == pairs and all(0 <= k < keys for k in bound)  # distinct keys from the key range
        assert all(keys <= v < keys + values for v in bound.values())
        answers = np.flatnonzero(mask)
        assert len(answers) == (num_queries or pairs) and np.all(mask[answers] == 1.0)
        assert answers.min() >= 2 * pairs and np.all(np.diff(answers) >= 2)
        assert len(set(inputs[answers].tolist())) == len(answers)  # each key asked at most once
        for a in answers:
            assert targets[a] == bound[int(inputs[a])]
        filler = np.ones(seq_len, bool)
        filler[: 2 * pairs], filler[answers], filler[(answers + 1)[answers + 1 < seq_len]] = False, False, False
        assert np.all((keys + values <= inputs[filler]) & (inputs[filler] < keys + values + noise))


def test_mqar_splits_disjoint():
    """So few distinct rows (3 keys x 3 values x 2 query places x 2^3 fillers) that independent draws would
    collide; the hash partition keeps every eval row out of train."""
    config = mqar_config(num_pairs=1, key_vocab_size=3, value_vocab_size=3, noise_vocab_size=2)
    config.mqar.update(num_train_examples=200, num_eval_examples=200)
    rows = {
        split: set(rows_of(loader(config, split=split, batch_size=50, seq_len=6, num_epochs=1)))
        for split in data.SPLITS
    }
    assert len(rows["train"]) > 20 and len(rows["eval"]) > 5
    assert not rows["train"] & rows["eval"]


def test_finite_split_is_reshuffled_each_epoch():
    """num_train_examples fixes the training set; each epoch visits it in a new order."""
    config = mqar_config(num_train_examples=16)
    examples = data.SOURCES["mqar"].examples(config.mqar, split="train", seed=0, seq_len=32)
    epochs = [rows_of([batch]) for batch in loader(config, batch_size=16, num_epochs=2)]
    indexed = [tuple(tuple(examples[i][name].tolist()) for name in ("inputs", "targets")) for i in range(16)]
    firsts = [[row[:2] for row in epoch] for epoch in epochs]
    assert sorted(firsts[0]) == sorted(firsts[1]) == sorted(indexed)
    assert firsts[0] != firsts[1] and firsts[0] != indexed


def test_mqar_eval_split_is_fixed():
    """The eval split is the same examples whatever the train settings; a finite split has exactly its count."""
    config = mqar_config(num_eval_examples=24)
    rows = sorted(rows_of(loader(config, split="eval", batch_size=8, num_epochs=1)))
    assert len(rows) == 24 and len(set(rows)) == 24
    config.mqar.num_train_examples = 100
    assert sorted(rows_of(loader(config, split="eval", batch_size=8, num_epochs=1))) == rows


# ----------------------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [16, 400])
def test_bytes_packing_recovers_documents(corpus, seq_len):
    """One epoch of both splits unpacks into exactly the windows of every document: BOS, its bytes, EOS, cut into
    windows of seq_len + 1 tokens that overlap by one (whole documents when seq_len is longer)."""
    root, contents = corpus
    batches = [
        batch
        for split in data.SPLITS
        for batch in loader(bytes_config(root), split=split, batch_size=1, seq_len=seq_len, num_epochs=1)
    ]
    expected = []
    for content in contents:
        tokens = [BYTE_BOS, *content, BYTE_EOS]
        expected += [tuple(tokens[i : i + seq_len + 1]) for i in range(0, len(tokens) - 1, seq_len)]
    windows = windows_of(batches)
    assert sorted(windows) == sorted(expected)
    if seq_len == 400:
        assert sorted(bytes(w[1:-1]) for w in windows) == sorted(contents)


def test_bytes_splits_disjoint(corpus):
    root, contents = corpus
    documents = {
        split: {
            bytes(w[1:-1])
            for w in windows_of(loader(bytes_config(root), split=split, batch_size=1, seq_len=400, num_epochs=1))
        }
        for split in data.SPLITS
    }
    assert documents["train"] and documents["eval"] and not documents["train"] & documents["eval"]
    assert documents["train"] | documents["eval"] == set(contents)


def test_separator_splits_documents(tmp_path):
    (tmp_path / "text.txt").write_bytes(b"one\n\ntwo\n\n\n\nthree\n")
    (tmp_path / "skip.md").write_bytes(b"not read")
    config = bytes_config(tmp_path, separator="\n\n", glob="*.txt").bytes
    assert data.read_documents(config) == [b"one", b"two", b"three\n"]


# ----------------------------------------------------------------------------------------------------------
# sharding and resumption
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["mqar", "bytes"])
def test_shards_are_disjoint_and_cover_the_split(configs, source):
    """Two processes see disjoint examples, together those of one process (one epoch; batches of 4 and 2 x 2
    rows of the 64 MQAR examples; batches of one packed row, so that no partial batch is dropped)."""
    config = configs[source]
    unpack = rows_of if source == "mqar" else windows_of
    rows_per_process = 4 if source == "mqar" else 1
    whole = unpack(loader(config, batch_size=rows_per_process, num_epochs=1))
    shards = [
        unpack(loader(config, batch_size=2 * rows_per_process, shard_index=i, shard_count=2, num_epochs=1))
        for i in range(2)
    ]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(whole)


@pytest.mark.parametrize("source", ["mqar", "bytes"])
@pytest.mark.parametrize("taken", [0, 5])
def test_resume_exactly(configs, source, taken):
    """n batches, get_state, m more; a fresh loader set to the state gives the same m (through JSON, as orbax
    stores it)."""
    config = configs[source]
    config.mqar.num_train_examples = 16  # 8 a shard: the 12 batches of one row cross an epoch
    iterator = iter(loader(config, seed=2, batch_size=2, shard_index=1, shard_count=2))
    take(iterator, taken)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 7)
    resumed = iter(loader(config, seed=2, batch_size=2, shard_index=1, shard_count=2))
    resumed.set_state(state)
    assert_same_batches(take(resumed, 7), expected)


def test_orbax_checkpoint_of_the_iterator(configs, tmp_path):
    """The docstring's recipe: an async CheckpointManager saves the iterator through grain's handler; a fresh
    iterator restored from it continues with the batches after the save, even if the saved one moved on."""
    import grain  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415

    iterator = iter(loader(configs["bytes"], batch_size=2))
    take(iterator, 3)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    expected = take(iterator, 4)
    manager.wait_until_finished()
    resumed = iter(loader(configs["bytes"], batch_size=2))
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    manager.close()
    assert_same_batches(take(resumed, 4), expected)


# ----------------------------------------------------------------------------------------------------------
# bad configs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        (lambda: mqar_config(num_pairs=20), {}, "data.mqar.num_pairs=20 with 20 queries needs seq_len >= 79"),
        (lambda: mqar_config(num_pairs=4, num_queries=5), {}, "data.mqar.num_queries=5"),
        (lambda: mqar_config(num_pairs=8, key_vocab_size=4), {}, "data.mqar.key_vocab_size=4"),
        (lambda: mqar_config(noise_vocab_size=0), {}, "data.mqar.noise_vocab_size=0"),
        (lambda: mqar_config(num_eval_examples=0), {}, "data.mqar.num_eval_examples=0"),
        (lambda: mqar_config(num_pair=3), {}, r"data.mqar: missing fields \[\], unknown fields \['num_pair'\]"),
        (lambda: bytes_config("/no/such/path"), {}, "data.bytes.path='/no/such/path'"),
        (lambda: bytes_config(""), {}, "data.bytes.path=''"),
        (lambda: bytes_config("", eval_fraction=1.0), {}, "data.bytes.eval_fraction=1.0"),
        (lambda: bytes_config("/", tokenizer="vocab.txt"), {}, "data.bytes.tokenizer='vocab.txt'"),
        (lambda: mqar_config(), {"num_epochs": 1}, "num_epochs=1: data.mqar train is an endless stream"),
        (lambda: mqar_config(), {"batch_size": 5, "shard_count": 2}, "batch_size=5 must be a multiple of shard_count"),
        (lambda: mqar_config(), {"shard_index": 2, "shard_count": 2}, "shard_index=2"),
        (lambda: mqar_config(), {"split": "test"}, "split must be one of"),
        (lambda: mqar_config(), {"seq_len": 0}, "seq_len=0"),
        (lambda: mqar_config(), {"seed": -1}, "seed=-1"),
    ],
)
def test_bad_config_names_the_field(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loader(config(), **kwargs)


def test_unknown_source():
    config = data.default_config()
    config.source = "nope"
    with pytest.raises(ValueError, match=r"data.source='nope': expected one of \['bytes', 'edit_rebind', .*'mqar'"):
        data.vocab_size(config)


def test_bytes_split_without_documents(tmp_path):
    (tmp_path / "only.txt").write_bytes(b"a single document")
    split = "eval" if data.is_eval_document(b"a single document", 0.3) else "train"
    other = "train" if split == "eval" else "eval"
    loader(bytes_config(tmp_path), split=split)
    with pytest.raises(ValueError, match=f"no {other} documents"):
        loader(bytes_config(tmp_path), split=other)


# ----------------------------------------------------------------------------------------------------------
# tokenizer files (optional packages)
# ----------------------------------------------------------------------------------------------------------


def _hugging_face_tokenizer(path, texts):
    """A small BPE tokenizer.json trained on texts -> (its path, its encode function)."""
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    model.save(str(path / "tokenizer.json"))
    return str(path / "tokenizer.json"), lambda text: model.encode(text, add_special_tokens=False).ids


def _sentencepiece_model(path, texts):
    """A small SentencePiece model trained on texts -> (its path, its encode function)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    (path / "train.txt").write_text("\n".join(texts))
    options = {"vocab_size": 60, "hard_vocab_limit": False, "minloglevel": 2}
    sentencepiece.SentencePieceTrainer.train(input=str(path / "train.txt"), model_prefix=str(path / "sp"), **options)
    model = sentencepiece.SentencePieceProcessor(model_file=str(path / "sp.model"))
    return str(path / "sp.model"), model.encode


@pytest.mark.parametrize("make_tokenizer", [_hugging_face_tokenizer, _sentencepiece_model])
def test_tokenizer_file(tmp_path, make_tokenizer):
    """With a tokenizer file the documents are its ids between BOS and EOS, which follow its vocabulary."""
    texts = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(30)]
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "docs" / f"{i}.txt").write_text(text)
    path, encode = make_tokenizer(tmp_path, texts)
    config = bytes_config(tmp_path / "docs", tokenizer=path)
    tokenizer = data.load_tokenizer(path)
    size = tokenizer.size
    assert data.vocab_size(config) == size + 3 and (tokenizer.pad, tokenizer.bos, tokenizer.eos) == (
        size,
        size + 1,
        size + 2,
    )
    windows = {
        window
        for split in data.SPLITS
        for window in windows_of(loader(config, split=split, batch_size=1, seq_len=128, num_epochs=1), pad=size)
    }
    expected = {(size + 1, *encode(text), size + 2) for text in texts}
    assert windows == expected and all(max(w[1:-1]) < size for w in windows)
