#include "router.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "blas.h"
#include "losses.h"
#include "rng.h"

namespace moe {

namespace {

// k largest of probs[0..E), in descending order, ties to the lower index:
// one pass of insertion into the sorted prefix (an equal value never moves
// ahead of one already placed, and lower indices are placed first).
template <typename T>
void topk_row(const T* probs, index_t E, index_t k, index_t* indices) {
  index_t filled = 0;
  for (index_t e = 0; e < E; ++e) {
    const T v = probs[e];
    if (filled == k && !(v > probs[indices[k - 1]])) continue;
    index_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > probs[indices[pos - 1]]) {
      indices[pos] = indices[pos - 1];
      --pos;
    }
    indices[pos] = e;
  }
}

// Capacity C = ceil(c * R * k / E); the assignments past it are marked dropped, in the
// order of the drop policy (router.h).
template <typename T>
void assign_capacity(const index_t* indices, const T* probs, const std::uint8_t* mask,
                     index_t n_tokens, index_t E, index_t k, index_t R, double capacity_factor,
                     DropPolicy policy, std::uint8_t* dropped) {
  // Clamped before the conversion: past R*k no assignment can be dropped, and a huge
  // factor would overflow index_t.
  const double raw = std::ceil(capacity_factor * double(R) * double(k) / double(E));
  const index_t capacity = raw >= double(R * k) ? R * k : index_t(raw);
  if (policy == DropPolicy::position) {
    std::vector<index_t> used(E, 0);
    for (index_t j = 0; j < k; ++j)
      for (index_t t = 0; t < n_tokens; ++t) {
        if (!mask[t]) continue;
        const index_t e = indices[t * k + j];
        if (used[e] < capacity)
          ++used[e];
        else
          dropped[t * k + j] = 1;
      }
    return;
  }
  // probs: per expert, its assignments by descending probability (stable in (t, j) order)
  std::vector<std::vector<index_t>> slots(E);  // flat slot t * k + j
  for (index_t t = 0; t < n_tokens; ++t)
    if (mask[t])
      for (index_t j = 0; j < k; ++j) slots[indices[t * k + j]].push_back(t * k + j);
  for (index_t e = 0; e < E; ++e) {
    auto& v = slots[e];
    std::stable_sort(v.begin(), v.end(), [&](index_t a, index_t b) {
      return probs[(a / k) * E + e] > probs[(b / k) * E + e];
    });
    for (std::size_t i = std::size_t(capacity); i < v.size(); ++i) dropped[v[i]] = 1;
  }
}

}  // namespace

template <typename T>
RouterLossValues router_forward(const T* x, const T* w_router, const std::uint8_t* mask,
                                index_t n_tokens, index_t d_model, index_t E,
                                const RouterOptions& opt, const RouterBuffers<T>& out) {
  const index_t k = opt.top_k;
  gemm_tiled<T>(false, false, n_tokens, E, d_model, T(1), x, d_model, w_router, E, T(0),
                out.logits, E);
  const bool noisy = opt.training && opt.noise_std > 0.0;

#pragma omp parallel
  {
    std::vector<T> noisy_logits(E);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n_tokens; ++t) {
      T* pc = out.probs_clean + t * E;
      T* p = out.probs + t * E;
      index_t* idx = out.topk_indices + t * k;
      T* wts = out.topk_weights + t * k;
      std::fill(out.dropped + t * k, out.dropped + (t + 1) * k, std::uint8_t(0));
      if (!mask[t]) {
        std::fill(pc, pc + E, T(0));
        std::fill(p, p + E, T(0));
        std::fill(idx, idx + k, index_t(-1));
        std::fill(wts, wts + k, T(0));
        out.entropy[t] = 0;
        continue;
      }
      const T* l = out.logits + t * E;
      softmax_row(l, pc, E);
      out.entropy[t] = entropy_row(pc, E);
      if (noisy) {
        for (index_t e = 0; e < E; ++e)
          noisy_logits[e] = l[e] + T(opt.noise_std * normal_at(opt.noise_seed, opt.noise_step,
                                                               std::uint64_t(t * E + e)));
        softmax_row(noisy_logits.data(), p, E);
      } else {
        std::copy(pc, pc + E, p);
      }
      topk_row(p, E, k, idx);
      T sum = 0;
      for (index_t j = 0; j < k; ++j) sum += p[idx[j]];
      for (index_t j = 0; j < k; ++j) {
        const T soft = opt.normalize_topk ? p[idx[j]] / sum : p[idx[j]];
        wts[j] = opt.straight_through ? T(1) : soft;
      }
    }
  }

  index_t R = 0;
  for (index_t t = 0; t < n_tokens; ++t) R += mask[t] ? 1 : 0;
  std::fill(out.tokens_per_expert, out.tokens_per_expert + E, index_t(0));
  for (index_t t = 0; t < n_tokens; ++t)
    if (mask[t])
      for (index_t j = 0; j < k; ++j) ++out.tokens_per_expert[out.topk_indices[t * k + j]];

  if (opt.capacity_factor >= 0.0) {
    assign_capacity<T>(out.topk_indices, out.probs, mask, n_tokens, E, k, R, opt.capacity_factor,
                       opt.drop_policy, out.dropped);
    for (index_t i = 0; i < n_tokens * k; ++i)
      if (out.dropped[i]) out.topk_weights[i] = 0;
  }

  RouterLossValues losses;
  losses.load_balance =
      load_balance_forward(out.probs, mask, out.tokens_per_expert, n_tokens, E, k, R);
  losses.z_loss = z_loss_forward(out.logits, mask, n_tokens, E, R);
  losses.entropy = entropy_loss_forward(out.entropy, mask, n_tokens, R);
  return losses;
}

