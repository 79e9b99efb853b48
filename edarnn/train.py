"""Trains an edarnn language model: the project's main job.

    python -m edarnn.train [--config configs/default.py[:arg]] [--workdir runs/NAME] [--config.train.steps=200 ...]

Without --config it runs configs/default.py (a small EDA model on multi-query associative recall); without
--workdir it writes to runs/<date-time>. Any config field can be overridden as --config.<path>=<value>. A work
dir that holds checkpoints is resumed from its newest readable one.

One path, top to bottom (`train`): validate the config; build the device mesh, the model and AdamW, their state
laid out on the mesh by the parameters' logical axes; restore the newest readable checkpoint of the work dir;
then loop: a batch, the jitted train step (state donated), metrics every train.log_every steps, evaluation on
the held-out split every train.eval_every, a checkpoint every train.checkpoint_every; at the end, or on
SIGTERM / Ctrl-C, a last checkpoint.

Work dir: config.json (the exact config of the run), metrics.jsonl and tensorboard/ (edarnn.metrics),
checkpoints/<step>/ (edarnn.checkpoint).
"""

import functools
import itertools
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from edarnn import checkpoint, data, model, sharding
from edarnn import config as config_lib
from edarnn import metrics as metrics_lib

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.py"


# ----------------------------------------------------------------------------------------------------------
# the optimizer and the steps
# ----------------------------------------------------------------------------------------------------------


def make_optimizer(train_config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (weight decay on matrices only) after global-norm clipping, with the learning rate warming up
    linearly from 0 to train.lr over train.warmup_steps and decaying along a cosine to train.lr *
    train.min_lr_ratio at train.steps. Returns (optimizer, schedule: update index -> learning rate)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.lr,
        warmup_steps=train_config.warmup_steps,
        decay_steps=train_config.steps,
        end_value=train_config.lr * train_config.min_lr_ratio,
    )
    adamw = optax.adamw(
        schedule,
        b1=train_config.b1,
        b2=train_config.b2,
        weight_decay=train_config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    clip = optax.clip_by_global_norm(train_config.grad_clip) if train_config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "loss_mask": jnp.float32}
"""The arrays of a training batch, each [B, T]; segment_ids may be left out (one document per row)."""


def scored_sums(logits: jax.Array, batch: dict[str, jax.Array]):
    """Cross-entropy of `logits` [B, T, vocab] summed over the scored positions of `batch` (arrays [B, T];
    loss_mask 1 where scored). Returns (loss sum, (correct predictions, scored positions)), float32 scalars."""
    mask = batch["loss_mask"].astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(losses * mask), (jnp.sum(correct * mask), jnp.sum(mask))


def loss_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]):
    """scored_sums of the model's logits on `batch`: (loss sum, (correct predictions, scored positions))."""
    return scored_sums(nnx.merge(graphdef, params)(batch["inputs"], batch.get("segment_ids")), batch)


def query_sums(scored: jax.Array, right: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(queries, queries answered right), float32 scalars, from scored and right [B, T] bool: a query is a run of
    consecutive scored positions of a row (an answer of several tokens), right when all its positions are."""
    wrong = (scored & ~right).astype(jnp.int32)
    starts = scored & ~jnp.pad(scored[:, :-1], ((0, 0), (1, 0)))
    ends = scored & ~jnp.pad(scored[:, 1:], ((0, 0), (0, 1)))
    wrong_so_far = jnp.cumsum(wrong, axis=1)
    # at each position: the errors counted before the start of the latest query (the count only grows)
    before_query = jax.lax.cummax(jnp.where(starts, wrong_so_far - wrong, 0), axis=1)
    correct = ends & (wrong_so_far == before_query)
    return jnp.sum(ends).astype(jnp.float32), jnp.sum(correct).astype(jnp.float32)


def eval_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The sums an evaluation adds up over batches (float32 scalars): loss (cross-entropy over the scored
    positions), correct (scored positions predicted right), scored, queries (runs of consecutive scored positions
    in a row: one per query, whose answer may be several tokens) and queries_correct (queries with every position
    right)."""
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch.get("segment_ids"))  # [B, T, vocab] float32
    loss, (correct, scored) = scored_sums(logits, batch)
    right = jnp.argmax(logits, axis=-1) == batch["targets"]
    queries, queries_correct = query_sums(batch["loss_mask"] > 0, right)
    return {
        "loss": loss,
        "correct": correct,
        "scored": scored,
        "queries": queries,
        "queries_correct": queries_correct,
    }


