// How each router picks its experts (docs/design.md, "Routers"): all of the selection code,
// per router and its pieces (top-k of a row, grouped top-k, capacity dropping, expert
// choice, Sinkhorn balancing and hashing). Selection has no gradient; router.cpp scores
// the tokens before it and differentiates the weights it writes.
#pragma once
#include <cstdint>

#include "router.h"
#include "tensor.h"

namespace moe {

// The k largest of v[0..E) in descending order, ties to the lower index.
template <typename V>
void topk_row(const V* v, index_t E, index_t k, index_t* indices);

// Group-limited top-k: the E experts form n_group equal groups; a group's score is the sum
// of its two best values (top2_sum, DeepSeek-V3; its best if it has one expert) or its best
// value (max, DeepSeek-V2); only the experts of the topk_group best groups (ties to the lower
// group) are eligible. scratch holds E values.
template <typename V>
void grouped_topk_row(const V* v, index_t E, index_t k, index_t n_group, index_t topk_group,
                      GroupScore score, V* scratch, index_t* indices);

// Capacity C = ceil(c * R * k / E), clamped to R * k; the assignments past it are marked
// dropped in the order of the drop policy (router.h). Slots with index -1 take none.
template <typename T>
void assign_capacity(const index_t* indices, const T* probs, const std::uint8_t* mask,
                     index_t n_tokens, index_t E, index_t k, index_t R, double capacity_factor,
                     DropPolicy policy, std::uint8_t* dropped);

// Expert choice: C = ceil(c * R * k / E) clamped to [0, R]; expert e takes the C real
// tokens with the largest probs[:, e] (ties to the lower token): chosen[t * E + e] = 1.
index_t expert_choice_capacity(index_t R, index_t k, index_t E, double capacity_factor);
template <typename T>
void expert_choice_select(const T* probs, const std::uint8_t* mask, index_t n_tokens, index_t E,
                          index_t capacity, std::uint8_t* chosen);

// Sinkhorn balancing of cost[t, e] = probs[t, e] (the softmax probabilities: exp(logits)
// up to a per-token factor, which d0 absorbs) over the real tokens, in float64: alternately
// d0[t] = (1/R) / (sum_e d1[e] cost[t, e] + 1e-8) and d1[e] = (1/E) / (sum_t d0[t] cost[t, e]
// + 1e-8), from d1 = 1, for at most `iterations` sweeps, stopping after the first sweep whose
// mean |change of d1| is <= tolerance. The balanced matrix is d0[t] d1[e] cost[t, e]; a
// token's order of experts in it is that of d1[e] cost[t, e], which is written into
// scores [n, E] for the real tokens.
template <typename T>
void sinkhorn_scores(const T* probs, const std::uint8_t* mask, index_t n_tokens, index_t E,
                     index_t iterations, double tolerance, double* scores);

// The hash router's score of expert e for a token id: a splitmix64 hash; a token's experts
// are the k largest scores (k distinct experts, each uniformly likely).
std::uint64_t hash_score(std::uint64_t seed, std::int64_t token_id, index_t e);

// Each router's selection over a batch whose scores (out.probs) are computed: indices and
// combine weights into out (hash also writes its probabilities and entropy).
// softmax_topk, sigmoid_topk, sqrtsoftplus_topk and sinkhorn: top-k (with bias, groups,
// Sinkhorn balancing in training), weights normalised (with the floor topk_norm_min) /
// straight-through / scaled as the options say.
template <typename T>
void select_topk(const RouterInputs<T>& in, index_t n, index_t E, const RouterOptions& opt,
                 const RouterBuffers<T>& out);
// hash: k distinct experts by hash score, weight 1/k; the probabilities are the weights.
template <typename T>
void select_hash(const RouterInputs<T>& in, index_t n, index_t E, const RouterOptions& opt,
                 const RouterBuffers<T>& out);
// expert_choice: each expert takes its C best real tokens; a token's slots list the experts
// that took it by descending probability (ties to the lower index), then -1. Returns the
// width (the largest count, at least 1).
template <typename T>
index_t select_expert_choice(const RouterInputs<T>& in, index_t n, index_t E, index_t R,
                             const RouterOptions& opt, const RouterBuffers<T>& out);

}  // namespace moe
