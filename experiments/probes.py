"""Probes of the recurrent state inside a trained model (notebooks/memory_probes.ipynb):

    layers = probes.mixer_inputs(lm, tokens)            # per block: (mixer kind, mixer, its input [B, T, d])
    trace = probes.state_trace(mixer, x)                # the state after every token and what changed it
    probes.effective_rank(trace["states"])              # [B, T, H]

state_trace runs the mixer's rule token by token (its `<rule>_step`, the definition) on the gates the mixer makes
from x, keeping every state S_t [B, T, H, K, V]. For EDA it splits what leaves the state at token t into the
decay's share and the erase's share (DESIGN.md §1): with D = Diag(exp g_t) S_{t-1},

    decayed_t = ||S_{t-1} - D||_F            erased_t = ||e_t (gamma_t * e_t)^T D||_F = ||(gamma_t * e_t)^T D||

(e_t is a unit vector), both [B, T, H], in the units of the state's Frobenius norm.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from edarnn import model, rules


def mixer_inputs(lm: model.LM, tokens: jax.Array) -> list[tuple[str, nnx.Module, jax.Array]]:
    """For each block of `lm` on tokens [B, T]: (its mixer's class name, the mixer, the mixer's input
    RMSNorm(x) [B, T, d]), the residual stream x taken as the model computes it (one unsegmented row each)."""
    x = jnp.take(lm.embed[...], tokens, axis=0).astype(lm.dtype) * math.sqrt(lm.embed.shape[1])
    layers = []
    for block in lm.blocks:
        layers.append((type(block.mixer).__name__, block.mixer, block.mixer_norm(x)))
        x = block(x, None)
    return layers


def state_trace(mixer: model.RecurrentMixer, x: jax.Array) -> dict[str, jax.Array]:
    """The state of `mixer` on x [B, T, d] after every token: {"states" [B, T, H, K, V], "outputs" [B, T, H, V],
    "log_decay" (g, [B, T, H] or [B, T, H, K]; absent without decay)} and, for EDA, "decayed" and "erased"
    [B, T, H] (see the module docstring)."""
    (inputs, _), gates = mixer.inputs(x, None), mixer.gate_values(x)  # (values, conv tails)
    arguments = {**inputs, **gates}
    step = getattr(rules, f"{mixer.rule}_step")
    batch, _, heads, key = inputs["k"].shape
    state = jnp.zeros((batch, heads, key, inputs["v"].shape[-1]), jnp.float32)

    def scan_step(state, token):
        o, state = step(state, **token, normalize_qk=True)
        return state, (o, state)

    per_token = {name: None if a is None else jnp.moveaxis(a, 1, 0) for name, a in arguments.items()}
    _, (outputs, states) = jax.lax.scan(scan_step, state, per_token)
    states, outputs = jnp.moveaxis(states, 0, 1), jnp.moveaxis(outputs, 0, 1)
    trace = {"states": states, "outputs": outputs}
    if "g" in gates:
        trace["log_decay"] = gates["g"]
    if mixer.rule == "eda":
        previous = jnp.pad(states[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
        g = gates["g"] if gates["g"].ndim == 4 else gates["g"][..., None]
        decayed = jnp.exp(g)[..., None] * previous
        e = inputs["e"] / jnp.linalg.norm(inputs["e"], axis=-1, keepdims=True)
        gamma = gates["gamma"] if gates["gamma"].ndim == 4 else gates["gamma"][..., None]
        trace["decayed"] = jnp.linalg.norm(previous - decayed, axis=(-2, -1))
        trace["erased"] = jnp.linalg.norm(jnp.einsum("bthk,bthkv->bthv", gamma * e, decayed), axis=-1)
    return trace


def state_norm(states: jax.Array) -> jax.Array:
    """Frobenius norms [B, T, H] of states [B, T, H, K, V]."""
    return jnp.linalg.norm(states, axis=(-2, -1))


def effective_rank(states: jax.Array) -> jax.Array:
    """Effective rank [B, T, H] of states [B, T, H, K, V] (Roy & Vetterli 2007): exp of the entropy of the singular
    values normalised to sum to 1; between 1 and min(K, V), 0 for a zero state."""
    s = jnp.linalg.svd(states.astype(jnp.float32), compute_uv=False)
    total = jnp.sum(s, axis=-1, keepdims=True)
    p = s / jnp.maximum(total, 1e-30)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return jnp.where(total[..., 0] > 0, jnp.exp(entropy), 0.0)


def rebinds(tokens, num_writes: int, key_ids: range):
    """Positions [list per row] of edit_rebind's writes that re-bind a key already bound in the row (the writes
    "key value" fill the first 2 num_writes tokens; key_ids: the ids of keys)."""
    found = []
    for row in tokens.tolist():
        seen, positions = set(), []
        for t in range(0, 2 * num_writes, 2):
            if row[t] in key_ids and row[t] in seen:
                positions.append(t)
            seen.add(row[t])
        found.append(positions)
    return found
