#!/usr/bin/env bash
# The kernel tests against the extension built for another instruction set than this
# machine's best, so that every code path of the GEMM micro-kernel (cpp/small_gemm.cpp) is
# tested on one machine:
#   haswell  AVX2 + FMA: the ymm micro-kernel, as on an AMD EPYC Zen 3 or an older Xeon
#   generic  x86-64 without AVX: the BLAS fallback
# With a command after --, runs that Python script with the other build instead, e.g. a
# benchmark:  bash scripts/isa_check.sh haswell -- benchmarks/bench_layer.py --repeats 5
# The CPU must have the instruction set (haswell: AVX2 and FMA). Needs scripts/setup.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ISA="${1:?usage: isa_check.sh haswell|generic [-- script.py args...]}"
shift
case "$ISA" in
  haswell) MARCH=haswell KERNEL=avx2 ;;
  generic) MARCH=x86-64 KERNEL=blas ;;
  *) echo "isa_check.sh: unknown instruction set '$ISA' (haswell or generic)" >&2; exit 2 ;;
esac
source "$ROOT/scripts/build_elsewhere.sh"
build_elsewhere "$ROOT/build/isa-$ISA" -DMOE_NATIVE=OFF "-DCMAKE_CXX_FLAGS=-march=$MARCH"
export PYTHONPATH="$PKG" MPLBACKEND=Agg
cd "$ROOT/build/isa-$ISA"  # not the checkout: python -m puts the working folder first on the path
check_imports_copy
"$ALT_PY" -c '
import sys, moe_py
kernel = moe_py.build_info()["gemm_kernel"]
assert kernel == sys.argv[1], f"built for {sys.argv[2]} but the GEMM kernel is {kernel}"
' "$KERNEL" "$ISA"
if [ "${1:-}" = "--" ]; then
  shift
  script="$1"; shift
  case "$script" in /*) ;; *) script="$ROOT/$script" ;; esac
  exec "$ALT_PY" "$script" "$@"
fi
echo "isa_check: kernel tests with the $ISA build (GEMM kernel: $KERNEL)" >&2
exec "$ALT_PY" -m pytest -q -p no:cacheprovider -m "not slow" "$@" \
  "$ROOT"/tests/test_{small_gemm,small_gemm_bf16,bf16,experts,layer,reference,model,determinism,router_variants,router_softmax_topk,routed_experts,interventions,dispatch,optim,lm_losses}.py
