"""Text from a trained byte-level model, streamed as it is decoded.

    python -m edarnn.generate --workdir runs/NAME --prompt "def main(" --max-new-tokens 300 --top-p 0.95
    python -m edarnn.generate --workdir runs/NAME --prompt "import" --prompt "class" --temperature 0   # greedy

Loads the config and the parameters (only those: the optimizer state is not read) of a training work dir's
checkpoint, <workdir>/checkpoints/<step> as edarnn.train writes it (the newest unless --step), then generates with
edarnn.inference. Each prompt is encoded as the training documents begin, BOS and then its UTF-8 bytes, and its
continuation ends at EOS or after --max-new-tokens. One prompt streams its continuation to stdout token by token;
several (a batch, prompts of different lengths) print each prompt and continuation at the end. Byte-level models
only (config.data.source "bytes" without a tokenizer file).
"""

import argparse
import codecs
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from edarnn import data, inference, model


def load(workdir: str, step: int | None = None) -> tuple[model.LM, ml_collections.ConfigDict, int]:
    """(the model with the parameters of checkpoint `step` of `workdir` (None: the newest), the run's config, the
    step), on the default device."""
    directory = epath.Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise ValueError(f"--workdir {workdir}: no checkpoints/ in it (edarnn.train writes them there)")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, item_names=("state", "config"), options=options) as manager:
        steps = manager.all_steps()
        if not steps:
            raise ValueError(f"--workdir {workdir}: no complete checkpoint in {directory}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise ValueError(f"--step {step}: {directory} holds the steps {sorted(steps)}")
        config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        config = ml_collections.ConfigDict(config)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model.LM(config.model, rngs=nnx.Rngs(0))))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        item = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)}
        restore = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        params = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
    return nnx.merge(graphdef, params), config, step


def encode(prompt: str) -> list[int]:
    """BOS, then the prompt's UTF-8 bytes."""
    return [data.BYTES.bos, *prompt.encode("utf-8")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training work dir (edarnn.train --workdir)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--step", type=int, default=None, help="the checkpoint to load (default: the newest)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None, out=None) -> int:
    args = parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint manager is read-only
    out = out or sys.stdout
    lm, config, step = load(args.workdir, args.step)
    if config.data.source != "bytes" or config.data.bytes.tokenizer:
        raise ValueError(
            f"--workdir {args.workdir}: edarnn.generate reads byte-level models; this run's data are "
            f"{config.data.source!r} (tokenizer {config.data.get('bytes', {}).get('tokenizer', '')!r})"
        )
    layers = list(config.model.layers)
    print(f"# {args.workdir}, step {step}: {model.count_params(lm):,} parameters, layers {layers}", file=out)
    tokens = inference.generate(
        inference.prepare(lm),
        [encode(prompt) for prompt in args.prompt],
        args.max_new_tokens,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=data.BYTES.eos,
    )
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in args.prompt]
    texts = [""] * len(args.prompt)
    streaming = len(args.prompt) == 1
    if streaming:
        out.write(args.prompt[0])
    for step_tokens in tokens:
        for row, token in enumerate(np.asarray(step_tokens)):
            if token < data.BYTES.size:  # a byte (not PAD, BOS or EOS)
                texts[row] += decoders[row].decode(bytes([token]))
        if streaming:
            out.write(texts[0])
            out.flush()
            texts[0] = ""
    if streaming:
        out.write(decoders[0].decode(b"", final=True) + "\n")
    else:
        for prompt, text, decoder in zip(args.prompt, texts, decoders, strict=True):
            out.write(f"--- {prompt!r}\n{prompt}{text}{decoder.decode(b'', final=True)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
