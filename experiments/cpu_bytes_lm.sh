#!/bin/sh
# The byte-level language models of docs/results.md: 3 rules, each in 2 recurrent layers (d_model 128, 4 heads of a
# 32 x 32 state; no attention, no position embedding), trained 300 steps on rows of 512 bytes of the CPython
# standard library's top-level modules (*.py of the running Python's stdlib; 5% of the files held out by content
# hash), then evaluated on the held-out files at rows of 512 to 8192 bytes (about 13 minutes on 2 CPU cores).
set -e
STDLIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
for rule in gated_delta_rule gdn2 eda; do
    python -m edarnn.train --config "configs/bytes_lm.py:$STDLIB" --workdir "runs/cpu_bytes_lm/$rule" \
        --config.data.bytes.glob='*.py' --config.model.layers="('$rule',)" --config.model.n_layers=2 \
        --config.model.d_model=128 --config.model.n_heads=4 --config.model.head_dim_k=32 \
        --config.model.head_dim_v=32 --config.model.d_ff=256 --config.model.chunk_size=32 \
        --config.data.batch_size=8 --config.train.steps=300 --config.train.warmup_steps=30 --config.train.lr=3e-3 \
        --config.train.log_every=50 --config.train.eval_every=0 --config.train.eval_batches=8 \
        --config.train.checkpoint_every=0 --config.train.keep_best=''
    for len in 512 1024 2048 4096 8192; do  # about 200 KB of held-out bytes: 8 rows of `len` bytes per batch
        python -m edarnn.evaluate --workdir "runs/cpu_bytes_lm/$rule" --seq-len $len --batches $((200000 / (8 * len) + 1))
    done
done
python - <<'PY'
import glob, json
import matplotlib.pyplot as plt
records = {}
for path in sorted(glob.glob("runs/cpu_bytes_lm/*/eval_eval_*.json")):
    record = json.loads(open(path).read())
    records.setdefault(path.split("/")[2], {})[record["seq_len"]] = record["metrics"]["bits_per_byte"]
records = {rule: dict(sorted(by_len.items())) for rule, by_len in sorted(records.items())}
open("docs/results/cpu_bytes_lm.json", "w").write(json.dumps(records, indent=1) + "\n")
ax = plt.figure(figsize=(5, 3.5)).gca()
for rule, by_len in records.items():
    ax.plot(*zip(*by_len.items()), marker="o", label=rule)
ax.set(xscale="log", xlabel="evaluation row length (bytes; trained at 512)", ylabel="held-out bits per byte")
ax.set_xticks([512, 1024, 2048, 4096, 8192], ["512", "1k", "2k", "4k", "8k"])
ax.minorticks_off()
ax.legend(fontsize=8)
ax.figure.savefig("docs/results/cpu_bytes_lm.png", dpi=110, bbox_inches="tight")
PY
