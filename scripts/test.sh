#!/usr/bin/env bash
# The test command: set-up (idempotent) then the whole pytest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# mpi: mpi4py + mpich from PyPI, so that the expert-parallel tests run under a real mpiexec
EXTRAS="${EXTRAS:-test,train,notebooks,mpi}" source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -q "$@"
