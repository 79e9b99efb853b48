"""Data with grain: synthetic recall tasks and text, as batches of fixed-length rows with segment ids.

    loader = make_loader(config.data, split="train", seed=config.seed, batch_size=B, seq_len=T,
                         shard_index=jax.process_index(), shard_count=jax.process_count())
    iterator = iter(loader)          # a grain DatasetIterator: next(), get_state(), set_state()
    batch = next(iterator)           # dict of numpy arrays, each [B // shard_count, T]:
        "inputs" int32        token ids
        "targets" int32       the token that follows each input (the next token of the same document)
        "segment_ids" int32   1, 2, ... for the documents packed in a row (each its own id), 0 for padding
        "loss_mask" float32   1 where the target is scored: synthetic tasks only their answers; text every target
                              but padding

Sources (`SOURCES`, chosen by `config.data.source`; each reads its settings from `config.data.<source>`):
- the synthetic tasks of edarnn.tasks (`tasks.TASKS`; formats in docs/tasks.md), one example per row: "mqar"
  (multi-query associative recall); needle in a haystack "s_niah_1", "s_niah_2", "s_niah_3", "mk_niah"; memory
  editing "edit_rebind", "edit_records", "edit_retract".
- "bytes": text from a file or a directory (the files under it matching `glob`, in sorted order). Documents are
  the files, or the pieces between occurrences of `separator` when it is not empty; empty ones are dropped. Token
  ids: bytes 0..255 are themselves, then PAD = 256, BOS = 257, EOS = 258 (vocab 259); with `tokenizer` set to a
  SentencePiece ".model" or a Hugging Face "tokenizer.json" file, its ids [0, n) and PAD, BOS, EOS = n, n + 1,
  n + 2 (the packages are optional: `pip install sentencepiece` / `pip install tokenizers`). Each document is
  BOS, its tokens, EOS; one longer than T + 1 tokens is cut into windows of T + 1 tokens that overlap by one token,
  so that every next-token pair of the document is in exactly one window, and no target lies in another document.
  Windows are packed first-fit into rows (grain's FirstFitPackIterDataset; not its ConcatThenSplitIterDataset,
  whose state does not survive the JSON round trip of grain's orbax handler in grain 0.2.18: restoring a state
  without a pending remainder skips data). A document belongs to the eval split when its content hash falls below
  `eval_fraction` (stable under adding files; equal documents share a split).

Synthetic tasks (`tasks.Task`): a task draws a row from a numpy Generator; `synthetic(task)` makes it a
source. Row i of a split is drawn from `np.random.default_rng([seed, split id, i])`: random access, reproducible,
independent of sharding. The splits are disjoint by construction: a row belongs to the eval split when the CRC32
of its tokens is 0 mod EVAL_ROW_BUCKETS, and each split redraws until it has one of its own. Each synthetic
section has num_train_examples (0: an endless stream of fresh rows) and num_eval_examples.

Order and sharding: the examples (synthetic rows or text windows) of a split are shuffled from the seed (a new
order each epoch), repeated num_epochs times (None: forever), and process p of n takes examples p, p + n, ...
before packing, so processes see disjoint data. A final partial batch is dropped. With num_epochs set, the
processes may get different numbers of batches of packed text: for an evaluation in step across processes, take a
fixed number of batches from a loader with num_epochs=None.

Checkpointing: the iterator's state is a small JSON-able dict; orbax saves it through grain's handler, one file
per process. In train.py:

    import grain, orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=grain.checkpoint.CheckpointSave(iterator)))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=grain.checkpoint.CheckpointRestore(iterator)))
    # `iterator` (a fresh one from make_loader) now continues after the last batch taken before the save

The state covers the batches next() has returned: a batch taken ahead (e.g. prefetched to the device) and not yet
trained on is skipped after a restore. An async CheckpointManager reads the state within save(), before it
returns. A restore needs the same process count (one state file per process).
"""

import dataclasses
import functools
import hashlib
import pathlib
import sys
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np

from edarnn.tasks import TASKS, Task, check_int

SPLITS = ("train", "eval")
EVAL_ROW_BUCKETS = 4  # a synthetic row is an eval row when crc32(tokens) % EVAL_ROW_BUCKETS == 0
PACKING_BINS = 16  # first-fit bins; ~99% of tokens are real on source files cut at T = 512
_MAX_DRAWS = 100  # draws of a synthetic row before deciding that its split is (nearly) empty


