"""Sharding: mesh sizes, the logical-name table, parameter names, and a sharded forward + grad on 8 simulated CPU
devices (data x fsdp x tensor = 2 x 2 x 2) that matches one device."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import fast_compile_environment
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_model import tiny_config

from edarnn import model as M
from edarnn import sharding


@pytest.mark.parametrize(
    "mesh_config, devices, shape",
    [({}, 8, (8, 1, 1)), ({"fsdp": 2, "tensor": 2}, 8, (2, 2, 2)), ({"data": 1, "fsdp": -1}, 4, (1, 4, 1))],
)
def test_mesh_shape(mesh_config, devices, shape):
    assert sharding.mesh_shape(mesh_config, devices) == shape


@pytest.mark.parametrize(
    "mesh_config, message",
    [
        ({"data": -1, "fsdp": -1}, "at most one axis"),
        ({"fsdp": 3}, "does not divide"),
        ({"data": 2, "fsdp": 2}, "must equal"),
        ({"tensor": 0}, "config.mesh.tensor"),
        ({"data": 2.0}, "config.mesh.data"),
    ],
)
def test_mesh_shape_errors(mesh_config, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(mesh_config, 8)


def test_logical_names_map_through_the_table():
    mesh = sharding.make_mesh({})  # one CPU device: (1, 1, 1)
    assert mesh.axis_names == sharding.AXES
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    assert sharding.logical_to_sharding(("embed", "heads", "kv"), mesh).spec == P("fsdp", "tensor", None)
    with pytest.raises(ValueError, match="twice"):
        sharding.logical_to_sharding(("batch", "embed"), mesh)
    with pytest.raises(ValueError, match="unknown logical axis name"):
        sharding.logical_to_sharding(("embedding",), mesh)
    # a dimension the mesh axes do not divide is replicated
    assert sharding._spec(("vocab", "embed"), (11, 8), {"data": 1, "fsdp": 2, "tensor": 2}) == P(None, "fsdp")


def test_constrain_is_a_no_op_without_a_mesh():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, "batch", "length") is x


def test_every_parameter_has_logical_names():
    config = tiny_config(n_layers=len(M.MIXER_KINDS), layers=list(M.MIXER_KINDS))
    state = nnx.state(nnx.eval_shape(lambda: M.LM(config, rngs=nnx.Rngs(0))), nnx.Param)
    known = {name for name, _ in sharding.LOGICAL_RULES} | {None}
    params = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Param))
    for param in params:
        names = param.get_metadata().get("out_sharding")
        assert names is not None and len(names) == param.ndim and set(names) <= known, (param.shape, names)
    shardings = jax.tree.leaves(sharding.model_shardings(state, sharding.make_mesh({})))
    assert len(shardings) == len(params)


SHARDED_RUN = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from edarnn import model as M, sharding
sys.path.insert(0, "tests")
from conftest import COMPILER_OPTIONS, relative_error  # the suite's settings: float64 enabled, fast compiles
from test_model import loss, tiny_config

config = tiny_config(n_layers=2, layers=["eda_channel", "swa"], vocab_size=12)
graphdef, state = nnx.split(M.LM(config, rngs=nnx.Rngs(0)))
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, 12, (8, 21)), jnp.int32)
segment_ids = jnp.asarray(np.repeat([[1] * 7 + [2] * 14], 8, axis=0), jnp.int32)
step = jax.value_and_grad(lambda state, t, s: loss(graphdef, state, t, s))
single = jax.jit(step, compiler_options=COMPILER_OPTIONS)(state, tokens, segment_ids)

mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
shardings, batch = sharding.model_shardings(state, mesh), sharding.batch_sharding(mesh)
with jax.set_mesh(mesh):
    sharded_step = jax.jit(
        step,
        in_shardings=(shardings, batch, batch),
        out_shardings=(sharding.logical_to_sharding((), mesh), shardings),
        compiler_options=COMPILER_OPTIONS,
    )
    args = jax.device_put((state, tokens, segment_ids), (shardings, batch, batch))
    sharded = sharded_step(*args)

grads = jax.tree.leaves(sharded[1])
print(json.dumps({
    "devices": jax.device_count(),
    "loss": [float(single[0]), float(sharded[0])],
    "grad_error": max(jax.tree.leaves(jax.tree.map(relative_error, sharded[1], single[1]))),
    "split_over_devices": sum(g.addressable_shards[0].data.size < g.size for g in grads),
    "specs": sorted({str(g.sharding.spec) for g in grads}),
}))
"""


def test_sharded_forward_and_grad_match_one_device():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = fast_compile_environment(devices=8)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", SHARDED_RUN], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    single, sharded = result["loss"]
    assert sharded == pytest.approx(single, rel=1e-5)
    assert result["grad_error"] <= 1e-4
    # the parameters really are split: along fsdp, tensor and both
    specs = result["specs"]
    assert result["split_over_devices"] > 0 and "P('fsdp', 'tensor')" in specs, specs
    assert any("'tensor'" in s and "fsdp" not in s for s in specs) and any("'fsdp'" in s for s in specs), specs
