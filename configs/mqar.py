"""Multi-query associative recall, one config per token mixer at matched size (same d_model, heads and K x V state
per head), for comparing the update rules:

    python -m edarnn.train --config configs/mqar.py:gdn2        # any of edarnn.model.MIXER_KINDS; default "eda"

Rows of 256 tokens hold 32 key-value pairs and then the 32 queries among filler tokens. Softmax attention
("attention") recalls exactly and is the reference; "swa" sees only its window of 64 tokens.
"""

from edarnn import config as config_lib
from edarnn import model


def get_config(arg=None):
    mixer = arg or "eda"
    if mixer not in model.MIXER_KINDS:
        raise ValueError(f"configs/mqar.py:<mixer>: expected one of {model.MIXER_KINDS}; got {mixer!r}")
    config = config_lib.defaults()
    config.model.update(
        d_model=128, n_layers=2, layers=(mixer,), n_heads=2, head_dim_k=64, head_dim_v=64, d_ff=256, window=64
    )
    config.data.update(source="mqar", seq_len=256, batch_size=64)
    config.data.mqar.update(num_pairs=32, num_queries=0, key_vocab_size=256, value_vocab_size=256)
    config.train.update(
        steps=4000,
        lr=2e-3,
        warmup_steps=200,
        log_every=100,
        eval_every=500,
        eval_batches=8,
        checkpoint_every=500,
        keep_best="eval_accuracy",
    )
    return config
