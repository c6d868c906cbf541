#include "router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "blas.h"
#include "losses.h"
#include "rng.h"
#include "router_select.h"
#include "scores.h"

namespace moe {

namespace {

index_t count_real(const std::uint8_t* mask, index_t n) {
  index_t R = 0;
  for (index_t t = 0; t < n; ++t) R += mask[t] ? 1 : 0;
  return R;
}

// The scores of one row of logits, by the router's score function.
template <typename T>
void score_row(ScoreFunction f, const T* l, T* s, index_t E) {
  if (f == ScoreFunction::sigmoid)
    sigmoid_row(l, s, E);
  else if (f == ScoreFunction::sqrtsoftplus)
    sqrtsoftplus_row(l, s, E);
  else
    softmax_row(l, s, E);
}

// dlogits += d(scores)/d(logits)^T dscores for the per-expert score functions (softmax's
// backward couples the experts and is called on its own).
template <typename T>
void score_backward_row(ScoreFunction f, const T* s, const T* dscores, T* dlogits, index_t E) {
  if (f == ScoreFunction::sigmoid)
    sigmoid_backward_row(s, dscores, dlogits, E);
  else
    sqrtsoftplus_backward_row(s, dscores, dlogits, E);
}

// Scores, entropy and (noisy) probabilities of one real token.
template <typename T>
void score_token(const RouterOptions& opt, const T* l, index_t t, index_t E, bool noisy,
                 T* noisy_logits, T* pc, T* p, T* entropy) {
  const ScoreFunction f = score_function(opt.kind);
  score_row(f, l, pc, E);
  *entropy = normalizes_scores(opt.kind) ? normalized_entropy_row(pc, E) : entropy_row(pc, E);
  if (!noisy) {
    std::copy(pc, pc + E, p);
    return;
  }
  for (index_t e = 0; e < E; ++e)
    noisy_logits[e] = l[e] + T(opt.noise_std *
                               normal_at(opt.noise_seed, opt.noise_step,
                                         (std::uint64_t(t) + opt.noise_token_offset) *
                                                 std::uint64_t(E) + std::uint64_t(e)));
  score_row(f, noisy_logits, p, E);
}

}  // namespace

template <typename T>
const T* balance_dist(RouterKind kind, const T* probs, const std::uint8_t* mask, index_t n,
                      index_t E, std::vector<T>& scratch) {
  if (!normalizes_scores(kind)) return probs;
  scratch.assign(n * E, T(0));
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < n; ++t)
    if (mask[t]) normalized_row(probs + t * E, scratch.data() + t * E, E);
  return scratch.data();
}

