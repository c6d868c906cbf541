#!/usr/bin/env bash
# docs/results.md and its figures, regenerated on this machine: the router tournament on the
# synthetic domain corpus and on Python source, each with every entry's learning rate tuned
# on a grid at a tuning seed, 3 seeds, one validation split; then scripts/results.py writes
# the tables, intervals and nulls. About 2 hours on 2 cores (docs/results.md gives the time).
# Complete runs in runs/results/ are kept, so an interrupted call resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test,train,notebooks}" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT=runs/results
GRID=1e-3,3e-3,1e-2
mkdir -p "$OUT"
.venv/bin/python -m moe_py info | grep -E "^(cpu|cpu_simd|blas_corename|openmp_threads|version) " > "$OUT/machine.txt"
for corpus in synthetic python; do
  # the tournament prints "runs: N trained, ...; S s": kept in $OUT/<corpus>.txt, one line per call
  .venv/bin/python -m moe_py tournament --out "$OUT/$corpus" --corpus "$corpus" --lr-grid "$GRID" \
    --seeds 3 > "$OUT/$corpus.out"
  grep "^runs: " "$OUT/$corpus.out" >> "$OUT/$corpus.txt"
done
# six seeds for dense, the default MoE and hash on python: seeds 0-2 and the tuning runs are
# the tournament's own (copied, so only seeds 3-5 train), to see what doubling the seeds buys
mkdir -p "$OUT/python6"
for entry in dense softmax_lb hash; do
  [ -d "$OUT/python6/$entry" ] || cp -r "$OUT/python/$entry" "$OUT/python6/$entry"
done
.venv/bin/python -m moe_py tournament --out "$OUT/python6" --corpus python --lr-grid "$GRID" \
  --seeds 6 --routers dense softmax_lb hash > "$OUT/python6.out"
grep "^runs: " "$OUT/python6.out" >> "$OUT/python6.txt"
# the README's figures: the default model (softmax_lb) at seed 0 on the showcase corpus
.venv/bin/python -m moe_py analyze "$OUT/synthetic/softmax_lb/seed-0" > "$OUT/analyze_synthetic.txt"
cp "$OUT/synthetic/softmax_lb/seed-0/expert_label.png" docs/expert_label.png
cp "$OUT/synthetic/softmax_lb/seed-0/specialisation.png" docs/specialisation.png
cp "$OUT/synthetic/specialisation.png" docs/tournament_specialisation.png
cp "$OUT/python/val_loss.png" docs/tournament_val_loss.png
.venv/bin/python scripts/results.py "$OUT" --out docs/results.md
# the bfloat16 against float32 section (its own runs in runs/bf16/)
bash scripts/bf16_results.sh
