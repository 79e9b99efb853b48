"""Memory editing under interference, one config per token mixer at matched size (the model of configs/mqar.py:
same d_model, heads and K x V state per head), for comparing how the update rules remove stale content:

    python -m edarnn.train --config configs/editing.py:gdn2                 # edit_rebind (default task)
    python -m edarnn.train --config configs/editing.py:eda,edit_retract     # <mixer>[,<task>]

mixer: any of edarnn.model.MIXER_KINDS (default "eda"); task: "edit_rebind" (16 keys, each bound then re-bound
twice, the latest value asked), "edit_records" (8 records x 4 fields, 16 single-field updates) or "edit_retract"
(16 keys, 8 of them deleted; a deleted key answers NONE). Rows of 256 tokens; formats in docs/tasks.md.
"""

from edarnn import config as config_lib
from edarnn import model

TASKS = {  # task -> its settings in rows of 256 tokens (writes, then the queries)
    "edit_rebind": dict(num_keys=16, num_rebinds=2, key_vocab_size=128, value_vocab_size=128),
    "edit_records": dict(num_records=8, num_fields=4, num_updates=16, record_vocab_size=64, value_vocab_size=128),
    "edit_retract": dict(num_keys=16, num_retractions=8, key_vocab_size=128, value_vocab_size=128),
}


def get_config(arg=None):
    mixer, _, task = (arg or "eda").partition(",")
    task = task or "edit_rebind"
    if mixer not in model.MIXER_KINDS:
        raise ValueError(f"configs/editing.py:<mixer>[,<task>]: mixer: one of {model.MIXER_KINDS}; got {mixer!r}")
    if task not in TASKS:
        raise ValueError(f"configs/editing.py:<mixer>[,<task>]: task: one of {tuple(TASKS)}; got {task!r}")
    config = config_lib.defaults()
    config.model.update(
        d_model=128, n_layers=2, layers=(mixer,), n_heads=2, head_dim_k=64, head_dim_v=64, d_ff=256, window=64
    )
    config.data.update(source=task, seq_len=256, batch_size=64)
    config.data[task].update(TASKS[task])
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