def evaluate(eval_step, batches) -> dict[str, float]:
    """Metrics over `batches` (an iterable of batches as eval_step takes them) from eval_step (a jitted eval_sums
    of the parameters): eval_loss and eval_accuracy over the scored positions, eval_query_accuracy (exact match
    of whole answers)."""
    totals = jax.tree.map(lambda *xs: float(sum(xs)), *[eval_step(batch) for batch in batches])
    return {
        "eval_loss": totals["loss"] / max(totals["scored"], 1.0),
        "eval_accuracy": totals["correct"] / max(totals["scored"], 1.0),
        "eval_query_accuracy": totals["queries_correct"] / max(totals["queries"], 1.0),
    }


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, grad_accum: int):
    """(params, opt_state, batch) -> (params, opt_state, metrics): one update of `optimizer` from the mean loss over
    the scored positions of the batch, its gradient summed over `grad_accum` micro-batches by a scan (so the update
    equals that of the whole batch at once). Micro-batch j takes rows j, j + grad_accum, ... so that every device
    holds its share of each. metrics: loss, accuracy (on the scored positions), grad_norm (before clipping)."""

    def train_step(params, opt_state, batch):
        micro_batches = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(sums, micro_batch):
            micro_batch = {name: sharding.constrain(x, "batch", "length") for name, x in micro_batch.items()}
            (loss, (correct, count)), grads = jax.value_and_grad(loss_sums, has_aux=True)(params, graphdef, micro_batch)
            return jax.tree.map(jnp.add, sums, (grads, loss, correct, count)), None

        zero = jnp.zeros((), jnp.float32)
        sums = (jax.tree.map(jnp.zeros_like, params), zero, zero, zero)
        (grads, loss, correct, count), _ = jax.lax.scan(accumulate, sums, micro_batches)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (
            params,
            opt_state,
            {"loss": loss / count, "accuracy": correct / count, "grad_norm": optax.tree.norm(grads)},
        )

    return train_step


# ----------------------------------------------------------------------------------------------------------
# state on the mesh
# ----------------------------------------------------------------------------------------------------------


def state_shardings(state_shapes: dict, mesh: jax.sharding.Mesh) -> dict:
    """NamedShardings for {"params", "opt_state"}: parameters by their logical axes; in the optimizer state
    every tree shaped like the parameters (Adam's moments) as the parameters, the rest (step counts) replicated."""
    params = sharding.model_shardings(state_shapes["params"], mesh)
    like_params = jax.tree.structure(state_shapes["params"])
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(
        lambda sub: params if jax.tree.structure(sub) == like_params else replicated,
        state_shapes["opt_state"],
        is_leaf=lambda sub: jax.tree.structure(sub) == like_params,
    )
    return {"params": params, "opt_state": opt_state}


def compile_train_step(graphdef, optimizer, grad_accum: int, shardings: dict, state: dict, batch_shapes: dict):
    """make_train_step jitted with the state's `shardings` (state_shardings; the state donated) and compiled ahead
    of time for `state` ({"params", "opt_state"}, arrays or shapes) and batches like `batch_shapes` ({name:
    jax.ShapeDtypeStruct with its sharding}). Call it under `jax.set_mesh` (the model's sharding constraints)."""
    batch_shardings = {name: shape.sharding for name, shape in batch_shapes.items()}
    return (
        jax.jit(
            make_train_step(graphdef, optimizer, grad_accum),
            in_shardings=(shardings["params"], shardings["opt_state"], batch_shardings),
            out_shardings=(shardings["params"], shardings["opt_state"], None),
            donate_argnums=(0, 1),
        )
        .lower(state["params"], state["opt_state"], batch_shapes)
        .compile()
    )


