#!/usr/bin/env bash
# The README's figures and numbers, regenerated on this machine: the main job (train, then
# analyze) into runs/figures/default, its expert x category heat map copied to
# docs/expert_label.png, `compare` into runs/figures/compare, and the router tournament into
# runs/figures/tournament (its loss curves copied to docs/tournament_val_loss.png; the command
# prints its wall time). Prints the CPU and the BLAS kernels first, so the numbers always come
# with the machine that made them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test,train,notebooks}" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
mkdir -p runs/figures
.venv/bin/python -m moe_py info | grep -E "^(cpu|blas_corename|openmp_threads) " | tee runs/figures/machine.txt
.venv/bin/python -m moe_py train --out runs/figures/default --overwrite
.venv/bin/python -m moe_py analyze runs/figures/default | tee runs/figures/analyze.txt
cp runs/figures/default/expert_label.png docs/expert_label.png
.venv/bin/python -m moe_py compare --out runs/figures/compare --overwrite | tee runs/figures/compare.txt
.venv/bin/python -m moe_py tournament --out runs/figures/tournament | tee runs/figures/tournament.txt
cp runs/figures/tournament/val_loss.png docs/tournament_val_loss.png
