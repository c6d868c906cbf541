#include "lm_losses.h"

#include <cmath>
#include <vector>

#include "activations.h"
#include "losses.h"

namespace moe {

template <typename T>
double cross_entropy(const T* logits, const index_t* labels, index_t n, index_t V,
                     index_t ignore_index, T* dlogits) {
  index_t valid = 0;
  for (index_t t = 0; t < n; ++t) valid += labels[t] != ignore_index ? 1 : 0;
  const T inv = valid ? T(1) / T(valid) : T(0);
  std::vector<double> nll(n, 0.0);
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < n; ++t) {
    const T* l = logits + t * V;
    T* d = dlogits + t * V;
    if (labels[t] == ignore_index) {
      std::fill(d, d + V, T(0));
      continue;
    }
    const T lse = logsumexp_row(l, V);
    nll[t] = double(lse - l[labels[t]]);
    exp_shifted(l, lse, d, V);
    for (index_t v = 0; v < V; ++v) d[v] *= inv;
    d[labels[t]] -= inv;
  }
  if (valid == 0) return 0.0;
  double total = 0.0;
  for (index_t t = 0; t < n; ++t) total += nll[t];  // token order: thread-independent
  return total / double(valid);
}

void multi_token_labels(const index_t* targets, const std::uint8_t* mask, index_t B, index_t S,
                        index_t n_heads, index_t ignore_index, index_t* labels) {
  for (index_t i = 0; i < n_heads; ++i)
    for (index_t b = 0; b < B; ++b)
      for (index_t t = 0; t < S; ++t) {
        const bool ok = t + i < S && mask[b * S + t] && mask[b * S + t + i];
        labels[(i * B + b) * S + t] = ok ? targets[b * S + t + i] : ignore_index;
      }
}

template double cross_entropy<float>(const float*, const index_t*, index_t, index_t, index_t,
                                     float*);
template double cross_entropy<double>(const double*, const index_t*, index_t, index_t, index_t,
                                      double*);

}  // namespace moe
