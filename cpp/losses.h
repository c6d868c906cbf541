// Router losses: the one implementation of each (docs/design.md, "Losses"). Every
// reduction is over real tokens only, runs in token order on one thread (so
// the bits never depend on the thread count) and is 0 when R = 0.
#pragma once
#include <cmath>
#include <vector>

#include "tensor.h"

namespace moe {

// ---- per-token pieces (one row of E values) -------------------------------

template <typename T>
inline T logsumexp_row(const T* logits, index_t E) {
  T m = logits[0];
  for (index_t e = 1; e < E; ++e) m = std::max(m, logits[e]);
  T s = 0;
  for (index_t e = 0; e < E; ++e) s += std::exp(logits[e] - m);
  return m + std::log(s);
}

template <typename T>
inline void softmax_row(const T* logits, T* probs, index_t E) {
  T m = logits[0];
  for (index_t e = 1; e < E; ++e) m = std::max(m, logits[e]);
  T s = 0;
  for (index_t e = 0; e < E; ++e) {
    probs[e] = std::exp(logits[e] - m);
    s += probs[e];
  }
  const T inv = T(1) / s;
  for (index_t e = 0; e < E; ++e) probs[e] *= inv;
}

// dlogits += J_softmax^T dprobs = p * (dp - <dp, p>)
template <typename T>
inline void softmax_backward_row(const T* probs, const T* dprobs, T* dlogits, index_t E) {
  T dot = 0;
  for (index_t e = 0; e < E; ++e) dot += dprobs[e] * probs[e];
  for (index_t e = 0; e < E; ++e) dlogits[e] += probs[e] * (dprobs[e] - dot);
}

// -sum p log p in nats; an underflowed p = 0 contributes 0.
template <typename T>
inline T entropy_row(const T* probs, index_t E) {
  T h = 0;
  for (index_t e = 0; e < E; ++e)
    if (probs[e] > 0) h -= probs[e] * std::log(probs[e]);
  return h;
}

// ---- load balance: E * sum_e f_e * P_e --------------------------------------
// Over groups of tokens: the batch (one group), or each sequence of seq_len rows
// (DeepSeek-V3's sequence-wise balance loss), averaged over the groups that hold real
// tokens. f_ge = c_ge / sum_e c_ge from the assignment counts c (before capacity dropping;
// the batch group adds the counts of earlier micro-batches for the global scope), P_ge =
// mean over the group's real tokens of dist[:, e] (the router's probabilities, or its
// sigmoid scores normalised per token). The gradient flows through P only.

struct BalanceGroups {
  index_t rows = 0;            // tokens per group (n_tokens for the batch)
  index_t count = 0;           // groups
  index_t active = 0;          // groups with real tokens
  std::vector<double> f;       // [count, E]
  std::vector<index_t> real;   // [count] real tokens per group
};

// seq_len 0: the batch; extra_counts (may be null) adds to the batch's counts.
BalanceGroups balance_groups(const index_t* indices, index_t width, const std::uint8_t* mask,
                             const index_t* tokens_per_expert, const index_t* extra_counts,
                             index_t n_tokens, index_t E, index_t seq_len);

template <typename T>
double load_balance_forward(const T* dist, const std::uint8_t* mask, const BalanceGroups& g,
                            index_t n_tokens, index_t E);

// One group's loss from its f and its column sums of dist over its `real` tokens:
// E * sum_e f_e * (prob_sums[e] / real). load_balance_forward adds these up.
inline double group_load_balance(const double* f, const double* prob_sums, index_t real,
                                 index_t E) {
  double total = 0.0;
  for (index_t e = 0; e < E; ++e) total += f[e] * (prob_sums[e] / double(real));
  return double(E) * total;
}

// The batch scope's loss from counts and column sums gathered elsewhere (expert
// parallelism adds up every rank's): f from the counts as balance_groups makes it. 0 when
// real = 0 or no assignment was counted.
double load_balance_of_sums(const index_t* counts, const double* prob_sums, index_t real,
                            index_t E);

// The gradient w.r.t. dist is the same row for every real token of a group:
// d/ddist[t, e] = coef * E * f_ge / (R_g * active). Writes it into grad_rows[count * E].
template <typename T>
void load_balance_backward(const BalanceGroups& g, index_t E, T coef, T* grad_rows);

// ---- z-loss: mean_t logsumexp(logits[t])^2 ----------------------------------

template <typename T>
double z_loss_forward(const T* logits, const std::uint8_t* mask, index_t n_tokens, index_t E,
                      index_t R);

// dlogits_row += scale * 2 lse * softmax(logits); scale = coef / R.
template <typename T>
inline void z_loss_backward_row(const T* logits, const T* probs_clean, index_t E, T scale,
                                T* dlogits) {
  const T g = scale * T(2) * logsumexp_row(logits, E);
  for (index_t e = 0; e < E; ++e) dlogits[e] += g * probs_clean[e];
}

// ---- entropy: mean_t H(router_probs_clean[t]) --------------------------------

template <typename T>
double entropy_loss_forward(const T* entropy, const std::uint8_t* mask, index_t n_tokens,
                            index_t R);

// dH/dlogit_e = -p_e (log p_e + H); dlogits_row += scale * that; scale = coef / R.
template <typename T>
inline void entropy_backward_row(const T* probs_clean, T entropy, index_t E, T scale,
                                 T* dlogits) {
  for (index_t e = 0; e < E; ++e) {
    const T p = probs_clean[e];
    if (p > 0) dlogits[e] -= scale * p * (std::log(p) + entropy);
  }
}

}  // namespace moe
