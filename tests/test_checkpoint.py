"""edarnn.checkpoint on a toy state and a grain iterator: round trip, what is kept, unreadable checkpoints."""

import logging

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from edarnn import checkpoint

CONFIG = ml_collections.ConfigDict({"seed": 3, "model": {"layers": ["eda", "swa"]}})
SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _train_config(**overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"keep_last": 2, "keep_best": "", "async_checkpoints": False, **overrides})


def _state(step: int) -> dict:
    return {"params": {"w": jnp.full((4, 3), step / 7, jnp.float32)}, "opt_state": {"count": jnp.int32(step)}}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SHARDING), _state(0))


def _iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=1).batch(2).to_iter_dataset())


def _save(manager, iterator, steps, metrics=None):
    """Takes a batch and saves a checkpoint at each of `steps`; returns the batch taken after the last save."""
    for step in steps:
        next(iterator)
        checkpoint.save(manager, step, _state(step), iterator, CONFIG, None if metrics is None else metrics[step])
    return next(iterator)


def _assert_state(state, step):
    for actual, expected in zip(jax.tree.leaves(state), jax.tree.leaves(_state(step)), strict=True):
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("async_checkpoints", [False, True])
def test_round_trip(tmp_path, async_checkpoints):
    """The newest checkpoint comes back: state, the iterator's position and the config. With async saves, the
    arrays and the iterator position are those at save(), even when the arrays are deleted (donated) and the
    iterator moves on right after it."""
    manager = checkpoint.make_manager(tmp_path / "checkpoints", _train_config(async_checkpoints=async_checkpoints))
    iterator = _iterator()
    for step in (1, 2, 3):
        next(iterator)
        state = _state(step)
        checkpoint.save(manager, step, state, iterator, CONFIG)
        jax.tree.map(lambda x: x.delete(), state)
    batch_after_save = next(iterator)
    next(iterator)
    manager.close()

    manager = checkpoint.make_manager(tmp_path / "checkpoints", _train_config())
    fresh = _iterator()
    step, state = checkpoint.restore_latest(manager, ABSTRACT, fresh, CONFIG)
    assert step == 3
    _assert_state(state, 3)
    np.testing.assert_array_equal(next(fresh), batch_after_save)
    saved_config = manager.restore(3, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    assert saved_config == {"seed": 3, "model": {"layers": ["eda", "swa"]}}


@pytest.mark.parametrize(
    ("keep_best", "values", "kept"),
    [
        ("", None, [4, 5]),
        ("eval_accuracy", {1: 0.5, 2: 0.9, 3: 0.4, 4: 0.3, 5: 0.2}, [2, 4, 5]),
        ("eval_loss", {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.3, 5: 0.2}, [3, 4, 5]),
    ],
)
def test_keeps_the_last_and_the_best(tmp_path, keep_best, values, kept):
    manager = checkpoint.make_manager(tmp_path, _train_config(keep_best=keep_best))
    metrics = None if values is None else {step: {keep_best: value} for step, value in values.items()}
    _save(manager, _iterator(), [1, 2, 3, 4, 5], metrics)
    manager.close()
    assert sorted(manager.all_steps()) == kept


def _corrupt(step_dir, how: str):
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    assert files, step_dir
    for path in files:
        if how == "truncate":
            path.write_bytes(b"")
        elif how == "garble":  # flip bytes in the middle of every file
            content = bytearray(path.read_bytes())
            middle = len(content) // 2
            content[middle : middle + 4] = bytes(b ^ 0xFF for b in content[middle : middle + 4])
            path.write_bytes(bytes(content))
        elif how == "remove_state" and "state" in path.relative_to(step_dir).parts:
            path.unlink()
        elif how == "remove_data" and "data" in path.relative_to(step_dir).parts:
            path.unlink()


@pytest.mark.parametrize("how", ["truncate", "garble", "remove_state", "remove_data"])
def test_unreadable_latest_is_skipped(tmp_path, caplog, how):
    """A complete-looking but unreadable newest checkpoint is skipped with a warning and moved aside; the one
    before it is loaded, with its iterator position; its step can be saved again."""
    directory = tmp_path / "checkpoints"
    manager = checkpoint.make_manager(directory, _train_config(keep_last=3))
    iterator = _iterator()
    next(iterator)
    checkpoint.save(manager, 1, _state(1), iterator, CONFIG)
    batch_after_1 = next(iterator)
    checkpoint.save(manager, 2, _state(2), iterator, CONFIG)
    manager.close()
    _corrupt(directory / "2", how)

    manager = checkpoint.make_manager(directory, _train_config(keep_last=3))
    fresh = _iterator()
    with caplog.at_level(logging.WARNING):
        step, state = checkpoint.restore_latest(manager, ABSTRACT, fresh, CONFIG)
    assert step == 1
    _assert_state(state, 1)
    np.testing.assert_array_equal(next(fresh), batch_after_1)
    assert any("checkpoint 2 is unreadable" in r.getMessage() for r in caplog.records), caplog.text
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()] == ["2"]
    assert manager.all_steps() == [1]
    checkpoint.save(manager, 2, _state(2), fresh, CONFIG)
    manager.close()
    assert manager.all_steps() == [1, 2]


