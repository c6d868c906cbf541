#include "rmsnorm.h"

#include <cmath>
#include <vector>

#include "reduce.h"

namespace moe {

template <typename T>
void rmsnorm_forward(const T* x, const T* g, index_t n, index_t d, T eps, T* y, T* rstd) {
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < n; ++t) {
    const T* xr = x + t * d;
    const T r = T(1) / std::sqrt(dot(xr, xr, d) / T(d) + eps);
    rstd[t] = r;
    for (index_t i = 0; i < d; ++i) y[t * d + i] = xr[i] * r * g[i];
  }
}

template <typename T>
void rmsnorm_backward(const T* x, const T* g, const T* rstd, const T* dy, index_t n, index_t d,
                      T* dx, T* dg) {
  const index_t chunks = (n + kReduceRowChunk - 1) / kReduceRowChunk;
  std::vector<T> partial(chunks * d, T(0));
#pragma omp parallel
  {
    std::vector<T> gdy(d);
#pragma omp for schedule(static)
    for (index_t c = 0; c < chunks; ++c) {
      T* pg = partial.data() + c * d;
      for (index_t t = c * kReduceRowChunk; t < std::min(n, (c + 1) * kReduceRowChunk); ++t) {
        const T* xr = x + t * d;
        const T* dyr = dy + t * d;
        const T r = rstd[t];
        for (index_t i = 0; i < d; ++i) gdy[i] = dyr[i] * g[i];
        const T m = dot(gdy.data(), xr, d) / T(d);
        for (index_t i = 0; i < d; ++i) {
          dx[t * d + i] = r * (gdy[i] - xr[i] * r * r * m);
          pg[i] += dyr[i] * xr[i] * r;
        }
      }
    }
  }
  for (index_t c = 0; c < chunks; ++c)
    for (index_t i = 0; i < d; ++i) dg[i] += partial[c * d + i];
}

#define MOE_INSTANTIATE(T)                                                                    \
  template void rmsnorm_forward<T>(const T*, const T*, index_t, index_t, T, T*, T*);          \
  template void rmsnorm_backward<T>(const T*, const T*, const T*, const T*, index_t, index_t, \
                                    T*, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
