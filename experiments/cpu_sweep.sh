#!/bin/sh
# The CPU sweep of docs/results.md: 8 rules x 2 seeds on MQAR (4 pairs) and edit_rebind (3 keys re-bound twice),
# rows of 32 tokens, 300 steps each (about 20 minutes on 2 CPU cores).
set -e
python -m experiments.sweep --task mqar --values 4 --seeds 0,1 --steps 300 --seq-len 32 --workdir runs/cpu_sweep \
    --out docs/results/cpu_mqar.json
python -m experiments.sweep --task edit_rebind --values 3 --seeds 0,1 --steps 300 --seq-len 32 --workdir runs/cpu_sweep \
    --out docs/results/cpu_edit_rebind.json
python -m experiments.sweep --bars docs/results/cpu_mqar.json docs/results/cpu_edit_rebind.json \
    --plot docs/results/cpu_sweep.png