class _StopRequest:
    """Turns SIGTERM and the first Ctrl-C into a request to stop after the current step (and save); a second
    Ctrl-C interrupts at once. Restores the previous handlers on exit."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.tqdm.write(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint")

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


def make_loader(config: ml_collections.ConfigDict, split: str, seq_len: int | None = None):
    """This process's share of the batches of `split` of config.data (edarnn.data.make_loader), rows of
    `seq_len` tokens (default config.data.seq_len)."""
    return data.make_loader(
        config.data,
        split=split,
        seed=config.seed,
        batch_size=config.data.batch_size,
        seq_len=seq_len or config.data.seq_len,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """A batch as global arrays laid out by `sharding`, from this process's rows."""
    return {name: jax.make_array_from_process_local_data(sharding, x) for name, x in local.items()}


def init_or_restore(config, mesh, optimizer, manager=None, train_iterator=None, steps=None):
    """The model's graph, the state's shardings and the training state {"params", "opt_state"} laid out on `mesh`:
    restored from the newest readable checkpoint of `manager` (among `steps` if given; this also sets
    `train_iterator`), else (or without a manager) freshly initialised from config.seed. Returns (graphdef,
    shardings, state, step)."""

    def init_state():  # for the shapes only: fresh_state draws the values
        params = nnx.state(model.LM(config.model, rngs=nnx.Rngs(config.seed)), nnx.Param)
        return {"params": params, "opt_state": optimizer.init(params)}

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model.LM(config.model, rngs=nnx.Rngs(config.seed))))
    shapes = jax.eval_shape(init_state)
    shardings = state_shardings(shapes, mesh)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    restored = None
    if manager is not None:
        restored = checkpoint.restore_latest(manager, abstract_state, train_iterator, config, steps)
    if restored is None:
        return graphdef, shardings, fresh_state(config, optimizer, shardings), 0
    step, state = restored
    return graphdef, shardings, state, step


