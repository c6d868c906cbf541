#include "linear.h"

#include "blas.h"

namespace moe {

template <typename T>
void linear_forward(const T* x, const T* w, index_t n, index_t in, index_t out, T* y) {
  gemm_tiled<T>(false, false, n, out, in, T(1), x, in, w, out, T(0), y, out);
}

template <typename T>
void linear_backward(const T* x, const T* w, const T* dy, index_t n, index_t in, index_t out,
                     T* dx, T* dw) {
  if (dx) gemm_tiled<T>(false, true, n, in, out, T(1), dy, out, w, out, T(0), dx, in);
  gemm_tiled<T>(true, false, in, out, n, T(1), x, in, dy, out, T(1), dw, out);
}

template void linear_forward<float>(const float*, const float*, index_t, index_t, index_t, float*);
template void linear_forward<double>(const double*, const double*, index_t, index_t, index_t,
                                     double*);
template void linear_backward<float>(const float*, const float*, const float*, index_t, index_t,
                                     index_t, float*, float*);
template void linear_backward<double>(const double*, const double*, const double*, index_t,
                                      index_t, index_t, double*, double*);

}  // namespace moe
