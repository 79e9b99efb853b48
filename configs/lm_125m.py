"""A ~125M-parameter language model for a GPU or a TPU slice, one config per architecture at the same size:

    python -m edarnn.train --config configs/lm_125m.py:eda --config.data.bytes.path=/path/to/text
    arg: "eda" (default), "gdn2", "hybrid" (3 EDA : 1 sliding-window attention) or "attention" (a transformer)

bf16 compute with float32 parameters, rematerialised blocks, byte-level tokens (259 ids; a tokenizer file can
be set with --config.data.bytes.tokenizer and model.vocab_size follows it), sliding windows of 1024 tokens.
Sequence length and parallelism are flags: --config.data.seq_len=8192 (keep batch_size x seq_len about
constant), --config.mesh.fsdp=N.
"""

from edarnn import config as config_lib

ARCHITECTURES = {  # name -> (mixer pattern, layers): the depth brings each to 125M parameters within 3%
    "eda": (("eda",), 15),  # 124.7M parameters
    "gdn2": (("gdn2",), 16),  # 124.5M
    "hybrid": (("eda", "eda", "eda", "swa"), 16),  # 128.1M
    "attention": (("attention",), 18),  # 127.8M
}


def get_config(arg=None):
    name = arg or "eda"
    if name not in ARCHITECTURES:
        raise ValueError(f"configs/lm_125m.py:<architecture>: expected one of {tuple(ARCHITECTURES)}; got {name!r}")
    layers, n_layers = ARCHITECTURES[name]
    config = config_lib.defaults()
    config.model.update(
        d_model=768,
        n_layers=n_layers,
        layers=layers,
        n_heads=6,
        head_dim_k=128,
        head_dim_v=128,
        d_ff=2048,
        window=1024,
        tie_embeddings=False,
        dtype="bfloat16",
        remat=True,
    )
    config.data.update(source="bytes", seq_len=2048, batch_size=64)
    config.train.update(
        steps=20000,
        lr=6e-4,
        warmup_steps=1000,
        log_every=100,
        eval_every=1000,
        eval_batches=32,
        checkpoint_every=1000,
        keep_best="eval_loss",
    )
    return config