@dataclasses.dataclass(frozen=True)
class Source:
    """A data source: its settings (the fields of config.data.<name> and their defaults), its vocabulary size, and
    the examples of one split as a grain MapDataset (random access; length sys.maxsize for an endless stream).

    Examples are dicts of "inputs", "targets" (int) and "loss_mask" (float32), all [L]: whole rows (L = seq_len)
    when pad_id is None, else variable-length pieces (L <= seq_len) that are packed into rows, padded with
    pad_id(config)."""

    defaults: Mapping[str, Any]
    vocab_size: Callable[[ml_collections.ConfigDict], int]
    examples: Callable[..., grain.MapDataset]  # (config, *, split, seed, seq_len) -> examples
    pad_id: Callable[[ml_collections.ConfigDict], int] | None = None


def vocab_size(data_config: ml_collections.ConfigDict) -> int:
    """The number of token ids of config.data's source (all of them: padding and separators included)."""
    source, config = _source(data_config)
    return source.vocab_size(config)


def make_loader(
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    seed: int,
    batch_size: int,
    seq_len: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
) -> grain.IterDataset:
    """Batches of `split` of config.data's source for process `shard_index` of `shard_count` (see the module
    docstring): iterate it for dicts of [batch_size // shard_count, seq_len] numpy arrays. `batch_size` is global;
    num_epochs=None repeats forever (a finite count needs a finite split). Deterministic from (seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    check_int("seed", seed, 0, 2**32 - 1)
    check_int("seq_len", seq_len, 1)
    check_int("shard_count", shard_count, 1)
    check_int("shard_index", shard_index, 0, shard_count - 1)
    check_int("batch_size", batch_size, shard_count)
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of shard_count={shard_count}")
    if num_epochs is not None:
        check_int("num_epochs", num_epochs, 1)
    source, config = _source(data_config)
    examples = source.examples(config, split=split, seed=seed, seq_len=seq_len)
    if len(examples) < sys.maxsize:
        examples = examples.shuffle(seed).repeat(num_epochs)
    elif num_epochs is not None:
        raise ValueError(f"num_epochs={num_epochs}: data.{data_config.source} {split} is an endless stream; pass None")
    rows = examples[shard_index::shard_count].to_iter_dataset()
    if source.pad_id is None:
        rows = rows.map(_whole_row)
    else:
        rows = grain.experimental.FirstFitPackIterDataset(
            rows,
            length_struct={name: seq_len for name in ("inputs", "targets", "loss_mask")},
            num_packing_bins=PACKING_BINS,
        ).map(functools.partial(_packed_row, source.pad_id(config)))
    return rows.batch(batch_size // shard_count, drop_remainder=True)


def _whole_row(example: dict) -> dict:
    inputs = example["inputs"]
    return {
        "inputs": inputs.astype(np.int32),
        "targets": example["targets"].astype(np.int32),
        "segment_ids": np.ones(inputs.shape, np.int32),
        "loss_mask": example["loss_mask"].astype(np.float32),
    }


def _packed_row(pad_id: int, packed: dict) -> dict:
    """A row of grain's packer -> a batch row: its segment ids, PAD at the padding."""
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    real = segment_ids > 0
    return {
        "inputs": np.where(real, packed["inputs"], pad_id).astype(np.int32),
        "targets": np.where(real, packed["targets"], pad_id).astype(np.int32),
        "segment_ids": segment_ids,
        "loss_mask": np.where(real, packed["loss_mask"], 0).astype(np.float32),
    }


# ----------------------------------------------------------------------------------------------------------
# config checks
# ----------------------------------------------------------------------------------------------------------


