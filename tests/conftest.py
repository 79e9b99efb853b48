"""Shared setup for the edarnn tests: float64, fast CPU compiles, random inputs for every rule variant.

Test modules import the helpers below with `from conftest import ...` (pytest puts tests/ on sys.path).

Variants: each entry of VARIANTS is one way of calling a rule, e.g. "gla-channel" is `gla` with a
per-key-channel log-decay and "eda-bw" is `eda` with the channel gates b, w instead of beta. `make_inputs`
draws random inputs for a variant as a dict of keyword arguments of the rule (q, k, v and its gates), so
that `rules.RULES[rule](**inputs, ...)` calls it.
"""

import functools
import inspect
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edarnn import rules

jax.config.update("jax_enable_x64", True)


# ----------------------------------------------------------------------------------------------------------
# compile speed: XLA compilation dominates this suite's time on CPU
# ----------------------------------------------------------------------------------------------------------


ON_CPU = jax.default_backend() == "cpu"


def _fast_compile_options() -> dict:
    """CPU compiler options that cut compile time several-fold (the fusion emitters are slow to compile small
    programs); empty where this jaxlib does not know them or the backend is not the CPU."""
    if not ON_CPU:
        return {}
    options = {"xla_cpu_use_fusion_emitters": False}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options)(1.0)
    except Exception:  # an unknown option is rejected at compile time
        return {}
    return options


if ON_CPU:  # about halves XLA compile time; the tests check results, not speed
    jax.config.update("jax_disable_most_optimizations", True)

COMPILER_OPTIONS = _fast_compile_options()
jit = functools.partial(jax.jit, compiler_options=COMPILER_OPTIONS)
"""`jax.jit` with the suite's compiler options; use it for every jitted function in the tests."""

FAST_COMPILE_ENV = {
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
}
"""The same fast compiles for a child process (training runs, notebooks), as environment variables."""


def fast_compile_environment(devices: int | None = None) -> dict:
    """os.environ with FAST_COMPILE_ENV for a subprocess, and `devices` simulated CPU devices if given."""
    env = {**os.environ, **FAST_COMPILE_ENV}
    if devices:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return env


# ----------------------------------------------------------------------------------------------------------
# rule variants and random inputs
# ----------------------------------------------------------------------------------------------------------

# variant -> (rule, {gate argument: kind}); kinds: "decay" [B, T, H] / "decay_K" [B, T, H, K] log-decays,
# "gate" [B, T, H] / "gate_K" [B, T, H, K] / "gate_V" [B, T, H, V] gates in (0, 1), "unit" an L2-normalised
# direction [B, T, H, K], None an argument passed as None.
VARIANTS = {
    "linear_attention": ("linear_attention", {}),
    "gla-scalar": ("gla", {"g": "decay"}),
    "gla-channel": ("gla", {"g": "decay_K"}),
    "delta_rule": ("delta_rule", {"beta": "gate"}),
    "gated_delta_rule": ("gated_delta_rule", {"g": "decay", "beta": "gate"}),
    "kda": ("kda", {"g": "decay_K", "beta": "gate"}),
    "gdn2-scalar": ("gdn2", {"g": "decay", "b": "gate", "w": "gate"}),
    "gdn2-channel": ("gdn2", {"g": "decay_K", "b": "gate_K", "w": "gate_V"}),
    "eda-scalar": ("eda", {"e": "unit", "g": "decay", "beta": "gate", "gamma": "gate"}),
    "eda-channel": ("eda", {"e": "unit", "g": "decay_K", "beta": "gate", "gamma": "gate_K"}),
    "eda-bw": (
        "eda",
        {"e": "unit", "g": "decay_K", "beta": None, "gamma": "gate", "b": "gate_K", "w": "gate_V"},
    ),
}

# A bare rule name stands for its variant with channel-wise gates.
ALIASES = {"gla": "gla-channel", "gdn2": "gdn2-channel", "eda": "eda-channel"}

# Default small shapes, shared by the modules so that compiled functions are reused. T = 37: odd and prime,
# three chunks of 16 with a partial tail.
B, T, H, K, V = 2, 37, 2, 8, 6

# Segment lengths per batch row for T = 37 (chunks of 16 start at 0, 16, 32): a segment of length 1 inside a
# chunk (row 0, token 10) and at the last token of a chunk (row 1, token 15); segments that cross chunk
# boundaries.
SEGMENTS = [[10, 1, 14, 12], [15, 1, 14, 7]]


