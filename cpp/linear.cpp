#include "linear.h"

#include <stdexcept>
#include <type_traits>

#include "bf16.h"
#include "blas.h"
#include "pool.h"
#include "small_gemm_bf16.h"

namespace moe {

namespace {

// C [M, N] (+)= op(A) op(B) in float32, or with bfloat16 operands: on the bfloat16 kernel,
// or (the fallback) on copies of the operands rounded here.
template <typename T>
void linear_gemm(bool bf16, bool trans_a, bool trans_b, index_t M, index_t N, index_t K,
                 const T* A, index_t lda, const T* B, index_t ldb, bool accumulate, T* C,
                 index_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16 && bf16_kernel() != Bf16Kernel::fallback)
      return gemm_tiled_bf16(bf16_kernel(), trans_a, trans_b, M, N, K, A, lda, B, ldb, accumulate,
                             C, ldc);
    if (bf16) {
      const index_t na = (trans_a ? K : M) * lda, nb = (trans_b ? N : K) * ldb;
      Scratch<float> a(na), b(nb);
      round_to_bf16(A, a.get(), na);
      round_to_bf16(B, b.get(), nb);
      return gemm_tiled<float>(trans_a, trans_b, M, N, K, 1.0f, a.get(), lda, b.get(), ldb,
                               accumulate ? 1.0f : 0.0f, C, ldc);
    }
  } else if (bf16) {
    throw std::invalid_argument("bf16: bfloat16 compute needs float32 inputs and weights");
  }
  gemm_tiled<T>(trans_a, trans_b, M, N, K, T(1), A, lda, B, ldb, accumulate ? T(1) : T(0), C, ldc);
}

}  // namespace

template <typename T>
void linear_forward(const T* x, const T* w, index_t n, index_t in, index_t out, T* y, bool bf16) {
  linear_gemm<T>(bf16, false, false, n, out, in, x, in, w, out, false, y, out);
}

template <typename T>
void linear_backward(const T* x, const T* w, const T* dy, index_t n, index_t in, index_t out,
                     T* dx, T* dw, bool bf16) {
  if (dx) linear_gemm<T>(bf16, false, true, n, in, out, dy, out, w, out, false, dx, in);
  linear_gemm<T>(bf16, true, false, in, out, n, x, in, dy, out, true, dw, out);
}

template void linear_forward<float>(const float*, const float*, index_t, index_t, index_t, float*,
                                    bool);
template void linear_forward<double>(const double*, const double*, index_t, index_t, index_t,
                                     double*, bool);
template void linear_backward<float>(const float*, const float*, const float*, index_t, index_t,
                                     index_t, float*, float*, bool);
template void linear_backward<double>(const double*, const double*, const double*, index_t,
                                      index_t, index_t, double*, double*, bool);

}  // namespace moe
