"""The default job (`python -m edarnn.train`): a small EDA model learns multi-query associative recall on a CPU.

Rows of 64 tokens open with 8 key-value pairs (32 key and 32 value tokens), then ask for the value of every key
once, among filler tokens; the accuracy is on those answers. Two EDA layers (d_model 64, 2 heads of a 32 x 32
state) pass the plateau of guessing among the 8 values in context (accuracy ~ 1/8) after a few hundred steps and
end at about 99% held-out accuracy after 800 steps (about 3 minutes on two CPU cores). Harder settings and the
other mixers: configs/mqar.py.
"""

from edarnn import config as config_lib


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/default.py takes no argument; got {arg!r}")
    config = config_lib.defaults()
    config.model.update(
        d_model=64, n_layers=2, layers=("eda",), n_heads=2, head_dim_k=32, head_dim_v=32, d_ff=128, chunk_size=32
    )
    config.data.update(source="mqar", seq_len=64, batch_size=32)
    config.data.mqar.update(num_pairs=8, num_queries=0, key_vocab_size=32, value_vocab_size=32, noise_vocab_size=16)
    config.train.update(
        steps=800, lr=3e-3, warmup_steps=50, log_every=50, eval_every=200, eval_batches=8, checkpoint_every=200
    )
    return config