def rule_of(variant: str) -> str:
    return VARIANTS[ALIASES.get(variant, variant)][0]


def positional_names(rule: str) -> list[str]:
    """The rule's array arguments that can be passed positionally (q, k, v, gates), in order."""
    params = inspect.signature(rules.RULES[rule]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def make_inputs(
    variant: str,
    rng: np.random.Generator,
    *,
    T: int,
    B: int = B,
    H: int = H,
    K: int = K,
    V: int = V,
    dtype=jnp.float64,
    max_decay: float = 1.0,
) -> dict:
    """Random keyword inputs of `variant` (a VARIANTS key or a rule name) at shapes B, T, H, K, V:
    q ~ N(0, 1), L2-normalised k and e, v ~ N(0, 1), gates sigmoid(N(0, 1)), log-decays uniform in
    (-max_decay, 0); jnp arrays of `dtype`."""
    _, gates = VARIANTS[ALIASES.get(variant, variant)]
    normal = rng.standard_normal
    draw = {
        "unit": lambda: unit(normal((B, T, H, K))),
        "decay": lambda: -rng.uniform(0.0, max_decay, (B, T, H)),
        "decay_K": lambda: -rng.uniform(0.0, max_decay, (B, T, H, K)),
        "gate": lambda: sigmoid(normal((B, T, H))),
        "gate_K": lambda: sigmoid(normal((B, T, H, K))),
        "gate_V": lambda: sigmoid(normal((B, T, H, V))),
    }
    inputs = {"q": normal((B, T, H, K)), "k": unit(normal((B, T, H, K))), "v": normal((B, T, H, V))}
    inputs.update({name: None if kind is None else draw[kind]() for name, kind in gates.items()})
    return {name: None if x is None else jnp.asarray(x, dtype) for name, x in inputs.items()}


def make_state(rng: np.random.Generator, *, B: int = B, H: int = H, K: int = K, V: int = V, dtype=jnp.float64):
    """A random [B, H, K, V] initial state."""
    return jnp.asarray(rng.standard_normal((B, H, K, V)), dtype)


def make_segment_ids(rng: np.random.Generator, lengths_per_row: list[list[int]]) -> jnp.ndarray:
    """[B, T] int32 segment ids from segment lengths per row; the id grows by a random step at each
    boundary."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.cumsum(rng.integers(1, 4, len(lengths)))
        rows.append(np.repeat(ids, lengths))
    return jnp.asarray(np.stack(rows), jnp.int32)


def to_float64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test's id: reproducible, different for every test case."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ----------------------------------------------------------------------------------------------------------
# running the rules (jitted and cached: one compile per rule, impl, shapes and dtypes)
# ----------------------------------------------------------------------------------------------------------


@functools.partial(jit, static_argnames=("rule", "impl", "chunk_size", "normalize_qk", "scale"))
def run(rule, inputs, initial_state=None, segment_ids=None, *, impl, chunk_size=64, normalize_qk=False, scale=None):
    """rules.RULES[rule](**inputs, ...) -> (o, final_state)."""
    return rules.RULES[rule](
        **inputs,
        initial_state=initial_state,
        segment_ids=segment_ids,
        impl=impl,
        chunk_size=chunk_size,
        normalize_qk=normalize_qk,
        scale=scale,
    )


def reference(rule, inputs, initial_state=None, segment_ids=None):
    """The float64 recurrent form on the same inputs (upcast): the oracle."""
    return run(
        rule,
        to_float64(inputs),
        None if initial_state is None else to_float64(initial_state),
        segment_ids,
        impl="recurrent",
    )


def numpy_definition(rule, inputs, initial_state=None, segment_ids=None):
    """DESIGN.md §1 written out in numpy, token by token, independently of edarnn: per token an optional EDA
    erase S <- (I - e (gamma e)^T) Diag(exp g) S (else the decay S <- Diag(exp g) S), then the write
    S <- S + k (w v - S^T (b k))^T (b = w = beta for the scalar-gated rules; S + k v^T for the additive ones);
    the output o = S^T (q / sqrt(K)); the state restarts from zero where the segment id changes."""
    x = {name: None if a is None else np.asarray(a, np.float64) for name, a in inputs.items()}
    q, k, v = x["q"], x["k"], x["v"]
    batch, length, heads, key = q.shape
    per_channel = lambda a, d: a if a.ndim == 4 else np.repeat(a[..., None], d, axis=-1)  # noqa: E731
    decay = np.exp(per_channel(x["g"], key)) if x.get("g") is not None else np.ones_like(k)
    if rule == "linear_attention" or rule == "gla":
        b = w = None
    elif x.get("beta") is not None:
        b, w = per_channel(x["beta"], key), per_channel(x["beta"], v.shape[-1])
    else:
        b, w = per_channel(x["b"], key), per_channel(x["w"], v.shape[-1])
    state = np.zeros((batch, heads, key, v.shape[-1])) if initial_state is None else np.array(initial_state)
    o = np.zeros(v.shape)
    outer = lambda a, c: a[..., :, None] * c[..., None, :]  # noqa: E731
    for t in range(length):
        if segment_ids is not None and t > 0:
            state[np.asarray(segment_ids)[:, t] != np.asarray(segment_ids)[:, t - 1]] = 0.0
        state = decay[:, t, :, :, None] * state
        if rule == "eda":
            e, gamma = x["e"][:, t], per_channel(x["gamma"], key)[:, t]
            state = state - outer(e, np.einsum("bhk,bhkv->bhv", gamma * e, state))
        if b is None:
            state = state + outer(k[:, t], v[:, t])
        else:
            read = np.einsum("bhk,bhkv->bhv", b[:, t] * k[:, t], state)
            state = state + outer(k[:, t], w[:, t] * v[:, t] - read)
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t] / np.sqrt(key), state)
    return o, state


def loss_fn(rule, cotangents, **options):
    """(inputs, initial_state) -> <o, co> + <final_state, cs>: a scalar that depends on both outputs."""
    co, cs = cotangents

    def loss(inputs, initial_state, segment_ids=None):
        o, state = rules.RULES[rule](**inputs, initial_state=initial_state, segment_ids=segment_ids, **options)
        return jnp.sum(o * co) + jnp.sum(state * cs)

    return loss


def random_cotangents(rng, inputs):
    """Random cotangents (co [B, T, H, V], cs [B, H, K, V]) of a rule's outputs on `inputs`."""
    b, t, h, k = inputs["q"].shape
    v = inputs["v"].shape[-1]
    return (jnp.asarray(rng.standard_normal((b, t, h, v))), jnp.asarray(rng.standard_normal((b, h, k, v))))


@functools.cache
def grad_runner(rule, impl, chunk_size=64):
    """A jitted grad of loss_fn w.r.t. (inputs, initial_state); cotangents are arguments, so it is cached."""

    def grads(cotangents, inputs, initial_state, segment_ids):
        loss = loss_fn(rule, cotangents, impl=impl, chunk_size=chunk_size)
        return jax.grad(loss, argnums=(0, 1))(inputs, initial_state, segment_ids)

    return jit(grads)


# ----------------------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------------------


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (a normwise relative error, in float64)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.max(np.abs(expected), initial=0.0)
    return float(np.max(np.abs(actual - expected), initial=0.0) / max(scale, 1e-30))


def assert_close(actual, expected, rtol: float, what: str = ""):
    """Every leaf of two pytrees finite and within `rtol` normwise relative error."""
    paths_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    paths_e, tree_e = jax.tree_util.tree_flatten_with_path(expected)
    assert tree_a == tree_e, f"{what}: structures differ: {tree_a} vs {tree_e}"
    for (path, a), (_, e) in zip(paths_a, paths_e, strict=True):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert np.all(np.isfinite(np.asarray(a, np.float64))), f"{name}: not finite"
        err = relative_error(a, e)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:.3g}"


def kernel_input_specs(*, t, per_token, decay, erase, segments=False, b=1, h=2, k=64, v=64):
    """Abstract (shape and dtype only) inputs of the kernel forms, (q, Substeps, initial_state, segment_ids), for
    lowering them without running: decay "1" (scalar) or "K" (per channel), erase: with an erase address y."""
    from edarnn import core  # noqa: PLC0415

    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    rows = t * per_token
    sub = core.Substeps(
        spec(b, t, h, 1 if decay == "1" else k),  # per token, as `rules` passes it (EDA: its first sub-step's)
        spec(b, rows, h, k, dtype=jnp.bfloat16),
        spec(b, rows, h, k) if erase else None,
        spec(b, rows, h, v),
    )
    return spec(b, t, h, k), sub, spec(b, h, k, v), spec(b, t, dtype=jnp.int32) if segments else None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: every CPU executable keeps memory mappings of its own,
    and the whole suite in one process otherwise nears the kernel's limit on mappings per process
    (vm.max_map_count, 65530 by default), where XLA crashed (a segmentation fault while compiling)."""
    yield
    jax.clear_caches()