def _source(data_config: ml_collections.ConfigDict) -> tuple[Source, ml_collections.ConfigDict]:
    """config.data's source and its section, checked to have exactly the source's fields."""
    name = data_config.source
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r}: expected one of {sorted(SOURCES)}")
    source = SOURCES[name]
    if name not in data_config:
        raise ValueError(f"data.{name} is missing: the settings of source {name!r}, fields {sorted(source.defaults)}")
    config = data_config[name]
    missing, unknown = set(source.defaults) - set(config.keys()), set(config.keys()) - set(source.defaults)
    if missing or unknown:
        raise ValueError(f"data.{name}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
    return source, config


# ----------------------------------------------------------------------------------------------------------
# synthetic tasks
# ----------------------------------------------------------------------------------------------------------


def synthetic(task: Task) -> Source:
    """The source of a synthetic task: its settings plus num_train_examples (0: endless) and num_eval_examples."""
    defaults = {**task.defaults, "num_train_examples": 0, "num_eval_examples": 1024}
    return Source(defaults, task.vocab_size, functools.partial(_synthetic_examples, task))


def _synthetic_examples(task: Task, config, *, split: str, seed: int, seq_len: int) -> grain.MapDataset:
    where = f"data.{task.name}"
    check_int(f"{where}.num_train_examples", config.num_train_examples, 0)
    check_int(f"{where}.num_eval_examples", config.num_eval_examples, 1)
    task.check(config, seq_len)
    count = config.num_train_examples if split == "train" else config.num_eval_examples
    rows = grain.MapDataset.range(count or sys.maxsize)
    rows = rows.map(functools.partial(_synthetic_row, task, config, seq_len, seed, SPLITS.index(split)))
    rows[0]  # noqa: B018  (draws one row now, so that a split with (nearly) no rows fails here)
    return rows


def _synthetic_row(task: Task, config, seq_len: int, seed: int, split_id: int, index: int) -> dict:
    rng = np.random.default_rng([seed, split_id, index])
    for _ in range(_MAX_DRAWS):
        tokens, answers = task.sample(rng, config, seq_len)
        if _is_eval_row(tokens) == (SPLITS[split_id] == "eval"):
            return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": answers.astype(np.float32)}
    raise ValueError(
        f"data.{task.name}: no {SPLITS[split_id]} row in {_MAX_DRAWS} draws; the task has too few distinct rows "
        "to hold out an eval split (raise its vocabulary sizes or seq_len)"
    )


def _is_eval_row(tokens: np.ndarray) -> bool:
    return zlib.crc32(np.ascontiguousarray(tokens, np.int64).tobytes()) % EVAL_ROW_BUCKETS == 0


# ----------------------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Document bytes -> token ids in [0, size); the ids size, size + 1, size + 2 are PAD, BOS, EOS."""

    size: int
    encode: Callable[[bytes], np.ndarray]

    @property
    def pad(self) -> int:
        return self.size

    @property
    def bos(self) -> int:
        return self.size + 1

    @property
    def eos(self) -> int:
        return self.size + 2


BYTES = Tokenizer(256, lambda document: np.frombuffer(document, np.uint8))


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of data.bytes.tokenizer: "" the bytes, a SentencePiece ".model" or a Hugging Face ".json"
    file (documents decoded as UTF-8, invalid bytes replaced)."""
    if not path:
        return BYTES
    where = f"data.bytes.tokenizer={path!r}"
    if not pathlib.Path(path).is_file():
        raise ValueError(f"{where}: no such file")
    if path.endswith(".model"):
        try:
            import sentencepiece  # noqa: PLC0415  (optional)
        except ImportError as error:
            raise ImportError(f"{where} needs the sentencepiece package: pip install sentencepiece") from error
        model = sentencepiece.SentencePieceProcessor(model_file=path)
        return Tokenizer(model.get_piece_size(), lambda doc: np.asarray(model.encode(_text(doc)), np.int32))
    if path.endswith(".json"):
        try:
            import tokenizers  # noqa: PLC0415  (optional)
        except ImportError as error:
            raise ImportError(f"{where} needs the tokenizers package: pip install tokenizers") from error
        model = tokenizers.Tokenizer.from_file(path)
        encode = lambda doc: np.asarray(model.encode(_text(doc), add_special_tokens=False).ids, np.int32)  # noqa: E731
        return Tokenizer(model.get_vocab_size(), encode)
    raise ValueError(f'{where}: expected "" (bytes), a SentencePiece .model or a Hugging Face tokenizer .json file')


def _text(document: bytes) -> str:
    return document.decode("utf-8", errors="replace")


def read_documents(config) -> list[bytes]:
    """The non-empty documents of data.bytes (see the module docstring), in a fixed order."""
    path = pathlib.Path(config.path)
    if not config.path or not path.exists():
        raise ValueError(f"data.bytes.path={config.path!r}: no such file or directory")
    files = [path] if path.is_file() else sorted(p for p in path.glob(config.glob) if p.is_file())
    separator = config.separator.encode()
    pieces = (f.read_bytes().split(separator) if separator else [f.read_bytes()] for f in files)
    documents = [document for piece in pieces for document in piece if document]
    if not documents:
        raise ValueError(f"data.bytes.path={config.path!r} (glob={config.glob!r}): no non-empty documents")
    return documents


def is_eval_document(document: bytes, eval_fraction: float) -> bool:
    """Whether a document is in the eval split: its 64-bit BLAKE2b hash, as a fraction of 2**64, is below
    eval_fraction."""
    digest = int.from_bytes(hashlib.blake2b(document, digest_size=8).digest(), "little")
    return digest < eval_fraction * 2**64


def _text_examples(config, *, split: str, seed: int, seq_len: int) -> grain.MapDataset:
    """Windows of T + 1 tokens (T = seq_len) of the split's documents, each BOS, tokens, EOS, as next-token pairs
    {"inputs": w[:-1], "targets": w[1:], "loss_mask": ones}; consecutive windows of a document overlap by one
    token. (seed: unused here, the order is shuffled by make_loader.)"""
    del seed
    if not 0.0 < config.eval_fraction < 1.0:
        raise ValueError(f"data.bytes.eval_fraction={config.eval_fraction!r}: expected a fraction in (0, 1)")
    tokenizer = load_tokenizer(config.tokenizer)
    documents = [d for d in read_documents(config) if is_eval_document(d, config.eval_fraction) == (split == "eval")]
    if not documents:
        raise ValueError(
            f"data.bytes: no {split} documents under path={config.path!r} with eval_fraction={config.eval_fraction} "
            "(documents are whole files unless data.bytes.separator is set)"
        )
    encoded = [tokenizer.encode(d) for d in documents]
    lengths = np.array([len(e) + 2 for e in encoded])  # BOS ... EOS
    tokens = np.empty(lengths.sum(), np.uint16 if tokenizer.eos < 2**16 else np.int32)
    starts = np.cumsum(lengths) - lengths
    for start, length, ids in zip(starts, lengths, encoded, strict=True):
        tokens[start], tokens[start + length - 1] = tokenizer.bos, tokenizer.eos
        tokens[start + 1 : start + length - 1] = ids
    windows = -(-(lengths - 1) // seq_len)  # per document: its length - 1 next-token pairs, seq_len per window
    document = np.repeat(np.arange(len(documents)), windows)
    begin = starts[document] + seq_len * (np.arange(windows.sum()) - np.repeat(np.cumsum(windows) - windows, windows))
    end = np.minimum(begin + seq_len + 1, (starts + lengths)[document])
    return grain.MapDataset.range(len(begin)).map(functools.partial(_window, tokens, begin, end))


def _window(tokens: np.ndarray, begin: np.ndarray, end: np.ndarray, index: int) -> dict:
    window = tokens[begin[index] : end[index]].astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:], "loss_mask": np.ones(len(window) - 1, np.float32)}


TEXT = Source(
    defaults={
        "path": "",  # a file or a directory
        "glob": "**/*",  # the files of a directory that are read
        "separator": "",  # "" (documents are files) or e.g. "\n\n"
        "eval_fraction": 0.05,
        "tokenizer": "",  # "" (bytes), or a SentencePiece .model / Hugging Face .json file
    },
    vocab_size=lambda config: load_tokenizer(config.tokenizer).eos + 1,
    examples=_text_examples,
    pad_id=lambda config: load_tokenizer(config.tokenizer).pad,
)


# ----------------------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------------------

SOURCES: dict[str, Source] = {**{task.name: synthetic(task) for task in TASKS}, "bytes": TEXT}
"""Data sources by name (config.data.source): the synthetic tasks of edarnn.tasks.TASKS, and text."""


def default_config() -> ml_collections.ConfigDict:
    """config.data with every source's section at its defaults (configs override what they use)."""
    sections = {name: dict(source.defaults) for name, source in SOURCES.items()}
    return ml_collections.ConfigDict({"source": "mqar", "seq_len": 128, "batch_size": 32, **sections})
