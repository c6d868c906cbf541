#!/usr/bin/env bash
# The non-slow tests and the property (fuzz) tests against an AddressSanitizer +
# UndefinedBehaviorSanitizer build of the extension, in its own build folder.
# Needs the set-up of scripts/setup.sh (.venv). Any sanitizer report fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
BUILD="$ROOT/build/sanitize"
PKG="$BUILD/pkg"

CMAKE="$(command -v cmake || echo "$ROOT/.venv/bin/cmake")"
"$CMAKE" -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMOE_SANITIZE=ON \
  -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
"$CMAKE" --build "$BUILD" -j 2 >/dev/null

# A package of the sources and the sanitized extension, first on the path. A venv of its own
# that sees .venv's packages but not the editable install's import hook (a .pth in a site
# folder runs; a folder named by another .pth does not have its .pth files run).
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r moe_py "$PKG/moe_py"
rm -f "$PKG"/moe_py/_core*.so
cp "$BUILD"/_core*.so "$PKG/moe_py/"
SAN_VENV="$BUILD/venv"
if [ ! -x "$SAN_VENV/bin/python" ]; then
  "$PY" -m venv --without-pip "$SAN_VENV"
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SAN_SITE="$("$SAN_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$SITE" > "$SAN_SITE/moe_py_deps.pth"

# libstdc++ preloaded too: ASan must find the real __cxa_throw when it starts, and Python
# itself does not link libstdc++
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# Python itself leaks by design at exit; ASan's quarantine would inflate RSS checks.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export MOE_PY_SANITIZED=1 PYTHONPATH="$PKG" MPLBACKEND=Agg
cd "$BUILD"  # not the checkout: python -m puts the working folder first on the path
"$SAN_VENV/bin/python" -c 'import moe_py, sys; assert moe_py.__file__.startswith(sys.argv[1]), moe_py.__file__' "$PKG"
echo "sanitize: running the non-slow and property tests under ASan + UBSan" >&2
# torch's own libraries are not built for ASan: its tests run in the release job only
exec "$SAN_VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" \
  --ignore="$ROOT/tests/test_torch.py" "$ROOT/tests" "$@"
