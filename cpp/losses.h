// Router losses: the one implementation of each (docs/design.md, "Losses"). Every
// reduction is over real tokens only, runs in token order on one thread (so
// the bits never depend on the thread count) and is 0 when R = 0.
#pragma once
#include <cmath>

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
// f_e = tokens_per_expert[e] / (R k) (assignments before capacity dropping),
// P_e = mean over real tokens of probs[:, e]. The gradient flows through P only.

template <typename T>
double load_balance_forward(const T* probs, const std::uint8_t* mask,
                            const index_t* tokens_per_expert, index_t n_tokens, index_t E,
                            index_t k, index_t R);

// The gradient w.r.t. probs is the same row for every real token:
// d/dprobs[t, e] = coef * E * f_e / R. Writes it into grad_row[E].
template <typename T>
void load_balance_backward(const index_t* tokens_per_expert, index_t E, index_t k, index_t R,
                           T coef, T* grad_row);

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