def fresh_state(config, optimizer, shardings) -> dict:
    """The training state {"params", "opt_state"} initialised from config.seed and laid out by `shardings`.

    The parameters are drawn op by op on the host's CPU and then placed shard by shard: eagerly, each random draw
    compiles once per distinct shape, where one jitted initialiser compiles every parameter's draw as a kernel of
    its own (a ~125M model took 5 minutes to compile on a GPU). Every process draws the same values from the seed."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        drawn = nnx.state(model.LM(config.model, rngs=nnx.Rngs(config.seed)), nnx.Param)
    params = jax.tree.map(_place, drawn, shardings["params"])
    return {"params": params, "opt_state": jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)}


def _place(value: jax.Array, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes training in `workdir`) as `config` says; returns the last evaluation's metrics."""
    if config.mesh.distributed:
        jax.distributed.initialize()
    config = config_lib.resolve(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(config.mesh)
    main_process = jax.process_index() == 0
    say = print if main_process else lambda *args: None
    os.makedirs(workdir, exist_ok=True)
    if main_process:
        Path(workdir, "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    tc, seq_len, batch_size = config.train, config.data.seq_len, config.data.batch_size

    batch_sharding = sharding.batch_sharding(mesh)
    global_batch = functools.partial(to_global, sharding=batch_sharding)
    optimizer, schedule = make_optimizer(tc)
    train_iterator, eval_loader = iter(make_loader(config, "train")), make_loader(config, "eval")
    manager = checkpoint.make_manager(os.path.join(os.path.abspath(workdir), "checkpoints"), tc)
    graphdef, shardings, state, step = init_or_restore(config, mesh, optimizer, manager, train_iterator)
    if step:
        say(f"resumed from {workdir}/checkpoints/{step}")
    params, opt_state = state["params"], state["opt_state"]

    flops_per_token = model.flops_per_token(config.model, seq_len)
    device_kind, n_devices = jax.devices()[0].device_kind, jax.device_count()
    tokens_per_step = batch_size * seq_len
    say(
        f"model: {model.count_params(nnx.merge(graphdef, params)):,} parameters, {config.model.n_layers} layers "
        f"of {list(config.model.layers)}, {flops_per_token:.3g} training FLOPs/token\n"
        f"mesh: {dict(mesh.shape)} over {n_devices} {device_kind} device(s), {jax.process_count()} process(es); "
        f"{tokens_per_step:,} tokens/step; work dir {workdir}"
    )

    with jax.set_mesh(mesh), _StopRequest() as stop:  # the mesh for the model's sharding constraints
        compile_start = time.perf_counter()
        batch_shapes = {
            name: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=batch_sharding)
            for name, dtype in BATCH_DTYPES.items()
        }
        train_step = compile_train_step(graphdef, optimizer, tc.grad_accum, shardings, state, batch_shapes)
        eval_step = jax.jit(lambda params, batch: eval_sums(params, graphdef, batch))
        say(f"train step compiled in {time.perf_counter() - compile_start:.1f} s")

        writer = metrics_lib.Writer(workdir, enabled=main_process)
        saved_step, last_eval, evaluated_step = step, {}, None
        pending, interval_start = [], time.perf_counter()  # per-step metrics since the last log; their start time
        with tqdm.tqdm(total=tc.steps, initial=step, disable=not main_process or None) as bar:
            while step < tc.steps and not stop.requested:
                params, opt_state, step_metrics = train_step(params, opt_state, global_batch(next(train_iterator)))
                pending.append(step_metrics)
                step += 1
                bar.update()
                if step % tc.log_every == 0 or step == tc.steps:
                    means = jax.tree.map(lambda *xs: float(np.mean(xs)), *jax.device_get(pending))
                    tokens_per_s = len(pending) * tokens_per_step / (time.perf_counter() - interval_start)
                    means |= {
                        "lr": float(schedule(step - 1)),
                        "tokens_per_s": tokens_per_s,
                        "mfu": metrics_lib.mfu(flops_per_token, tokens_per_s, device_kind, n_devices),
                    }
                    writer.write(step, means)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", accuracy=f"{means['accuracy']:.3f}")
                    pending, interval_start = [], time.perf_counter()
                evaluate_now = step == tc.steps or (tc.eval_every and step % tc.eval_every == 0)
                save_now = step == tc.steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
                if evaluate_now or save_now:  # their time is not training time
                    jax.block_until_ready(params)
                    pause_start = time.perf_counter()
                    if evaluate_now:
                        eval_batches = map(global_batch, itertools.islice(eval_loader, tc.eval_batches))
                        last_eval = evaluate(functools.partial(eval_step, params), eval_batches)
                        evaluated_step = step
                        writer.write(step, last_eval)
                    if save_now:
                        state = {"params": params, "opt_state": opt_state}
                        ranked = last_eval if evaluated_step == step else None
                        checkpoint.save(manager, step, state, train_iterator, config, metrics=ranked)
                        saved_step = step
                    interval_start += time.perf_counter() - pause_start
                if jax.process_count() > 1 and manager.reached_preemption(step):
                    stop.requested = True
            if step != saved_step:  # stopped early
                checkpoint.save(manager, step, {"params": params, "opt_state": opt_state}, train_iterator, config)
        manager.close()
    writer.close()
    say(f"done at step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
    return last_eval


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG), "config file, optionally with :arg (e.g. configs/mqar.py:gdn2)"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "work dir (resumed if it holds checkpoints); default runs/<date-time>")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they write at INFO
    train(_CONFIG.value, _WORKDIR.value or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))


if __name__ == "__main__":
    app.run(main)