template <typename T>
void router_backward(const T* x, const T* w_router, const std::uint8_t* mask, index_t n_tokens,
                     index_t d_model, index_t E, const RouterOptions& opt,
                     const RouterLossCoefs& coefs, const RouterBuffers<T>& saved,
                     const T* d_topk_weights, T* dx, T* dw_router) {
  const index_t k = opt.top_k;
  index_t R = 0;
  for (index_t t = 0; t < n_tokens; ++t) R += mask[t] ? 1 : 0;
  if (R == 0) return;

  std::vector<T> lb_grad(E);
  load_balance_backward<T>(saved.tokens_per_expert, E, k, R, T(coefs.load_balance),
                           lb_grad.data());
  const T z_scale = T(coefs.z_loss / double(R));
  const T ent_scale = T(coefs.entropy / double(R));
  // Straight-through outside training: the weights are constant 1, no gradient.
  const bool weights_have_grad = d_topk_weights && (opt.training || !opt.straight_through);

  std::vector<T> dlogits(n_tokens * E, T(0));
#pragma omp parallel
  {
    std::vector<T> dprobs(E);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n_tokens; ++t) {
      if (!mask[t]) continue;
      const T* p = saved.probs + t * E;
      const T* pc = saved.probs_clean + t * E;
      const index_t* idx = saved.topk_indices + t * k;
      const std::uint8_t* drop = saved.dropped + t * k;
      T* dl = dlogits.data() + t * E;

      std::copy(lb_grad.begin(), lb_grad.end(), dprobs.begin());
      if (weights_have_grad) {
        // The gradient reaches the soft weight (straight-through passes it on
        // unchanged); dropped slots are multiplied by 0 and get none.
        const T* g = d_topk_weights + t * k;
        if (opt.normalize_topk) {
          // w_j = p_j / S:  dp_i = (g_i - sum_j g_j w_j) / S
          T S = 0;
          for (index_t j = 0; j < k; ++j) S += p[idx[j]];
          T gw = 0;
          for (index_t j = 0; j < k; ++j)
            if (!drop[j]) gw += g[j] * p[idx[j]] / S;
          for (index_t j = 0; j < k; ++j) dprobs[idx[j]] += ((drop[j] ? T(0) : g[j]) - gw) / S;
        } else {
          for (index_t j = 0; j < k; ++j)
            if (!drop[j]) dprobs[idx[j]] += g[j];
        }
      }
      // noise is additive, so d(noisy logits) = d(logits)
      softmax_backward_row(p, dprobs.data(), dl, E);
      if (z_scale != T(0)) z_loss_backward_row(saved.logits + t * E, pc, E, z_scale, dl);
      if (ent_scale != T(0)) entropy_backward_row(pc, saved.entropy[t], E, ent_scale, dl);
    }
  }
  // dx += dlogits @ w^T ; dw += x^T @ dlogits  (rows of dw tiled: no split reduction)
  gemm_tiled<T>(false, true, n_tokens, d_model, E, T(1), dlogits.data(), E, w_router, E, T(1),
                dx, d_model);
  gemm_tiled<T>(true, false, d_model, E, n_tokens, T(1), x, d_model, dlogits.data(), E, T(1),
                dw_router, E);
}

#define MOE_INSTANTIATE(T)                                                                    \
  template RouterLossValues router_forward<T>(const T*, const T*, const std::uint8_t*,        \
                                              index_t, index_t, index_t, const RouterOptions&, \
                                              const RouterBuffers<T>&);                       \
  template void router_backward<T>(const T*, const T*, const std::uint8_t*, index_t, index_t, \
                                   index_t, const RouterOptions&, const RouterLossCoefs&,     \
                                   const RouterBuffers<T>&, const T*, T*, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
