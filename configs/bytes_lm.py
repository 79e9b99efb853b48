"""A byte-level language model on local text files:

    python -m edarnn.train --config configs/bytes_lm.py:/path/to/text      # a file or a directory

Without a path it reads this repository's own Python sources (edarnn/), a few hundred KB: enough to watch a
model learn, too little to train one. Each file is a document; data.bytes.glob picks the files of a directory,
data.bytes.separator splits files into documents, data.bytes.tokenizer takes a SentencePiece or Hugging Face
tokenizer file instead of bytes. A hybrid of three EDA layers and one sliding-window attention layer.
"""

from pathlib import Path

from edarnn import config as config_lib


def get_config(arg=None):
    config = config_lib.defaults()
    config.model.update(
        d_model=256,
        n_layers=8,
        layers=("eda", "eda", "eda", "swa"),
        n_heads=4,
        head_dim_k=64,
        head_dim_v=64,
        d_ff=768,
        window=256,
        tie_embeddings=True,
    )
    config.data.update(source="bytes", seq_len=512, batch_size=16)
    config.data.bytes.update(
        path=arg or str(Path(__file__).resolve().parent.parent / "edarnn"),
        glob="**/*" if arg else "**/*.py",
        eval_fraction=0.05,
    )
    config.train.update(
        steps=5000,
        lr=1e-3,
        warmup_steps=200,
        log_every=50,
        eval_every=500,
        eval_batches=16,
        checkpoint_every=500,
        keep_best="eval_loss",
    )
    return config
