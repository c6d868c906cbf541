#include "losses.h"

#include <algorithm>
#include <vector>

namespace moe {

BalanceGroups balance_groups(const index_t* indices, index_t width, const std::uint8_t* mask,
                             const index_t* tokens_per_expert, const index_t* extra_counts,
                             index_t n_tokens, index_t E, index_t seq_len) {
  BalanceGroups g;
  g.rows = seq_len > 0 ? seq_len : n_tokens;
  g.count = seq_len > 0 ? n_tokens / seq_len : 1;
  std::vector<index_t> counts(g.count * E, 0);
  g.real.assign(g.count, 0);
  for (index_t t = 0; t < n_tokens; ++t)
    if (mask[t]) ++g.real[seq_len > 0 ? t / seq_len : 0];
  if (seq_len > 0) {
    for (index_t t = 0; t < n_tokens; ++t)
      if (mask[t])
        for (index_t j = 0; j < width; ++j)
          if (indices[t * width + j] >= 0) ++counts[(t / seq_len) * E + indices[t * width + j]];
  } else {
    for (index_t e = 0; e < E; ++e)
      counts[e] = tokens_per_expert[e] + (extra_counts ? extra_counts[e] : 0);
  }
  g.f.assign(g.count * E, 0.0);
  for (index_t s = 0; s < g.count; ++s) {
    index_t total = 0;
    for (index_t e = 0; e < E; ++e) total += counts[s * E + e];
    if (g.real[s] > 0) ++g.active;
    if (total == 0) continue;
    for (index_t e = 0; e < E; ++e) g.f[s * E + e] = double(counts[s * E + e]) / double(total);
  }
  return g;
}

template <typename T>
double load_balance_forward(const T* dist, const std::uint8_t* mask, const BalanceGroups& g,
                            index_t n_tokens, index_t E) {
  if (g.active == 0) return 0.0;
  double sum = 0.0;
  std::vector<double> P(E);
  for (index_t s = 0; s < g.count; ++s) {
    if (g.real[s] == 0) continue;
    std::fill(P.begin(), P.end(), 0.0);
    const index_t end = std::min(n_tokens, (s + 1) * g.rows);
    for (index_t t = s * g.rows; t < end; ++t) {
      if (!mask[t]) continue;
      const T* row = dist + t * E;
      for (index_t e = 0; e < E; ++e) P[e] += row[e];
    }
    sum += group_load_balance(g.f.data() + s * E, P.data(), g.real[s], E);
  }
  return sum / double(g.active);
}

double load_balance_of_sums(const index_t* counts, const double* prob_sums, index_t real,
                            index_t E) {
  index_t total = 0;
  for (index_t e = 0; e < E; ++e) total += counts[e];
  if (real == 0 || total == 0) return 0.0;
  std::vector<double> f(E);
  for (index_t e = 0; e < E; ++e) f[e] = double(counts[e]) / double(total);
  return group_load_balance(f.data(), prob_sums, real, E);
}

template <typename T>
void load_balance_backward(const BalanceGroups& g, index_t E, T coef, T* grad_rows) {
  for (index_t s = 0; s < g.count; ++s)
    for (index_t e = 0; e < E; ++e)
      grad_rows[s * E + e] =
          g.real[s] == 0 ? T(0)
                         : T(double(coef) * double(E) * g.f[s * E + e] / double(g.real[s]) /
                             double(g.active));
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
  template double load_balance_forward<T>(const T*, const std::uint8_t*, const BalanceGroups&, \
                                          index_t, index_t);                                   \
  template void load_balance_backward<T>(const BalanceGroups&, index_t, T, T*);                \
  template double z_loss_forward<T>(const T*, const std::uint8_t*, index_t, index_t, index_t); \
  template double entropy_loss_forward<T>(const T*, const std::uint8_t*, index_t, index_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
