"""The default job (`python -m edarnn.train`): a small EDA model learns multi-query associative recall on a CPU.

Rows of 64 tokens open with 8 key-value pairs, then ask for the value of each key; the accuracy is on those
answers. Two EDA layers with 2 heads of 32 x 32 state reach high accuracy in a few minutes on two CPU cores.
"""

from edarnn import config as config_lib


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/default.py takes no argument; got {arg!r}")
    config = config_lib.defaults()
    config.model.update(d_model=64, n_layers=2, layers=["eda"], n_heads=2, head_dim_k=32, head_dim_v=32, d_ff=128)
    config.data.update(source="mqar", seq_len=64, batch_size=32)
    config.data.mqar.update(num_pairs=8, num_queries=0, key_vocab_size=64, value_vocab_size=64, noise_vocab_size=16)
    config.train.update(
        steps=600, lr=3e-3, warmup_steps=50, log_every=25, eval_every=200, eval_batches=8, checkpoint_every=200
    )
    return config
