// Token routing (docs/design.md, "Routing"): logits, clean and noisy softmax, top-k,
// combine weights (renormalised / straight-through), capacity dropping, and the
// router losses; with the backward that turns d(combine weights) and the loss
// coefficients into dx and dw_router.
#pragma once
#include "tensor.h"

namespace moe {

// Which assignments an expert over capacity drops: `position` keeps every token's first
// choice before any second choice, then token order (Switch, GShard); `probs` keeps each
// expert's highest-probability assignments (Megatron-Core's "probs" drop policy), ties to the
// lower token, then the lower slot.
enum class DropPolicy { position = 0, probs = 1 };

struct RouterOptions {
  index_t top_k = 1;
  bool normalize_topk = false;
  bool straight_through = false;
  bool training = true;
  double noise_std = 0.0;  // 0: router_probs = router_probs_clean
  std::uint64_t noise_seed = 0;
  std::uint64_t noise_step = 0;
  double capacity_factor = -1.0;  // < 0: dropless
  DropPolicy drop_policy = DropPolicy::position;
};

struct RouterLossValues {
  double load_balance = 0.0;
  double z_loss = 0.0;
  double entropy = 0.0;
};

// Buffers the forward writes (all [n_tokens, ...] row-major). The backward
// reads logits, probs_clean, probs, entropy, topk_indices, dropped and
// tokens_per_expert back: they are exactly what it needs.
template <typename T>
struct RouterBuffers {
  T* logits;                   // [n, E] x @ w, before noise
  T* probs_clean;              // [n, E] softmax(logits)
  T* probs;                    // [n, E] softmax(logits + noise)
  T* entropy;                  // [n]    H(probs_clean)
  index_t* topk_indices;       // [n, k] descending probs, ties to the lower index; -1 padded
  T* topk_weights;             // [n, k] combine weights; 0 padded / dropped
  std::uint8_t* dropped;       // [n, k]
  index_t* tokens_per_expert;  // [E]    real assignments before dropping
};

template <typename T>
RouterLossValues router_forward(const T* x, const T* w_router, const std::uint8_t* mask,
                                index_t n_tokens, index_t d_model, index_t E,
                                const RouterOptions& opt, const RouterBuffers<T>& out);

struct RouterLossCoefs {
  double load_balance = 0.0;
  double z_loss = 0.0;
  double entropy = 0.0;
};

// Gradient of sum(d_topk_weights * topk_weights) + aux_loss.
// dx [n, d_model] and dw_router [d_model, E] are accumulated into (+=).
// d_topk_weights may be null (aux-loss gradient only).
template <typename T>
void router_backward(const T* x, const T* w_router, const std::uint8_t* mask, index_t n_tokens,
                     index_t d_model, index_t E, const RouterOptions& opt,
                     const RouterLossCoefs& coefs, const RouterBuffers<T>& saved,
                     const T* d_topk_weights, T* dx, T* dw_router);

}  // namespace moe
