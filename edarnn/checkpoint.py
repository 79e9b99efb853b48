"""Checkpoints with orbax: the training state (params, optimizer state), the step (the checkpoint's number), the
grain iterator state of the training data, the config and a digest of the state, in
`<workdir>/checkpoints/<step>/{state,data,config,digest}`.

Orbax writes a checkpoint into a temporary directory and renames it when complete, so a run killed mid-save
leaves no half checkpoint under its step (the temporary directory is removed, with a warning, at the next start).
A checkpoint that is complete on disk but unreadable (truncated or garbled files) fails its parse on restore, or
its digest: each checkpoint stores `state_digest` of its state beside it (item "digest"), and the restored state
must give the same (checkpoints written before digests existed are restored unchecked). `restore_latest` then
warns, moves it to `<workdir>/corrupt_checkpoints/` and loads the one before. A checkpoint of another model
(config.model differs) is an error, not a corrupt checkpoint.
"""

import json
import logging
import shutil
import time

import grain.checkpoint
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from edarnn import config as config_lib

_ITEMS = ("state", "data", "config", "digest")
_UNFINISHED = "*.orbax-checkpoint-tmp*"  # orbax's temporary directory of a save in progress


def _bit_sums(x):
    """[2] uint32: the plain and the odd-weighted sum of the bits of x's elements (see state_digest). Element i's
    row-major index comes from iotas, not a flattening, so a sharded leaf is reduced shard by shard (no gather)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = jnp.dtype(x.dtype).itemsize
    if width > 4:  # 64-bit elements as pairs of 32-bit words
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}")).astype(jnp.uint32)
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)])


_tree_bit_sums = jax.jit(lambda tree: jax.tree.map(_bit_sums, tree))


def state_digest(state) -> list[list[int]]:
    """Per leaf of `state` (a pytree of arrays, any sharding, in tree order), two 32-bit sums of its elements'
    bits: the plain sum and the sum weighted by odd numbers (2 i + 1 for element i), modulo 2^32. Any one flipped
    bit changes both (an odd weight is invertible modulo 2^32), two swapped elements the second. Computed on the
    devices, one pass over the state."""
    return [[int(v) for v in pair] for pair in jax.tree.leaves(jax.device_get(_tree_bit_sums(state)))]


def make_manager(directory: str, train_config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager for checkpoints under `directory` that keeps the newest `train_config.keep_last` and, with
    `train_config.keep_best`, the best by that evaluation metric; saves in the background if
    `train_config.async_checkpoints`. Unfinished saves (a run killed while saving) are removed with a warning."""
    for unfinished in sorted(epath.Path(directory).glob(_UNFINISHED)) if epath.Path(directory).exists() else []:
        logging.warning("removing %s: a save that did not finish (the run stopped while saving)", unfinished)
    keep = [ocp.checkpoint_managers.LatestN(n=train_config.keep_last)]
    if train_config.keep_best:
        name = train_config.keep_best
        keep.append(
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[name],
                reverse=config_lib.EVAL_METRICS[name] == "min",  # BestN keeps the largest after sorting
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=train_config.async_checkpoints,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
    )
    return ocp.CheckpointManager(
        epath.Path(directory).absolute(),
        options=options,
        item_names=_ITEMS,
        item_handlers={"data": grain.checkpoint.CheckpointHandler()},
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    data_iterator,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float] | None = None,
):
    """Saves `state` (a pytree of arrays), the iterator's position, `config` and the state's digest as checkpoint
    `step`, ranked by `metrics` for keep_best. Returns at once with async checkpoints (after the digest, one pass
    over the state); the arrays are copied first, so the caller may donate or overwrite them."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config.to_dict()),
            digest=ocp.args.JsonSave(state_digest(state)),
        ),
        metrics=metrics,
        force=True,
    )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state, data_iterator, config: ml_collections.ConfigDict, steps=None
):
    """Restores the newest readable checkpoint (of `steps` if given, else of all): returns (step, state) with state
    laid out as `abstract_state` (a pytree of jax.ShapeDtypeStruct with shardings), and sets `data_iterator` to the
    saved position; None if there is no readable checkpoint (the iterator then stays where it was). Unreadable
    checkpoints, and those whose state does not match their digest, are skipped with a warning and moved aside. A
    readable checkpoint of another model (its config.model differs from `config`'s) raises ValueError: resuming it
    would need its config, starting afresh a new work dir."""
    start = data_iterator.get_state()
    model_config = json.loads(json.dumps(config.model.to_dict()))  # as saved: tuples become lists
    for step in sorted(manager.all_steps() if steps is None else steps, reverse=True):
        try:
            saved_model, restored = _read_config(manager, step)["model"], None
            if saved_model == model_config:
                has_digest = (manager.directory / str(step) / "digest").exists()  # not in checkpoints before it
                items = {"digest": ocp.args.JsonRestore()} if has_digest else {}
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                        **items,
                    ),
                )
                if has_digest and state_digest(restored["state"]) != restored["digest"]:
                    raise ValueError("the restored state does not match the digest saved with it")
        except Exception as error:  # any failure to read means: not this checkpoint
            aside = _set_aside(manager, step)
            logging.warning(
                "checkpoint %d is unreadable (%s: %s); moved to %s, trying the previous one",
                step, type(error).__name__, error, aside,
            )  # fmt: skip
            continue
        if restored is None:
            differ = sorted(
                k for k in model_config.keys() | saved_model.keys() if model_config.get(k) != saved_model.get(k)
            )
            raise ValueError(
                f"{manager.directory / str(step)} is a checkpoint of another model: config.model differs in {differ}; "
                "resume it with its own config (config.json of its work dir) or train in a new work dir"
            )
        return step, restored["state"]
    data_iterator.set_state(start)  # a failed restore may have moved it
    return None


def _read_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with checkpoint `step`, as a dict of JSON values."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def _set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves checkpoint `step` out of the manager's directory into corrupt_checkpoints/ beside it (so that a later
    save of the same step can happen) and returns where it went."""
    target = manager.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(manager.directory / str(step)), str(target))
    multihost_utils.sync_global_devices(f"edarnn set aside checkpoint {step}")
    manager.reload()
    return target
