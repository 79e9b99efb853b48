"""Runs every rule in every form on random inputs; prints agreement with the recurrent form and timings.

    python -m edarnn.check_forms [--batch 2 --seq 512 --heads 4 --key 32 --value 32 --chunk-size 64]

A quick, visible check that the installation computes what the definition says, on whatever backend JAX finds.
"""

import argparse
import itertools
import statistics
import time

import jax
import jax.numpy as jnp

from edarnn import rules


def random_inputs(rule: str, batch: int, seq: int, heads: int, key: int, value: int, seed: int = 0):
    """Positional inputs of `rule` ([B, T, H, D] layout): unit keys and erase directions, gates in (0, 1),
    log-decays -softplus(N(0, 1)) / 2 (mean about -0.4), per key channel where the rule takes them."""
    base, counter = jax.random.key(seed), itertools.count()
    normal = lambda *d: jax.random.normal(jax.random.fold_in(base, next(counter)), (batch, seq, heads, *d))  # noqa: E731
    unit = lambda: (lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True))(normal(key))  # noqa: E731
    gate = lambda *d: jax.nn.sigmoid(normal(*d))  # noqa: E731
    log_decay = lambda *d: -0.5 * jax.nn.softplus(normal(*d))  # noqa: E731
    q, k, v = normal(key), unit(), normal(value)
    return {
        "linear_attention": (q, k, v),
        "gla": (q, k, v, log_decay(key)),
        "delta_rule": (q, k, v, gate()),
        "gated_delta_rule": (q, k, v, log_decay(), gate()),
        "kda": (q, k, v, log_decay(key), gate()),
        "gdn2": (q, k, v, log_decay(key), gate(key), gate(value)),
        "eda": (q, k, v, unit(), log_decay(key), gate(), gate()),
    }[rule]


def _median_ms(fn, args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (
        ("batch", 2),
        ("seq", 512),
        ("heads", 4),
        ("key", 32),
        ("value", 32),
        ("chunk-size", 64),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    print(
        f"backend {jax.default_backend()}, B={args.batch} T={args.seq} H={args.heads} K={args.key} "
        f"V={args.value}, float32, chunk {args.chunk_size}"
    )
    print(f"{'rule':18s} {'impl':10s} {'rel. error':>11s} {'ms':>9s}")
    worst = 0.0
    for rule, fn in rules.RULES.items():
        inputs = random_inputs(rule, args.batch, args.seq, args.heads, args.key, args.value)
        ref = None
        for impl in ("recurrent", "scan", "chunk"):
            run = jax.jit(lambda *a, fn=fn, impl=impl: fn(*a, impl=impl, chunk_size=args.chunk_size))
            o, _ = run(*inputs)
            ref = o if ref is None else ref
            err = float(jnp.linalg.norm(o - ref) / jnp.linalg.norm(ref))
            worst = max(worst, err)
            print(f"{rule:18s} {impl:10s} {err:11.2e} {_median_ms(run, inputs):9.2f}")
    print(f"largest relative difference from the recurrent form: {worst:.2e}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
