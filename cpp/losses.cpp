#include "losses.h"

#include <vector>

namespace moe {

template <typename T>
double load_balance_forward(const T* probs, const std::uint8_t* mask,
                            const index_t* tokens_per_expert, index_t n_tokens, index_t E,
                            index_t k, index_t R) {
  if (R == 0) return 0.0;
  std::vector<double> P(E, 0.0);
  for (index_t t = 0; t < n_tokens; ++t) {
    if (!mask[t]) continue;
    const T* row = probs + t * E;
    for (index_t e = 0; e < E; ++e) P[e] += row[e];
  }
  double total = 0.0;
  for (index_t e = 0; e < E; ++e) {
    const double f = double(tokens_per_expert[e]) / double(R * k);
    total += f * (P[e] / double(R));
  }
  return double(E) * total;
}

template <typename T>
void load_balance_backward(const index_t* tokens_per_expert, index_t E, index_t k, index_t R,
                           T coef, T* grad_row) {
  for (index_t e = 0; e < E; ++e) {
    if (R == 0) {
      grad_row[e] = 0;
      continue;
    }
    const double f = double(tokens_per_expert[e]) / double(R * k);
    grad_row[e] = T(double(coef) * double(E) * f / double(R));
  }
}

template <typename T>
double z_loss_forward(const T* logits, const std::uint8_t* mask, index_t n_tokens, index_t E,
                      index_t R) {
  if (R == 0) return 0.0;
  std::vector<double> z(n_tokens, 0.0);
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < n_tokens; ++t)
    if (mask[t]) {
      const double lse = logsumexp_row(logits + t * E, E);
      z[t] = lse * lse;
    }
  double total = 0.0;
  for (index_t t = 0; t < n_tokens; ++t) total += z[t];  // token order: thread-independent
  return total / double(R);
}

template <typename T>
double entropy_loss_forward(const T* entropy, const std::uint8_t* mask, index_t n_tokens,
                            index_t R) {
  if (R == 0) return 0.0;
  double total = 0.0;
  for (index_t t = 0; t < n_tokens; ++t)
    if (mask[t]) total += entropy[t];
  return total / double(R);
}

#define MOE_INSTANTIATE(T)                                                                     \
  template double load_balance_forward<T>(const T*, const std::uint8_t*, const index_t*,       \
                                          index_t, index_t, index_t, index_t);                 \
  template void load_balance_backward<T>(const index_t*, index_t, index_t, index_t, T, T*);    \
  template double z_loss_forward<T>(const T*, const std::uint8_t*, index_t, index_t, index_t); \
  template double entropy_loss_forward<T>(const T*, const std::uint8_t*, index_t, index_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
