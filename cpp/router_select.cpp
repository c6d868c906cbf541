#include "router_select.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "losses.h"
#include "rng.h"

namespace moe {

// One pass of insertion into the sorted prefix: an equal value never moves ahead of one
// already placed, and lower indices are placed first.
template <typename V>
void topk_row(const V* v, index_t E, index_t k, index_t* indices) {
  index_t filled = 0;
  for (index_t e = 0; e < E; ++e) {
    const V x = v[e];
    if (filled == k && !(x > v[indices[k - 1]])) continue;
    index_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && x > v[indices[pos - 1]]) {
      indices[pos] = indices[pos - 1];
      --pos;
    }
    indices[pos] = e;
  }
}

template <typename V>
void grouped_topk_row(const V* v, index_t E, index_t k, index_t n_group, index_t topk_group,
                      GroupScore score, V* scratch, index_t* indices) {
  const index_t size = E / n_group;
  std::vector<V> group_score(n_group);
  index_t best[2];
  for (index_t g = 0; g < n_group; ++g) {
    const index_t m = score == GroupScore::max ? 1 : std::min<index_t>(2, size);
    topk_row(v + g * size, size, m, best);
    V s = v[g * size + best[0]];
    if (m == 2) s += v[g * size + best[1]];
    group_score[g] = s;
  }
  std::vector<index_t> groups(topk_group);
  topk_row(group_score.data(), n_group, topk_group, groups.data());
  std::fill(scratch, scratch + E, std::numeric_limits<V>::lowest());
  for (index_t g : groups) std::copy(v + g * size, v + (g + 1) * size, scratch + g * size);
  topk_row(scratch, E, k, indices);
}

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
        if (e < 0) continue;
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
      for (index_t j = 0; j < k; ++j)
        if (indices[t * k + j] >= 0) slots[indices[t * k + j]].push_back(t * k + j);
  for (index_t e = 0; e < E; ++e) {
    auto& v = slots[e];
    std::stable_sort(v.begin(), v.end(), [&](index_t a, index_t b) {
      return probs[(a / k) * E + e] > probs[(b / k) * E + e];
    });
    for (std::size_t i = std::size_t(capacity); i < v.size(); ++i) dropped[v[i]] = 1;
  }
}

index_t expert_choice_capacity(index_t R, index_t k, index_t E, double capacity_factor) {
  const double raw = std::ceil(capacity_factor * double(R) * double(k) / double(E));
  return raw >= double(R) ? R : index_t(raw);
}

template <typename T>
void expert_choice_select(const T* probs, const std::uint8_t* mask, index_t n_tokens, index_t E,
                          index_t capacity, std::uint8_t* chosen) {
  std::fill(chosen, chosen + n_tokens * E, std::uint8_t(0));
  if (capacity == 0) return;
  std::vector<index_t> real;
  for (index_t t = 0; t < n_tokens; ++t)
    if (mask[t]) real.push_back(t);
  // one expert per iteration: each writes only its own column of chosen
#pragma omp parallel
  {
    std::vector<index_t> order;
#pragma omp for schedule(static)
    for (index_t e = 0; e < E; ++e) {
      order = real;
      // a strict total order (ties to the lower token): which C tokens come first is unique
      std::nth_element(order.begin(), order.begin() + (capacity - 1), order.end(),
                       [&](index_t a, index_t b) {
                         const T pa = probs[a * E + e], pb = probs[b * E + e];
                         return pa > pb || (pa == pb && a < b);
                       });
      for (index_t i = 0; i < capacity; ++i) chosen[order[i] * E + e] = 1;
    }
  }
}

constexpr index_t kSinkhornChunk = 256;

