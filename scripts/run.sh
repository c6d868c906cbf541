#!/usr/bin/env bash
# The main job: set-up (idempotent) then moe_py's CLI with its built-in defaults.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${EXTRAS:-test,train,notebooks}" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
if [ $# -eq 0 ]; then
  # the default job: train on the built-in Python-source corpus, then analyse the run
  .venv/bin/python -m moe_py train --out runs/default --overwrite
  exec .venv/bin/python -m moe_py analyze runs/default
fi
exec .venv/bin/python -m moe_py "$@"
