"""Sharding as data: a (data, fsdp, tensor) device mesh, logical axis names and one table that maps them.

Parameters carry logical names in their `out_sharding` metadata (one name, or None, per dimension; set by
edarnn.model); activations are constrained with `constrain(x, *names)`. LOGICAL_RULES maps each name onto mesh
axes, so changing the parallelism is a change of the mesh sizes in the config, not of the model code:

    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    the batch is split *and* parameters are sharded along their "embed" dimension (gathered per use)
    tensor  heads, MLP width and vocabulary are split (Megatron-style tensor parallelism)

A dimension whose size the mapped mesh axes do not divide is replicated instead (e.g. a 257-byte vocabulary on
tensor = 2), so that any model runs on any mesh; the memory saving is then lost for that array only.

Use: `mesh = make_mesh(config.mesh)`; place the model state with `jax.device_put(state, model_shardings(state,
mesh))` and batches with `batch_sharding(mesh)`; trace and run the step under `with jax.set_mesh(mesh):` so that
`constrain` sees the mesh (without an active mesh it does nothing: single-device code is unchanged).
"""

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated)
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),  # activations' batch dimension
    ("length", None),  # activations' time dimension
    ("act_embed", None),  # activations' model dimension (the batch already uses fsdp)
    ("embed", "fsdp"),  # parameters' model dimension: FSDP shards the weights along it
    ("heads", "tensor"),  # heads (parameters and activations)
    ("kv", None),  # width of one head (K or V)
    ("mlp", "tensor"),  # SwiGLU hidden width
    ("vocab", "tensor"),  # vocabulary
)
_RULES = dict(LOGICAL_RULES)
_DEFAULT_SIZES = {"data": -1, "fsdp": 1, "tensor": 1}


def mesh_shape(mesh_config, device_count: int) -> tuple[int, ...]:
    """The (data, fsdp, tensor) sizes of `mesh_config` (a mapping with optional keys data = -1, fsdp = 1,
    tensor = 1; -1 = the devices the other axes leave) for `device_count` devices."""
    sizes = {axis: mesh_config.get(axis, default) for axis, default in _DEFAULT_SIZES.items()}
    for axis, size in sizes.items():
        if type(size) is not int or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis} must be a positive int or -1 (the rest of the devices); got {size!r}")
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1 (the rest of the devices); got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if device_count % fixed:
            raise ValueError(
                f"config.mesh: the fixed axis sizes {sizes} multiply to {fixed}, which does not divide the "
                f"{device_count} devices"
            )
        sizes[rest[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(
            f"config.mesh: data x fsdp x tensor = {fixed} must equal the {device_count} devices; got {sizes} "
            "(set one axis to -1 to use the rest)"
        )
    return tuple(sizes[axis] for axis in AXES)


def make_mesh(mesh_config) -> Mesh:
    """A Mesh over all devices (of all hosts after jax.distributed.initialize) with axes AXES, sizes from
    `mesh_config` (see mesh_shape); axes of type Auto (the compiler propagates shardings between constraints)."""
    shape = mesh_shape(mesh_config, jax.device_count())
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _spec(logical_names: Sequence[str | None], shape: Sequence[int] | None, axis_sizes: dict) -> PartitionSpec:
    """The PartitionSpec of an array with these logical names (one per dimension); with a `shape`, a dimension
    that its mesh axes do not divide is replicated. Mesh axes the mesh does not have are skipped."""
    if shape is not None and len(logical_names) != len(shape):
        raise ValueError(f"{len(logical_names)} logical names {tuple(logical_names)} for an array of shape {shape}")
    used, entries = set(), []
    for dim, name in enumerate(logical_names):
        if name is not None and name not in _RULES:
            raise ValueError(f"unknown logical axis name {name!r}; LOGICAL_RULES names {tuple(_RULES)}")
        axes = _RULES.get(name)
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in axis_sizes)
        if used.intersection(axes):
            raise ValueError(f"logical names {tuple(logical_names)} map mesh axes {sorted(used & set(axes))} twice")
        if shape is not None and shape[dim] % math.prod(axis_sizes[a] for a in axes):
            axes = ()
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def logical_to_sharding(logical_names: Sequence[str | None], mesh: Mesh) -> NamedSharding:
    """The NamedSharding on `mesh` of an array whose dimensions have these logical names (None: replicated)."""
    return NamedSharding(mesh, _spec(logical_names, None, dict(mesh.shape)))


def constrain(x: jax.Array, *logical_names: str | None) -> jax.Array:
    """x with a sharding constraint from its logical names (one per dimension) under the mesh made active by
    `jax.set_mesh`; x unchanged without an active mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _spec(logical_names, x.shape, dict(mesh.shape)))


def model_shardings(model_state, mesh: Mesh):
    """NamedShardings for every array of `model_state` (an nnx.State, or any pytree of nnx.Variables and arrays,
    e.g. an nnx.Optimizer's state, whose variables copy their parameter's metadata), from each variable's
    `out_sharding` logical names; arrays without names are replicated. The result has the structure of
    `model_state` (each Variable holding its NamedSharding), for jax.device_put and jit's in/out_shardings."""
    axis_sizes = dict(mesh.shape)

    def sharding(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding") or (None,) * x.ndim
            return x.replace(NamedSharding(mesh, _spec(names, x.shape, axis_sizes)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, model_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a [B, T] batch (tokens, targets, segment ids, masks): B split over data x fsdp."""
    return logical_to_sharding(("batch", "length"), mesh)