template <typename T>
void sinkhorn_scores(const T* probs, const std::uint8_t* mask, index_t n_tokens, index_t E,
                     index_t iterations, double tolerance, double* scores) {
  constexpr double eps = 1e-8;
  std::vector<double> d1(E, 1.0);
  std::vector<index_t> real;
  for (index_t t = 0; t < n_tokens; ++t)
    if (mask[t]) real.push_back(t);
  const index_t R = index_t(real.size());
  if (R == 0) return;
  std::vector<double> cost(R * E), d0(R), next(E);
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < R; ++i)
    for (index_t e = 0; e < E; ++e) cost[i * E + e] = double(probs[real[i] * E + e]);
  // Column sums by fixed chunks of rows (partial sums of every column, then the chunks
  // added in order): row-major reads, and bits that never depend on the thread count.
  const index_t chunks = (R + kSinkhornChunk - 1) / kSinkhornChunk;
  std::vector<double> partial(chunks * E);
  for (index_t it = 0; it < iterations; ++it) {
#pragma omp parallel for schedule(static)
    for (index_t i = 0; i < R; ++i) {
      double s = 0.0;
      for (index_t e = 0; e < E; ++e) s += d1[e] * cost[i * E + e];
      d0[i] = (1.0 / double(R)) / (s + eps);
    }
#pragma omp parallel for schedule(static)
    for (index_t c = 0; c < chunks; ++c) {
      double* acc = partial.data() + c * E;
      std::fill(acc, acc + E, 0.0);
      const index_t end = std::min(R, (c + 1) * kSinkhornChunk);
      for (index_t i = c * kSinkhornChunk; i < end; ++i)
        for (index_t e = 0; e < E; ++e) acc[e] += d0[i] * cost[i * E + e];
    }
    for (index_t e = 0; e < E; ++e) {
      double s = 0.0;
      for (index_t c = 0; c < chunks; ++c) s += partial[c * E + e];
      next[e] = (1.0 / double(E)) / (s + eps);
    }
    double change = 0.0;
    for (index_t e = 0; e < E; ++e) change += std::abs(next[e] - d1[e]);
    std::copy(next.begin(), next.end(), d1.begin());
    if (change / double(E) <= tolerance) break;
  }
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < R; ++i)
    for (index_t e = 0; e < E; ++e) scores[real[i] * E + e] = d1[e] * cost[i * E + e];
}

std::uint64_t hash_score(std::uint64_t seed, std::int64_t token_id, index_t e) {
  const std::uint64_t key = splitmix64(seed) ^ std::uint64_t(token_id);
  return splitmix64(splitmix64(key) + std::uint64_t(e));
}

// Top-k selection of softmax_topk, sigmoid_topk, sqrtsoftplus_topk and sinkhorn, with their
// combine weights.
template <typename T>
void select_topk(const RouterInputs<T>& in, index_t n, index_t E, const RouterOptions& opt,
                 const RouterBuffers<T>& out) {
  const index_t k = opt.top_k;
  std::vector<double> balanced_scores;
  // forced indices replace the selection, and with it Sinkhorn's balancing
  const bool balanced = opt.kind == RouterKind::sinkhorn && opt.training && !in.forced_indices;
  if (balanced) {
    balanced_scores.resize(n * E);
    sinkhorn_scores(out.probs, in.mask, n, E, opt.sinkhorn_iterations, opt.sinkhorn_tolerance,
                    balanced_scores.data());
  }
#pragma omp parallel
  {
    std::vector<T> sel(E), scratch(E);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n; ++t) {
      index_t* idx = out.topk_indices + t * k;
      T* wts = out.topk_weights + t * k;
      if (!in.mask[t]) {
        std::fill(idx, idx + k, index_t(-1));
        std::fill(wts, wts + k, T(0));
        continue;
      }
      const T* p = out.probs + t * E;
      if (in.forced_indices) {
        std::copy(in.forced_indices + t * k, in.forced_indices + (t + 1) * k, idx);
      } else if (balanced) {
        topk_row(balanced_scores.data() + t * E, E, k, idx);
      } else {
        const T* v = p;
        if (in.expert_bias || in.expert_mask) {
          for (index_t e = 0; e < E; ++e) {
            sel[e] = in.expert_bias ? p[e] + in.expert_bias[e] : p[e];
            // a removed expert ranks below every score (and k <= the experts left)
            if (in.expert_mask && !in.expert_mask[e]) sel[e] = std::numeric_limits<T>::lowest();
          }
          v = sel.data();
        }
        if (opt.n_group > 1)
          grouped_topk_row(v, E, k, opt.n_group, opt.topk_group, opt.group_score, scratch.data(),
                           idx);
        else
          topk_row(v, E, k, idx);
      }
      T sum = 0;
      for (index_t j = 0; j < k; ++j) sum += p[idx[j]];
      const T denom = topk_denominator(sum, opt.topk_norm_min);
      for (index_t j = 0; j < k; ++j) {
        const T soft = opt.normalize_topk ? p[idx[j]] / denom : p[idx[j]];
        wts[j] = opt.straight_through ? T(1) : soft * T(opt.routed_scaling_factor);
      }
    }
  }
}