def test_nothing_readable(tmp_path, caplog):
    """With no readable checkpoint restore_latest returns None and leaves the iterator at its start."""
    manager = checkpoint.make_manager(tmp_path / "checkpoints", _train_config(keep_last=3))
    _save(manager, _iterator(), [1, 2, 3])
    manager.close()
    _corrupt(tmp_path / "checkpoints" / "1", "truncate")
    _corrupt(tmp_path / "checkpoints" / "3", "garble")
    _corrupt(tmp_path / "checkpoints" / "2", "remove_state")

    manager = checkpoint.make_manager(tmp_path / "checkpoints", _train_config(keep_last=3))
    fresh = _iterator()
    with caplog.at_level(logging.WARNING):
        assert checkpoint.restore_latest(manager, ABSTRACT, fresh, CONFIG) is None
    np.testing.assert_array_equal(next(fresh), next(_iterator()))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "corrupt_checkpoints").iterdir()) == ["1", "2", "3"]


def test_unfinished_save_is_ignored(tmp_path, caplog):
    """A save cut off before orbax renamed its temporary directory (a kill mid-save) is not a checkpoint: it is
    removed with a warning naming it."""
    directory = tmp_path / "checkpoints"
    manager = checkpoint.make_manager(directory, _train_config())
    _save(manager, _iterator(), [1, 2])
    manager.close()
    unfinished = directory / "3.orbax-checkpoint-tmp-1234567"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "_METADATA").write_text("{")

    with caplog.at_level(logging.WARNING):
        manager = checkpoint.make_manager(directory, _train_config())
    assert any(unfinished.name in r.getMessage() and "did not finish" in r.getMessage() for r in caplog.records)
    step, state = checkpoint.restore_latest(manager, ABSTRACT, _iterator(), CONFIG)
    assert step == 2
    _assert_state(state, 2)
    assert not unfinished.exists()


