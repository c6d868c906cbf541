#include "optim.h"

#include <cmath>
#include <vector>

namespace moe {

namespace {
// Below this many elements a parallel region costs more than it saves.
constexpr index_t kParallelMin = 1 << 15;
// Elements per partial sum of sum_squares: fixed, never from the thread count.
constexpr index_t kSumChunk = 1 << 14;
}  // namespace

template <typename T>
void adamw_step(T* p, const T* g, T* m, T* v, index_t n, const AdamWStep& s) {
  const T scale = T(s.grad_scale), b1 = T(s.beta1), b2 = T(s.beta2);
  const T one_b1 = T(1 - s.beta1), one_b2 = T(1 - s.beta2);
  const T step = T(s.lr / s.bias1), bias2 = T(s.bias2), eps = T(s.eps), decay = T(s.decay);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (index_t i = 0; i < n; ++i) {
    const T gs = g[i] * scale;
    m[i] = m[i] * b1 + one_b1 * gs;
    v[i] = v[i] * b2 + one_b2 * (gs * gs);
    p[i] = p[i] * decay - step * m[i] / (std::sqrt(v[i] / bias2) + eps);
  }
}

template <typename T>
double sum_squares(const T* g, index_t n) {
  const index_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> part(chunks);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (index_t c = 0; c < chunks; ++c) {
    const index_t end = std::min(n, (c + 1) * kSumChunk);
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    index_t i = c * kSumChunk;
    for (; i + 8 <= end; i += 8)
      for (int l = 0; l < 8; ++l) acc[l] += double(g[i + l]) * double(g[i + l]);
    for (int l = 0; i < end; ++i, ++l) acc[l] += double(g[i]) * double(g[i]);
    part[c] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  }
  double total = 0;
  for (double x : part) total += x;
  return total;
}

template void adamw_step<float>(float*, const float*, float*, float*, index_t, const AdamWStep&);
template void adamw_step<double>(double*, const double*, double*, double*, index_t,
                                 const AdamWStep&);
template double sum_squares<float>(const float*, index_t);
template double sum_squares<double>(const double*, index_t);

}  // namespace moe