// Hash routing: k distinct experts by hash score, weight 1/k; the probabilities are the
// weights (what the layer combines with).
template <typename T>
void select_hash(const RouterInputs<T>& in, index_t n, index_t E, const RouterOptions& opt,
                 const RouterBuffers<T>& out) {
  const index_t k = opt.top_k;
#pragma omp parallel
  {
    std::vector<std::uint64_t> score(E);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n; ++t) {
      index_t* idx = out.topk_indices + t * k;
      T* wts = out.topk_weights + t * k;
      T* p = out.probs + t * E;
      std::fill(p, p + E, T(0));
      if (!in.mask[t]) {
        std::fill(idx, idx + k, index_t(-1));
        std::fill(wts, wts + k, T(0));
        std::fill(out.probs_clean + t * E, out.probs_clean + (t + 1) * E, T(0));
        out.entropy[t] = 0;
        continue;
      }
      if (in.forced_indices) {
        std::copy(in.forced_indices + t * k, in.forced_indices + (t + 1) * k, idx);
      } else {
        for (index_t e = 0; e < E; ++e) {
          score[e] = hash_score(opt.hash_seed, in.token_ids[t], e);
          // removed: at the bottom (a live expert hashing to exactly 0, p = 2^-64, would tie)
          if (in.expert_mask && !in.expert_mask[e]) score[e] = 0;
        }
        topk_row(score.data(), E, k, idx);
      }
      for (index_t j = 0; j < k; ++j) {
        wts[j] = T(1) / T(k);
        p[idx[j]] = T(1) / T(k);
      }
      std::copy(p, p + E, out.probs_clean + t * E);
      out.entropy[t] = entropy_row(p, E);
    }
  }
}

// Expert choice: each expert takes its C best real tokens; a token's slots list the experts
// that took it by descending probability (ties to the lower index), then -1. Returns the
// width (the largest count, at least 1).
template <typename T>
index_t select_expert_choice(const RouterInputs<T>& in, index_t n, index_t E, index_t R,
                             const RouterOptions& opt, const RouterBuffers<T>& out) {
  const index_t C = expert_choice_capacity(R, opt.top_k, E, opt.capacity_factor);
  std::vector<std::uint8_t> chosen(n * E);
  expert_choice_select(out.probs, in.mask, n, E, C, chosen.data());
  std::vector<index_t> count(n, 0);
  for (index_t t = 0; t < n; ++t)
    for (index_t e = 0; e < E; ++e) count[t] += chosen[t * E + e];
  index_t width = 1;
  for (index_t c : count) width = std::max(width, c);
#pragma omp parallel
  {
    std::vector<T> row(E);
#pragma omp for schedule(static)
    for (index_t t = 0; t < n; ++t) {
      index_t* idx = out.topk_indices + t * width;
      T* wts = out.topk_weights + t * width;
      std::fill(idx, idx + width, index_t(-1));
      std::fill(wts, wts + width, T(0));
      if (count[t] == 0) continue;
      const T* p = out.probs + t * E;
      for (index_t e = 0; e < E; ++e)
        row[e] = chosen[t * E + e] ? p[e] : std::numeric_limits<T>::lowest();
      topk_row(row.data(), E, count[t], idx);
      for (index_t j = 0; j < count[t]; ++j) wts[j] = p[idx[j]];
    }
  }
  return width;
}

#define MOE_INSTANTIATE(T)                                                                    \
  template void assign_capacity<T>(const index_t*, const T*, const std::uint8_t*, index_t,    \
                                   index_t, index_t, index_t, double, DropPolicy,             \
                                   std::uint8_t*);                                            \
  template void expert_choice_select<T>(const T*, const std::uint8_t*, index_t, index_t,      \
                                        index_t, std::uint8_t*);                              \
  template void sinkhorn_scores<T>(const T*, const std::uint8_t*, index_t, index_t, index_t,  \
                                   double, double*);                                          \
  template void select_topk<T>(const RouterInputs<T>&, index_t, index_t, const RouterOptions&, \
                               const RouterBuffers<T>&);                                      \
  template void select_hash<T>(const RouterInputs<T>&, index_t, index_t, const RouterOptions&, \
                               const RouterBuffers<T>&);                                      \
  template index_t select_expert_choice<T>(const RouterInputs<T>&, index_t, index_t, index_t, \
                                           const RouterOptions&, const RouterBuffers<T>&);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE
#define MOE_INSTANTIATE_V(V)                                                        \
  template void topk_row<V>(const V*, index_t, index_t, index_t*);                 \
  template void grouped_topk_row<V>(const V*, index_t, index_t, index_t, index_t,    \
                                    GroupScore, V*, index_t*);
MOE_INSTANTIATE_V(float)
MOE_INSTANTIATE_V(double)
MOE_INSTANTIATE_V(std::uint64_t)
#undef MOE_INSTANTIATE_V

}  // namespace moe