template <typename T>
RouterLossValues router_forward(const RouterInputs<T>& in, index_t n_tokens, index_t d_model,
                                index_t E, const RouterOptions& opt, const RouterBuffers<T>& out) {
  const RouterKind kind = opt.kind;
  const index_t n = n_tokens;
  const index_t R = count_real(in.mask, n);
  if (kind == RouterKind::hash) {
    std::fill(out.logits, out.logits + n * E, T(0));
    select_hash(in, n, E, opt, out);
  } else {
    gemm_tiled<T>(false, false, n, E, d_model, T(1), in.x, d_model, in.w_router, E, T(0),
                  out.logits, E);
    if (in.b_router) {
#pragma omp parallel for schedule(static)
      for (index_t t = 0; t < n; ++t)
        for (index_t e = 0; e < E; ++e) out.logits[t * E + e] += in.b_router[e];
    }
    const bool noisy = opt.training && opt.noise_std > 0.0;
#pragma omp parallel
    {
      std::vector<T> noisy_logits(E);
#pragma omp for schedule(static)
      for (index_t t = 0; t < n; ++t) {
        T* pc = out.probs_clean + t * E;
        T* p = out.probs + t * E;
        if (!in.mask[t]) {
          std::fill(pc, pc + E, T(0));
          std::fill(p, p + E, T(0));
          out.entropy[t] = 0;
          continue;
        }
        score_token(opt, out.logits + t * E, t, E, noisy, noisy_logits.data(), pc, p,
                    out.entropy + t);
      }
    }
  }

  index_t width = opt.top_k;
  if (kind == RouterKind::expert_choice)
    width = select_expert_choice(in, n, E, R, opt, out);
  else if (kind != RouterKind::hash)
    select_topk(in, n, E, opt, out);
  std::fill(out.dropped, out.dropped + n * width, std::uint8_t(0));

  std::fill(out.tokens_per_expert, out.tokens_per_expert + E, index_t(0));
  for (index_t t = 0; t < n; ++t)
    if (in.mask[t])
      for (index_t j = 0; j < width; ++j) {
        const index_t e = out.topk_indices[t * width + j];
        if (e >= 0) ++out.tokens_per_expert[e];
      }

  if (opt.capacity_factor >= 0.0 && kind != RouterKind::expert_choice) {
    assign_capacity<T>(out.topk_indices, out.probs, in.mask, n, E, width, R,
                       opt.capacity_factor, opt.drop_policy, out.dropped);
    for (index_t i = 0; i < n * width; ++i)
      if (out.dropped[i]) out.topk_weights[i] = 0;
  }

  RouterLossValues losses;
  losses.width = width;
  const BalanceGroups groups = balance_groups(out.topk_indices, width, in.mask,
                                              out.tokens_per_expert, in.balance_counts, n, E,
                                              opt.seq_len);
  std::vector<T> scratch;
  losses.load_balance = load_balance_forward(balance_dist(kind, out.probs, in.mask, n, E, scratch),
                                             in.mask, groups, n, E);
  // the hash router has no logits
  losses.z_loss = kind == RouterKind::hash ? 0.0 : z_loss_forward(out.logits, in.mask, n, E, R);
  losses.entropy = entropy_loss_forward(out.entropy, in.mask, n, R);
  return losses;
}

namespace {

// d(sum_j g_j w_j)/d(scores) for w_j = c * p_j / D (normalised, D = topk_denominator of
// S = sum_j p_j) or c * p_j; dropped and empty slots have weight 0 and pass nothing.
template <typename T>
void add_weight_grads(const T* p, const index_t* idx, const std::uint8_t* drop, const T* g,
                      index_t k, bool normalize, double norm_min, T c, T* dprobs) {
  if (normalize) {
    // D = S:  dp_i = c (g_i - sum_j g_j p_j / S) / S;  D = norm_min (floored): dp_i = c g_i / D
    T S = 0;
    for (index_t j = 0; j < k; ++j) S += p[idx[j]];
    const T D = topk_denominator(S, norm_min);
    T gw = 0;
    if (D == S)
      for (index_t j = 0; j < k; ++j)
        if (!drop[j]) gw += g[j] * p[idx[j]] / S;
    for (index_t j = 0; j < k; ++j) dprobs[idx[j]] += c * (((drop[j] ? T(0) : g[j]) - gw) / D);
  } else {
    for (index_t j = 0; j < k; ++j)
      if (idx[j] >= 0 && !drop[j]) dprobs[idx[j]] += c * g[j];
  }
}

}  // namespace

