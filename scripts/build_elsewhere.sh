# Sourced by sanitize.sh and isa_check.sh: build the extension with extra CMake arguments
# into a folder of its own and make a Python that imports moe_py from that build.
#   build_elsewhere BUILD_DIR CMAKE_ARGS...   sets PKG (the package copy) and ALT_PY
#   check_imports_copy                          checks that ALT_PY imports that copy
# ALT_PY is a venv of its own that sees .venv's packages but not the editable install's
# import hook (a .pth in a site folder runs; a folder named by another .pth does not have
# its .pth files run); with PYTHONPATH="$PKG" it imports the copy.
build_elsewhere() {
  local build="$1"; shift
  local py="$ROOT/.venv/bin/python"
  local cmake; cmake="$(command -v cmake || echo "$ROOT/.venv/bin/cmake")"
  "$cmake" -S "$ROOT" -B "$build" -DCMAKE_BUILD_TYPE=Release "$@" \
    -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" >/dev/null
  "$cmake" --build "$build" -j 2 >/dev/null
  PKG="$build/pkg"
  rm -rf "$PKG" && mkdir -p "$PKG"
  cp -r "$ROOT/moe_py" "$PKG/moe_py"
  rm -f "$PKG"/moe_py/_core*.so
  cp "$build"/_core*.so "$PKG/moe_py/"
  local venv="$build/venv"
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv --without-pip "$venv"
  fi
  local site alt_site
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  alt_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$site" > "$alt_site/moe_py_deps.pth"
  ALT_PY="$venv/bin/python"
}

# Fails unless ALT_PY, run in the current environment (PYTHONPATH="$PKG", and whatever a
# sanitizer build must preload), imports the copy. Run it from the build folder: python -c
# puts the working folder first on the path.
check_imports_copy() {
  "$ALT_PY" -c 'import moe_py, sys; assert moe_py.__file__.startswith(sys.argv[1]), moe_py.__file__' "$PKG"
}
