// Per-expert scores, sigmoid (sigmoid_topk) and sqrt(softplus) (sqrtsoftplus_topk), and the
// per-token distribution the losses read from them: q = s / sum(s), as DeepSeek-V3's balance
// loss normalises its sigmoid scores. Softmax scores are their own distribution (losses.h
// has softmax_row).
#pragma once
#include <cmath>

#include "tensor.h"

namespace moe {

template <typename T>
inline void sigmoid_row(const T* logits, T* scores, index_t E) {
  for (index_t e = 0; e < E; ++e) scores[e] = T(1) / (T(1) + std::exp(-logits[e]));
}

// dlogits += dscores * s (1 - s)
template <typename T>
inline void sigmoid_backward_row(const T* scores, const T* dscores, T* dlogits, index_t E) {
  for (index_t e = 0; e < E; ++e) dlogits[e] += dscores[e] * scores[e] * (T(1) - scores[e]);
}

// s = sqrt(softplus(l)) (DeepSeek-V4's score function), with softplus as
// torch.nn.functional.softplus computes it: l above 20, else log1p(exp(l)) (no overflow, and
// no cancellation for very negative l). Above 20 this l is within 2.1e-9 of the exact value;
// taking torch's convention keeps moe_py's scores the same as transformers' to rounding.
constexpr double kSoftplusThreshold = 20.0;

template <typename T>
inline void sqrtsoftplus_row(const T* logits, T* scores, index_t E) {
  for (index_t e = 0; e < E; ++e) {
    const T l = logits[e];
    scores[e] = std::sqrt(l > T(kSoftplusThreshold) ? l : std::log1p(std::exp(l)));
  }
}

// ds/dl = sigmoid(l) / (2 s), with sigmoid(l) = 1 - exp(-softplus(l)) = -expm1(-s^2): the
// scores are all the backward keeps (the noisy logits are not saved). An s that underflowed
// to 0 (l below about -745 in float64, -104 in float32) has the limit 0 as its derivative.
template <typename T>
inline void sqrtsoftplus_backward_row(const T* scores, const T* dscores, T* dlogits, index_t E) {
  for (index_t e = 0; e < E; ++e) {
    const T s = scores[e];
    if (s > T(0)) dlogits[e] += dscores[e] * (-std::expm1(-s * s)) / (T(2) * s);
  }
}

template <typename T>
inline T row_sum(const T* v, index_t E) {
  T s = 0;
  for (index_t e = 0; e < E; ++e) s += v[e];
  return s;
}

template <typename T>
inline void normalized_row(const T* scores, T* q, index_t E) {
  const T S = row_sum(scores, E);
  for (index_t e = 0; e < E; ++e) q[e] = scores[e] / S;
}

// q = s / S:  dscores += (dq - <dq, q>) / S
template <typename T>
inline void normalized_backward_row(const T* scores, const T* dq, T* dscores, index_t E) {
  const T S = row_sum(scores, E);
  T dot = 0;
  for (index_t e = 0; e < E; ++e) dot += dq[e] * (scores[e] / S);
  for (index_t e = 0; e < E; ++e) dscores[e] += (dq[e] - dot) / S;
}

// -sum q log q of q = s / S, in nats.
template <typename T>
inline T normalized_entropy_row(const T* scores, index_t E) {
  const T S = row_sum(scores, E);
  T h = 0;
  for (index_t e = 0; e < E; ++e) {
    const T q = scores[e] / S;
    if (q > 0) h -= q * std::log(q);
  }
  return h;
}

// dH/ds_e = -(log q_e + H) / S (the +1 of d(-q log q) cancels under the normalisation);
// dscores += scale * that.
template <typename T>
inline void normalized_entropy_backward_row(const T* scores, T entropy, index_t E, T scale,
                                            T* dscores) {
  const T S = row_sum(scores, E);
  for (index_t e = 0; e < E; ++e) {
    const T q = scores[e] / S;
    if (q > 0) dscores[e] -= scale * (std::log(q) + entropy) / S;
  }
}

}  // namespace moe