template <typename T>
void router_backward(const RouterInputs<T>& in, index_t n_tokens, index_t d_model, index_t E,
                     const RouterOptions& opt, const RouterLossCoefs& coefs,
                     const RouterBuffers<T>& saved, const T* d_topk_weights, T* dx, T* dw_router,
                     T* db_router) {
  if (opt.kind == RouterKind::hash) return;  // no router weight, nothing depends on x
  const index_t k = opt.top_k;
  const index_t n = n_tokens;
  const std::uint8_t* mask = in.mask;
  const index_t R = count_real(mask, n);
  if (R == 0) return;
  const ScoreFunction f = score_function(opt.kind);
  const bool per_expert = normalizes_scores(opt.kind);

  const BalanceGroups groups = balance_groups(saved.topk_indices, k, mask,
                                              saved.tokens_per_expert, in.balance_counts, n, E,
                                              opt.seq_len);
  std::vector<T> lb_grad(groups.count * E);
  load_balance_backward<T>(groups, E, T(coefs.load_balance), lb_grad.data());
  const T z_scale = T(coefs.z_loss / double(R));
  const T ent_scale = T(coefs.entropy / double(R));
  // Straight-through outside training: the weights are constant 1, no gradient.
  const bool weights_have_grad = d_topk_weights && (opt.training || !opt.straight_through);
  const T c = T(opt.routed_scaling_factor);

  std::vector<T> dlogits(n * E, T(0));
#pragma omp parallel
  {
    std::vector<T> dprobs(E), dscores(E), softmax_clean(E);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n; ++t) {
      if (!mask[t]) continue;
      const T* p = saved.probs + t * E;
      const T* pc = saved.probs_clean + t * E;
      const T* lb_row = lb_grad.data() + (opt.seq_len > 0 ? t / opt.seq_len : 0) * E;
      T* dl = dlogits.data() + t * E;
      if (per_expert) {
        // the balance loss reads q = s / S of the (noisy) scores; the weights read s
        std::fill(dscores.begin(), dscores.end(), T(0));
        normalized_backward_row(p, lb_row, dscores.data(), E);
        if (weights_have_grad)
          add_weight_grads(p, saved.topk_indices + t * k, saved.dropped + t * k,
                           d_topk_weights + t * k, k, opt.normalize_topk, opt.topk_norm_min, c,
                           dscores.data());
        // noise is additive, so d(noisy logits) = d(logits)
        score_backward_row(f, p, dscores.data(), dl, E);
        if (z_scale != T(0)) {
          softmax_row(saved.logits + t * E, softmax_clean.data(), E);
          z_loss_backward_row(saved.logits + t * E, softmax_clean.data(), E, z_scale, dl);
        }
        if (ent_scale != T(0)) {
          std::fill(dscores.begin(), dscores.end(), T(0));
          normalized_entropy_backward_row(pc, saved.entropy[t], E, ent_scale, dscores.data());
          score_backward_row(f, pc, dscores.data(), dl, E);
        }
        continue;
      }
      std::copy(lb_row, lb_row + E, dprobs.begin());
      if (weights_have_grad)
        add_weight_grads(p, saved.topk_indices + t * k, saved.dropped + t * k,
                         d_topk_weights + t * k, k, opt.normalize_topk, opt.topk_norm_min, c,
                         dprobs.data());
      // noise is additive, so d(noisy logits) = d(logits)
      softmax_backward_row(p, dprobs.data(), dl, E);
      if (z_scale != T(0)) z_loss_backward_row(saved.logits + t * E, pc, E, z_scale, dl);
      if (ent_scale != T(0)) entropy_backward_row(pc, saved.entropy[t], E, ent_scale, dl);
    }
  }
  // dx += dlogits @ w^T ; dw += x^T @ dlogits  (rows of dw tiled: no split reduction)
  gemm_tiled<T>(false, true, n, d_model, E, T(1), dlogits.data(), E, in.w_router, E, T(1), dx,
                d_model);
  gemm_tiled<T>(true, false, d_model, E, n, T(1), in.x, d_model, dlogits.data(), E, T(1),
                dw_router, E);
  // db += the column sums of dlogits, token by token in order: the same bits at any thread
  // count (n * E additions, next to the GEMMs' n * E * d_model)
  if (db_router)
    for (index_t t = 0; t < n; ++t)
      for (index_t e = 0; e < E; ++e) db_router[e] += dlogits[t * E + e];
}

#define MOE_INSTANTIATE(T)                                                                    \
  template const T* balance_dist<T>(RouterKind, const T*, const std::uint8_t*, index_t, index_t, \
                                    std::vector<T>&);                                            \
  template RouterLossValues router_forward<T>(const RouterInputs<T>&, index_t, index_t,      \
                                              index_t, const RouterOptions&,                  \
                                              const RouterBuffers<T>&);                       \
  template void router_backward<T>(const RouterInputs<T>&, index_t, index_t, index_t,         \
                                   const RouterOptions&, const RouterLossCoefs&,              \
                                   const RouterBuffers<T>&, const T*, T*, T*, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
