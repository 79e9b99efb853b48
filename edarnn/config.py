"""The training config: every field with its default (`defaults`), and the checks run at the start of a run
(`resolve`).

A config file `configs/<name>.py` defines `get_config(arg=None)`: it starts from `defaults()` and sets what its
experiment needs. Fields (ml_collections.ConfigDict):

    seed                   int; seeds the parameters and both data splits
    model.*                the model (edarnn.model.LM): vocab_size (0 = the data source's), d_model, n_layers,
                           layers (mixer pattern, repeated to n_layers), n_heads, head_dim_k, head_dim_v,
                           conv_size, window, d_ff, tie_embeddings, norm_eps, rule_impl, chunk_size,
                           dtype (compute; parameters are float32), remat
    data.*                 the data (edarnn.data): source, seq_len, batch_size (global, in sequences), and a
                           sub-config per source
    train.steps            optimizer updates
    train.lr, warmup_steps, min_lr_ratio
                           AdamW learning rate: linear warmup from 0 to lr over warmup_steps, then cosine decay
                           to lr * min_lr_ratio at `steps`
    train.weight_decay, b1, b2
                           AdamW (decay on matrices only)
    train.grad_clip        global-norm clipping threshold (0 = none)
    train.grad_accum       micro-batches per update (a scan inside the step; batch_size must divide)
    train.log_every        steps between logged training metrics (averaged over the steps since the last log)
    train.eval_every       steps between evaluations (and at the last step); 0 = only at the end
    train.eval_batches     batches of the held-out split per evaluation
    train.checkpoint_every steps between checkpoints (and at the end, and on SIGTERM / Ctrl-C); 0 = only those
    train.keep_last        the newest checkpoints kept
    train.keep_best        "" or an evaluation metric ("eval_loss", "eval_accuracy"): also keep the best checkpoint
    train.async_checkpoints
                           save in a background thread while training goes on
    mesh.data, fsdp, tensor
                           device mesh axis sizes; -1 = the devices left over (at most one axis)
    mesh.distributed       call jax.distributed.initialize() first (multi-host)
"""

import ml_collections

from edarnn import data, model, sharding

EVAL_METRICS = {"eval_loss": "min", "eval_accuracy": "max"}
"""Metrics that config.train.keep_best may name, with whether lower or higher is better."""


def defaults() -> ml_collections.ConfigDict:
    """Every config field at its default: a small EDA model on multi-query associative recall, all devices data
    parallel."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=0,
            d_model=64,
            n_layers=2,
            layers=("eda",),
            n_heads=2,
            head_dim_k=32,
            head_dim_v=32,
            conv_size=4,
            window=64,
            d_ff=128,
            tie_embeddings=True,
            norm_eps=1e-6,
            rule_impl="auto",
            # None: the rule's (rules.chunk_tokens); an int field: --config.model.chunk_size=32 sets it, None is
            # only set in a config file
            chunk_size=ml_collections.config_dict.placeholder(int),
            dtype="float32",
            remat=False,
        )
    )
    config.data = data.default_config()
    config.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            lr=1e-3,
            warmup_steps=100,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            grad_clip=1.0,
            grad_accum=1,
            log_every=50,
            eval_every=200,
            eval_batches=4,
            checkpoint_every=200,
            keep_last=2,
            keep_best="",
            async_checkpoints=True,
        )
    )
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, distributed=False))
    return config


def _require(condition: bool, field: str, message: str):
    if not condition:
        raise ValueError(f"config.{field}: {message}")


def resolve(
    config: ml_collections.ConfigDict, device_count: int = 1, process_count: int = 1
) -> ml_collections.ConfigDict:
    """A checked copy of `config` for a run on `device_count` devices in `process_count` processes, with
    model.vocab_size set to the data source's where it is 0. Raises ValueError naming the first invalid field.

    The model's fields are checked by edarnn.model.check_config, the data source's by edarnn.data (its fields here,
    the rest when the loaders are made), the mesh's by edarnn.sharding.mesh_shape; here the training fields and
    what ties the sections together: the batch splits into grad_accum micro-batches of whole sequences on every
    data x fsdp device and into equal parts per process."""
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked; the caller's config is left as it was
    seq_len = config.data.seq_len
    _require(type(seq_len) is int and seq_len > 0, "data.seq_len", f"must be a positive int; got {seq_len!r}")
    source_vocab = data.vocab_size(config.data)
    if not config.model.vocab_size:
        config.model.vocab_size = source_vocab
    model.check_config(config.model)
    _require(
        config.model.vocab_size >= source_vocab,
        "model.vocab_size",
        f"must cover the data source's {source_vocab} token ids (0: take them); got {config.model.vocab_size}",
    )
    data_parallel, fsdp, _ = sharding.mesh_shape(config.mesh, device_count)

    train = config.train
    for name in ("steps", "log_every", "eval_batches", "keep_last", "grad_accum"):
        value = train[name]
        _require(type(value) is int and value > 0, f"train.{name}", f"must be a positive int; got {value!r}")
    for name in ("eval_every", "checkpoint_every"):
        value = train[name]
        _require(
            type(value) is int and value >= 0,
            f"train.{name}",
            f"must be an int >= 0 (0: only at the end); got {value!r}",
        )
    _require(train.lr > 0, "train.lr", f"must be > 0; got {train.lr}")
    _require(
        0 <= train.warmup_steps < train.steps,
        "train.warmup_steps",
        f"must be in [0, train.steps = {train.steps}) (the cosine decay needs a step); got {train.warmup_steps}",
    )
    _require(0 <= train.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1]; got {train.min_lr_ratio}")
    _require(train.weight_decay >= 0, "train.weight_decay", f"must be >= 0; got {train.weight_decay}")
    for name in ("b1", "b2"):
        _require(0 <= train[name] < 1, f"train.{name}", f"must be in [0, 1); got {train[name]}")
    _require(train.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0: no clipping); got {train.grad_clip}")
    if train.keep_best:
        _require(
            train.keep_best in EVAL_METRICS,
            "train.keep_best",
            f"must be '' or one of {tuple(EVAL_METRICS)}; got {train.keep_best!r}",
        )
        _require(
            train.eval_every > 0 and train.checkpoint_every % train.eval_every == 0,
            "train.checkpoint_every",
            f"must be a multiple of train.eval_every = {train.eval_every} with keep_best (a checkpoint is ranked by "
            f"the evaluation at its step); got {train.checkpoint_every}",
        )

    batch_size, shards = config.data.batch_size, data_parallel * fsdp
    _require(
        type(batch_size) is int and batch_size > 0 and batch_size % (shards * train.grad_accum) == 0,
        "data.batch_size",
        f"must be a positive multiple of mesh data x fsdp = {shards} devices times train.grad_accum = "
        f"{train.grad_accum} (every device gets whole sequences of every micro-batch); got {batch_size!r}",
    )
    _require(
        batch_size % process_count == 0,
        "data.batch_size",
        f"must be divisible by the {process_count} processes; got {batch_size}",
    )
    return config
