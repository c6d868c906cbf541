#!/usr/bin/env bash
# docs/results.md's section "bfloat16 against float32": the default model (softmax_lb) on the
# built-in corpus, 3 seeds, one validation split, in float32 (learning rate tuned on the grid
# at the tuning seed) and with compute_dtype="bfloat16" at that same rate; then
# scripts/bf16_results.py pairs the seeds and writes the section. About 15 min on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test,train}" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT=runs/bf16
mkdir -p "$OUT"
.venv/bin/python -m moe_py info | grep -E "^(cpu|cpu_simd|bf16_gemm|openmp_threads) " > "$OUT/machine.txt"
.venv/bin/python -m moe_py tournament --out "$OUT/float32" --corpus python --routers softmax_lb \
  --lr-grid 1e-3,3e-3,1e-2 --seeds 3 --quiet > "$OUT/float32.out"
LR=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['settings']['lr_choice']['softmax_lb']['lr'])" "$OUT/float32/tournament.json")
.venv/bin/python -m moe_py tournament --out "$OUT/bfloat16" --corpus python --routers softmax_lb \
  --lr "$LR" --seeds 3 --compute-dtype bfloat16 --quiet > "$OUT/bfloat16.out"
.venv/bin/python scripts/bf16_results.py "$OUT" --out docs/results.md
