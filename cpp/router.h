// Token routing (docs/design.md, "Routing" and "Routers"): logits (with an optional learned
// bias), scores (softmax, sigmoid or sqrt-softplus, clean and noisy), the selection of each
// algorithm (top-k, grouped top-k with an expert bias, expert choice, Sinkhorn, hash),
// combine weights, capacity dropping and the router losses; with the backward that turns
// d(combine weights) and the loss coefficients into dx, dw_router and db_router.
#pragma once
#include <vector>
#include "tensor.h"

namespace moe {

// Which assignments an expert over capacity drops: `position` keeps every token's first
// choice before any second choice, then token order (Switch, GShard); `probs` keeps each
// expert's highest-probability assignments (Megatron-Core's "probs" drop policy), ties to the
// lower token, then the lower slot.
enum class DropPolicy { position = 0, probs = 1 };

// The routing algorithm. softmax_topk / sigmoid_topk / sqrtsoftplus_topk: each token takes
// its k best experts by score (+ the expert bias, when given). expert_choice: each expert
// takes its C best tokens. sinkhorn: top-k of a Sinkhorn-balanced assignment in training,
// plain top-k in eval. hash: a fixed hash of the token id, no router weight.
enum class RouterKind { softmax_topk = 0, sigmoid_topk = 1, expert_choice = 2, sinkhorn = 3,
                        hash = 4, sqrtsoftplus_topk = 5 };

// How a router scores the logits: softmax over the experts, or an independent score per
// expert (sigmoid; sqrt(softplus), DeepSeek-V4), which is not a distribution.
enum class ScoreFunction { softmax = 0, sigmoid = 1, sqrtsoftplus = 2 };

inline ScoreFunction score_function(RouterKind k) {
  if (k == RouterKind::sigmoid_topk) return ScoreFunction::sigmoid;
  if (k == RouterKind::sqrtsoftplus_topk) return ScoreFunction::sqrtsoftplus;
  return ScoreFunction::softmax;
}

// Per-expert scores are normalised per token where the losses read a distribution.
inline bool normalizes_scores(RouterKind k) {
  return score_function(k) != ScoreFunction::softmax;
}

// A group's score in group-limited top-k: the sum of its two best selection values
// (DeepSeek-V3), or its best one (DeepSeek-V2's group_limited_greedy).
enum class GroupScore { top2_sum = 0, max = 1 };

// The denominator of normalised top-k weights: the sum of the k scores, floored at norm_min
// (Ernie 4.5's moe_norm_min; 0: none). Below the floor it is a constant (no gradient).
template <typename T>
inline T topk_denominator(T sum, double norm_min) {
  return sum < T(norm_min) ? T(norm_min) : sum;
}

struct RouterOptions {
  RouterKind kind = RouterKind::softmax_topk;
  index_t top_k = 1;  // k; the backward reads the saved width (expert choice: its own)
  bool normalize_topk = false;
  bool straight_through = false;
  bool training = true;
  double noise_std = 0.0;  // 0: router_probs = router_probs_clean
  std::uint64_t noise_seed = 0;
  std::uint64_t noise_step = 0;
  // Index of row 0 in the noise counter: a rank holding rows [o, o + n) of a global batch
  // (expert parallelism) draws the noise a single process gives those rows.
  std::uint64_t noise_token_offset = 0;
  double capacity_factor = -1.0;  // < 0: dropless (expert choice: C's factor, > 0)
  DropPolicy drop_policy = DropPolicy::position;
  double routed_scaling_factor = 1.0;  // multiplies the combine weights (routers with a bias)
  double topk_norm_min = 0.0;          // normalize_topk: floor of the weights' denominator
  index_t n_group = 1;                 // grouped top-k: experts in n_group equal groups ...
  index_t topk_group = 1;              // ... of which the topk_group best are eligible
  GroupScore group_score = GroupScore::top2_sum;  // ... by this score of a group
  index_t sinkhorn_iterations = 100;   // at most this many Sinkhorn sweeps ...
  double sinkhorn_tolerance = 1e-4;    // ... or until mean |change of the column scales| < it
  std::uint64_t hash_seed = 0;
  index_t seq_len = 0;  // > 0: sequence-scope load balance over rows of seq_len tokens
};

// What the forward reads besides x. Null pointers mean "absent".
template <typename T>
struct RouterInputs {
  const T* x;                       // [n, d_model]
  const T* w_router;                // [d_model, E]; null for hash
  const T* b_router;                // [E] learned logit bias (gpt-oss); null: none
  const std::uint8_t* mask;         // [n] 1 = real token
  const T* expert_bias;             // [E] selection-only bias (top-k by score); null: none
  const index_t* balance_counts;    // [E] assignments of earlier micro-batches (global scope)
  const index_t* token_ids;         // [n] hash
  // Interventions (docs/design.md, "Routing interventions"); null: none.
  const index_t* forced_indices;    // [n, top_k] the experts each real token goes to (replay,
                                    // forced routing); weights are computed as if selected
  const std::uint8_t* expert_mask;  // [E] 0 = removed: never selected (ablation, pruning)
};

struct RouterLossValues {
  double load_balance = 0.0;
  double z_loss = 0.0;
  double entropy = 0.0;
  index_t width = 0;  // slots per token written (k; expert choice: the largest count, >= 1)
};

// Buffers the forward writes (all [n_tokens, ...] row-major; the slot arrays have room
// for top_k slots per token, or E for expert choice, and are written with stride `width`).
// The backward reads logits, probs_clean, probs, entropy, topk_indices, dropped and
// tokens_per_expert back: they are exactly what it needs.
template <typename T>
struct RouterBuffers {
  T* logits;                   // [n, E] x @ w (+ b), before noise (hash: 0)
  T* probs_clean;              // [n, E] scores of the logits (score_function of the kind)
  T* probs;                    // [n, E] scores of the logits + noise
  T* entropy;                  // [n]    entropy of the clean scores as a distribution
  index_t* topk_indices;       // [n, width] by descending selection score; -1 empty / padded
  T* topk_weights;             // [n, width] combine weights; 0 empty / padded / dropped
  std::uint8_t* dropped;       // [n, width]
  index_t* tokens_per_expert;  // [E]    real assignments before dropping
};

template <typename T>
RouterLossValues router_forward(const RouterInputs<T>& in, index_t n_tokens, index_t d_model,
                                index_t E, const RouterOptions& opt, const RouterBuffers<T>& out);

// The distribution the load-balance loss reads (docs/design.md, "Losses"): the
// probabilities themselves, or per-expert scores normalised per token (written into
// `scratch` [n, E], whose padded rows are 0).
template <typename T>
const T* balance_dist(RouterKind kind, const T* probs, const std::uint8_t* mask, index_t n,
                      index_t E, std::vector<T>& scratch);

struct RouterLossCoefs {
  double load_balance = 0.0;
  double z_loss = 0.0;
  double entropy = 0.0;
};

// Gradient of sum(d_topk_weights * topk_weights) + aux_loss.
// dx [n, d_model], dw_router [d_model, E] and db_router [E] (null: no bias) are accumulated
// into (+=); nothing for hash. d_topk_weights may be null (aux-loss gradient only).
// opt.top_k is the saved width.
template <typename T>
void router_backward(const RouterInputs<T>& in, index_t n_tokens, index_t d_model, index_t E,
                     const RouterOptions& opt, const RouterLossCoefs& coefs,
                     const RouterBuffers<T>& saved, const T* d_topk_weights, T* dx, T* dw_router,
                     T* db_router);

}  // namespace moe