def test_flipped_bits_in_the_saved_arrays_are_caught(tmp_path, caplog):
    """Bytes flipped in the array data only (the files parse; the values differ): the state no longer matches the
    digest saved with it, so the checkpoint is skipped with a warning and the one before is loaded."""
    big = lambda step: {"w": jnp.arange(100_000, dtype=jnp.float32) * step}  # noqa: E731
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SHARDING), big(1))
    directory = tmp_path / "checkpoints"
    manager = checkpoint.make_manager(directory, _train_config(keep_last=3))
    iterator = _iterator()
    for step in (1, 2):
        checkpoint.save(manager, step, big(step), iterator, CONFIG)
    manager.close()
    data = max((p for p in (directory / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    assert data.stat().st_size > 100_000  # the arrays' data file, not metadata
    content = bytearray(data.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 4] = bytes(b ^ 0xFF for b in content[middle : middle + 4])
    data.write_bytes(bytes(content))

    manager = checkpoint.make_manager(directory, _train_config(keep_last=3))
    with caplog.at_level(logging.WARNING):
        step, state = checkpoint.restore_latest(manager, abstract, _iterator(), CONFIG)
    assert step == 1
    np.testing.assert_array_equal(state["w"], big(1)["w"])
    assert any("checkpoint 2 is unreadable" in r.getMessage() and "digest" in r.getMessage() for r in caplog.records)


def test_state_digest_matches_its_definition_for_every_kind_of_leaf():
    """The two sums per leaf against numpy on the flattened bits (element i weighted by 2 i + 1, modulo 2^32), for a
    3-d float32 leaf, a bool leaf, a 64-bit leaf (two 32-bit words per element) and a typed PRNG key (its key data)."""

    def expected(bits):
        bits = np.asarray(bits).ravel().astype(np.uint64)
        weights = 2 * np.arange(bits.size, dtype=np.uint64) + 1
        return [int(bits.sum() % 2**32), int((bits * weights).sum() % 2**32)]

    values = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    flags = np.arange(10) % 3 == 0
    wide = np.arange(6, dtype=np.int64) * (2**40 + 3)
    key = jax.random.key(5)
    state = {"a": jnp.asarray(values), "b": jnp.asarray(flags), "c": jnp.asarray(wide), "d": key}
    assert checkpoint.state_digest(state) == [
        expected(values.view(np.uint32)),
        expected(flags.astype(np.uint8)),
        expected(wide.view(np.uint32)),
        expected(jax.random.key_data(key)),
    ]


def test_checkpoint_without_a_digest_is_restored_unchecked(tmp_path):
    """A checkpoint written before digests existed (state, data and config only) is restored, not set aside."""
    directory = tmp_path / "checkpoints"
    manager = checkpoint.make_manager(directory, _train_config())
    iterator = _iterator()
    manager.save(
        1,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state(1)),
            data=grain.checkpoint.CheckpointSave(iterator),
            config=ocp.args.JsonSave(CONFIG.to_dict()),
        ),
    )
    manager.close()
    manager = checkpoint.make_manager(directory, _train_config())
    step, state = checkpoint.restore_latest(manager, ABSTRACT, _iterator(), CONFIG)
    assert step == 1
    _assert_state(state, 1)


def test_state_digest_sees_one_flipped_bit_and_swapped_elements():
    """Every single-bit flip of a float32, bfloat16 or int32 element changes both sums; swapping two elements
    changes the weighted one."""
    state = {"f": jnp.linspace(-1, 1, 6, dtype=jnp.float32), "h": jnp.ones(3, jnp.bfloat16), "n": jnp.int32(7)}
    digest = checkpoint.state_digest(state)
    for index, (name, leaf) in enumerate(sorted(state.items())):
        width = 8 * leaf.dtype.itemsize
        raw = np.asarray(jax.lax.bitcast_convert_type(leaf, jnp.dtype(f"uint{width}"))).ravel()
        for element in range(raw.size):
            for bit in range(width):
                flipped = raw.copy()
                flipped[element] ^= 1 << bit
                leaf_flipped = jax.lax.bitcast_convert_type(jnp.asarray(flipped.reshape(leaf.shape)), leaf.dtype)
                changed = checkpoint.state_digest({**state, name: leaf_flipped})[index]
                assert changed[0] != digest[index][0] and changed[1] != digest[index][1], (name, element, bit)
    swapped = state["f"][jnp.array([1, 0, 2, 3, 4, 5])]
    assert checkpoint.state_digest({**state, "f": swapped})[0][1] != digest[0][1]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    """Resuming a work dir with a different model config is an error naming the fields, not a corrupt checkpoint."""
    manager = checkpoint.make_manager(tmp_path / "checkpoints", _train_config())
    _save(manager, _iterator(), [1])
    manager.close()
    other = ml_collections.ConfigDict({"seed": 3, "model": {"layers": ["eda"]}})
    manager = checkpoint.make_manager(tmp_path / "checkpoints", _train_config())
    with pytest.raises(ValueError, match=r"another model: config.model differs in \['layers'\]"):
        checkpoint.restore_latest(manager, ABSTRACT, _iterator(), other)
    assert manager.all_steps() == [1]
