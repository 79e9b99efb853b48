"""Decoding speed and memory of the ~125M language models against context length (issue 7).

    python -m experiments.benchmarks.decode --out decode.json                    # eda, hybrid, attention; 1k..128k
    python -m experiments.benchmarks.decode --arch attention --contexts 65536 131072 --out decode_attn.json
    python -m experiments.benchmarks.decode --tiny --contexts 64 256 --steps 8 --out /tmp/decode.json   # CPU

Architectures: configs/lm_125m.py:<arch> (--arch: eda, gdn2, hybrid = 3 EDA : 1 sliding-window attention,
attention = a transformer whose full-attention layers keep a KV cache), random weights (speed does not depend on
them), compute in the config's dtype (bfloat16); --tiny shrinks every dimension (float32) for a CPU check.
--rule-impl overrides config.model.rule_impl (e.g. pallas: its chunk kernels for prefill, token kernel to decode).

Per architecture and context L, a batch of --batch random prompts of L tokens:
  prefill   inference.prefill with max_len = L + --warmup + --steps: the first call compiles, the second is timed
            (prefill s and tokens/s = B L / s);
  decode    --warmup untimed then --steps timed inference.decode_step calls, one jitted call per token with the
            cache donated, dispatched from a Python loop (asynchronously: the host runs ahead of the device),
            feeding a fixed token; decode ms per step and tokens/s = B steps / s.
  memory    cache MiB (inference.cache_bytes: every layer's cache, exact) and the device's bytes in use after the
            prefill (weights in the compute dtype, the cache, anything else alive), where the backend reports it.
A full-attention layer's decoding step reads its whole cache (max_len slots), so its time grows with L; recurrent
layers' caches (state and convolution tail) and sliding windows do not. The `vs attn` column divides tokens/s by
the attention model's at the same L (when it ran). A case that fails (e.g. out of memory) becomes an error row.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edarnn import data, inference
from edarnn import model as model_lib
from experiments.benchmarks import rules as rb  # machine()

CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "lm_125m.py"
TINY = dict(d_model=64, n_heads=2, head_dim_k=32, head_dim_v=32, d_ff=128, n_layers=4, window=32, dtype="float32")
COLUMNS = (
    ("arch", 10),
    ("L", 8),
    ("B", 4),
    ("prefill s", 10),
    ("prefill tok/s", 14),
    ("decode ms", 10),
    ("tok/s", 10),
    ("vs attn", 8),
    ("cache MiB", 10),
    ("in use GiB", 11),
    ("note", 0),
)


def model_config(arch: str, args):
    """config.model of configs/lm_125m.py:<arch>, with the vocabulary of its data source and the overrides."""
    spec = importlib.util.spec_from_file_location("lm_125m", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arch)
    model = config.model
    model.vocab_size = model.vocab_size or data.vocab_size(config.data)
    model.remat = False  # training only
    if args.tiny:
        model.update(TINY)
        model.n_layers = max(len(model.layers), TINY["n_layers"])
    if args.rule_impl:
        model.rule_impl = args.rule_impl
    return model


def bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use")


def run_case(model: inference.Prepared, context: int, args) -> dict:
    rng = np.random.default_rng(context)
    tokens = rng.integers(0, model.vocab_size, (args.batch, context)).astype(np.int32)
    max_len = context + args.warmup + args.steps
    record = {"context": context, "batch": args.batch, "max_len": max_len}

    start = time.perf_counter()
    _, cache = jax.block_until_ready(inference.prefill(model, tokens, max_len=max_len))
    record["prefill_first_s"] = time.perf_counter() - start  # compile and run
    del cache
    start = time.perf_counter()
    logits, cache = jax.block_until_ready(inference.prefill(model, tokens, max_len=max_len))
    record["prefill_s"] = time.perf_counter() - start
    record["prefill_tokens_per_s"] = args.batch * context / record["prefill_s"]
    record["cache_bytes"] = inference.cache_bytes(cache)
    record["bytes_in_use"] = bytes_in_use()

    token = jnp.zeros((args.batch,), jnp.int32)
    start = time.perf_counter()
    for _ in range(args.warmup):
        logits, cache = inference.decode_step(model, cache, token)
    jax.block_until_ready(logits)
    record["decode_warmup_s"] = time.perf_counter() - start  # the first call compiles
    start = time.perf_counter()
    for _ in range(args.steps):
        logits, cache = inference.decode_step(model, cache, token)
    jax.block_until_ready((logits, cache))
    elapsed = time.perf_counter() - start
    record["decode_ms"] = 1e3 * elapsed / args.steps
    record["decode_tokens_per_s"] = args.batch * args.steps / elapsed
    record["finite"] = bool(np.all(np.isfinite(np.asarray(logits))))
    return record


def print_row(record=None, attention_speed=None):
    if record is None:
        cells = [name for name, _ in COLUMNS]
    elif "error" in record:
        cells = [record["arch"], record["context"], record["batch"], *[""] * 7, record["error"][:100]]
    else:
        in_use = record["bytes_in_use"]
        ratio = record["decode_tokens_per_s"] / attention_speed if attention_speed else None
        cells = [
            record["arch"],
            record["context"],
            record["batch"],
            f"{record['prefill_s']:.3f}",
            f"{record['prefill_tokens_per_s']:.4g}",
            f"{record['decode_ms']:.3f}",
            f"{record['decode_tokens_per_s']:.4g}",
            "" if ratio is None else f"{ratio:.2f}x",
            f"{record['cache_bytes'] / 2**20:.1f}",
            "" if in_use is None else f"{in_use / 2**30:.2f}",
            "" if record["finite"] else "non-finite logits",
        ]
    print("".join(f"{str(c):<{width}}" for c, (_, width) in zip(cells, COLUMNS, strict=True)).rstrip(), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["attention", "hybrid", "eda"], help="configs/lm_125m.py args")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=128, help="timed decoding steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed decoding steps first (the first compiles)")
    p.add_argument("--rule-impl", default=None, help="override config.model.rule_impl (auto, chunk, pallas, ...)")
    p.add_argument("--tiny", action="store_true", help="tiny dimensions in float32 (a CPU check)")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    args = p.parse_args(argv)
    if min(args.contexts) < 1 or args.batch < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--contexts, --batch, --steps and --warmup must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    machine = rb.machine()
    print(f"{machine['device_kind']} ({machine['backend']}), jax {machine['jax']}, flax {machine['flax']}")
    records, attention_speed = [], {}
    print_row()
    for arch in args.arch:
        config = model_config(arch, args)
        lm = model_lib.LM(config, rngs=nnx.Rngs(0))
        params = model_lib.count_params(lm)
        model = inference.prepare(lm)
        del lm  # prepare keeps what it needs (the matrices in the compute dtype)
        for context in args.contexts:
            record = {"arch": arch, "params": params, "layers": list(config.layers), "n_layers": config.n_layers}
            try:
                record |= run_case(model, context, args)
            except Exception as error:  # e.g. out of memory: report it and go on
                record |= {"context": context, "batch": args.batch, "error": f"{type(error).__name__}: {error}"}
            if arch == "attention" and "error" not in record:
                attention_speed[context] = record["decode_tokens_per_s"]
            records.append(record)
            print_row(record, attention_speed.get(context) if arch != "attention" else None)
        del model
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "records": records}, indent=1))
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
