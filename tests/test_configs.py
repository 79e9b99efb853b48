"""The config files in configs/ and the checks of edarnn.config: every config resolves, the MQAR variants are
matched in size, the 125M config has ~125M parameters, invalid fields fail naming the field, command-line
overrides reach the config."""

import importlib.util
import pathlib

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from edarnn import config as config_lib
from edarnn import data, model

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load(name: str, arg: str | None = None):
    """configs/<name>.py's get_config(arg), loaded from its file as the command line does."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def n_params(model_config) -> int:
    return model.count_params(nnx.eval_shape(lambda: model.LM(model_config, rngs=nnx.Rngs(0))))


ALL = [
    ("default", None),
    *(("mqar", mixer) for mixer in model.MIXER_KINDS),
    *(
        ("editing", f"{mixer},{task}")
        for mixer in ("eda", "gdn2")
        for task in ("edit_rebind", "edit_records", "edit_retract")
    ),
    ("bytes_lm", None),
    *(("lm_125m", arch) for arch in ("eda", "gdn2", "hybrid", "attention")),
]


def test_every_config_file_is_listed():
    assert {path.stem for path in CONFIGS.glob("*.py")} == {name for name, _ in ALL}


@pytest.mark.parametrize(("name", "arg"), ALL)
def test_configs_resolve(name, arg):
    config = config_lib.resolve(load(name, arg), device_count=1)
    assert config.model.vocab_size > 0
    if name == "mqar":
        assert tuple(config.model.layers) == (arg,)


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("default", None),
        ("mqar", "eda"),
        *(("editing", f"eda,{t}") for t in ("edit_rebind", "edit_records", "edit_retract")),
    ],
)
def test_mqar_configs_make_batches(name, arg):
    """The task settings fit the rows (edarnn.data checks them when the loader is made; the mqar variants share
    them)."""
    config = load(name, arg)
    loader = data.make_loader(config.data, split="eval", seed=0, batch_size=2, seq_len=config.data.seq_len)
    batch = next(iter(loader))
    assert batch["inputs"].shape == (2, config.data.seq_len) and batch["loss_mask"].sum() > 0


def test_mqar_variants_are_matched():
    sizes = {
        mixer: {field: load("mqar", mixer).model[field] for field in ("d_model", "n_heads", "head_dim_k", "head_dim_v")}
        for mixer in model.MIXER_KINDS
    }
    assert len({tuple(size.values()) for size in sizes.values()}) == 1, sizes
    assert load("editing", "kda,edit_retract").model == load("mqar", "kda").model  # the same models on editing


@pytest.mark.parametrize("arch", ["eda", "gdn2", "hybrid", "attention"])
def test_lm_125m_has_125m_parameters(arch):
    count = n_params(config_lib.resolve(load("lm_125m", arch)).model)
    print(f"lm_125m:{arch}: {count:,} parameters")
    assert abs(count - 125e6) < 0.03 * 125e6


def test_bad_config_arguments():
    with pytest.raises(ValueError, match="expected one of"):
        load("mqar", "edaa")
    with pytest.raises(ValueError, match="expected one of"):
        load("lm_125m", "mamba")
    with pytest.raises(ValueError, match="takes no argument"):
        load("default", "x")


def _set(config, path: str, value):
    *parents, last = path.split(".")
    for name in parents:
        config = config[name]
    config[last] = value


@pytest.mark.parametrize(
    ("field", "value", "devices", "message"),
    [
        ("model.layers", ("eda", "edaa"), 1, "config.model.layers"),
        ("model.d_model", 0, 1, "config.model.d_model"),
        ("model.dtype", "float16", 1, "config.model.dtype"),
        ("model.chunk_size", 48, 1, "config.model.chunk_size"),
        ("model.norm_eps", 0.0, 1, "config.model.norm_eps"),
        ("model.norm_eps", -1.0, 1, "config.model.norm_eps"),
        ("model.vocab_size", 5, 1, "config.model.vocab_size"),  # the default's MQAR uses 80 token ids
        ("data.seq_len", 0, 1, "config.data.seq_len"),
        ("data.source", "wiki", 1, "data.source"),
        ("train.steps", 0, 1, "config.train.steps"),
        ("train.lr", 0.0, 1, "config.train.lr"),
        ("train.warmup_steps", 1000, 1, "config.train.warmup_steps"),
        ("train.min_lr_ratio", 1.5, 1, "config.train.min_lr_ratio"),
        ("train.b2", 1.0, 1, "config.train.b2"),
        ("train.keep_best", "loss", 1, "config.train.keep_best"),
        ("train.checkpoint_every", 300, 1, "config.train.checkpoint_every"),  # keep_best, eval_every 200
        ("train.grad_accum", 3, 1, "config.data.batch_size"),  # 32 rows
        ("data.batch_size", 30, 4, "config.data.batch_size"),  # 4 data-parallel devices
        ("mesh.tensor", 3, 8, "config.mesh"),
        ("mesh.fsdp", 0, 1, "config.mesh.fsdp"),
    ],
)
def test_invalid_field_is_named(field, value, devices, message):
    config = load("default")
    config.train.update(keep_best="eval_accuracy", eval_every=200, checkpoint_every=400, steps=1000)
    config_lib.resolve(config, device_count=devices)  # valid as set up
    _set(config, field, value)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        config_lib.resolve(config, device_count=devices)


def test_batch_must_split_over_processes():
    """Two hosts of one device each, tensor parallel across them: the batch of 3 rows cannot be split."""
    config = load("default")
    config.data.batch_size = 3
    config.mesh.update(data=1, tensor=2)
    with pytest.raises(ValueError, match=r"config\.data\.batch_size.*2 processes"):
        config_lib.resolve(config, device_count=2, process_count=2)


def test_resolve_leaves_the_given_config_alone():
    config = load("default")
    resolved = config_lib.resolve(config)
    assert config.model.vocab_size == 0 and resolved.model.vocab_size == 32 + 32 + 16


def _parse(argv: list[str]):
    """The config that `prog argv...` gets through ml_collections' config flag, as edarnn.train defines it."""
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=["prog", *argv])
    values(["prog", *argv])
    return holder.value


def test_command_line_overrides():
    """--config file:arg and --config.x.y=value, as edarnn.train parses them; unknown fields are refused."""
    config = _parse(
        [
            f"--config={CONFIGS / 'mqar.py'}:gdn2",
            "--config.train.steps=7",
            "--config.model.layers=('gdn2', 'swa')",
            "--config.data.mqar.num_pairs=4",
            "--config.model.chunk_size=16",  # None (the rule's) in the defaults: an int field all the same
        ]
    )
    assert (config.train.steps, tuple(config.model.layers), config.data.mqar.num_pairs) == (7, ("gdn2", "swa"), 4)
    assert config.model.chunk_size == 16
    with pytest.raises(Exception, match="stepz"):
        _parse([f"--config={CONFIGS / 'default.py'}", "--config.train.stepz=7"])
