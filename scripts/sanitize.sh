#!/usr/bin/env bash
# The non-slow tests and the property (fuzz) tests against an AddressSanitizer +
# UndefinedBehaviorSanitizer build of the extension, in its own build folder.
# Needs the set-up of scripts/setup.sh (.venv). Any sanitizer report fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/build_elsewhere.sh"
build_elsewhere "$ROOT/build/sanitize" -DMOE_SANITIZE=ON
BUILD="$ROOT/build/sanitize"

# libstdc++ preloaded too: ASan must find the real __cxa_throw when it starts, and Python
# itself does not link libstdc++
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# Python itself leaks by design at exit; ASan's quarantine would inflate RSS checks.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export MOE_PY_SANITIZED=1 PYTHONPATH="$PKG" MPLBACKEND=Agg
cd "$BUILD"  # not the checkout: python -m puts the working folder first on the path
check_imports_copy
echo "sanitize: running the non-slow and property tests under ASan + UBSan" >&2
# torch's own libraries are not built for ASan: its tests run in the release job only
exec "$ALT_PY" -m pytest -q -p no:cacheprovider -m "not slow" \
  --ignore="$ROOT/tests/test_torch.py" "$ROOT/tests" "$@"
