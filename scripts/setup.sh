#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: Debian's Eigen, a virtual
# environment in .venv, and moe_py built into it (editable) against PyPI's
# scipy-openblas32 (Debian's OpenBLAS 0.3.21 runs SSE3 kernels on newer CPUs).
# Sourced by run.sh and test.sh; EXTRAS picks the pip extras (default: test,train,notebooks).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need_apt=()
[ -f /usr/include/eigen3/Eigen/Dense ] || need_apt+=(libeigen3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${need_apt[*]} from Debian" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
# Build requirements in the venv, then an editable build without isolation:
# rebuilds are incremental (build/) and need no fresh download each time.
.venv/bin/pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "scipy-openblas32>=0.3.27"
.venv/bin/pip install -q --no-build-isolation -e ".[${EXTRAS:-test,train,notebooks}]"
