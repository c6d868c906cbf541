// Language-model losses: the one cross-entropy, and its multi-token form.
#pragma once
#include "tensor.h"

namespace moe {

// Mean over rows whose label != ignore_index of -log softmax(logits)[label];
// 0 (and dlogits all 0) when no row is left. dlogits [n, V] is written:
// (softmax - onehot) / n_valid on valid rows, 0 on ignored ones.
// Labels must be in [0, V) or equal ignore_index (checked by the caller).
template <typename T>
double cross_entropy(const T* logits, const index_t* labels, index_t n, index_t V,
                     index_t ignore_index, T* dlogits);

// Labels of head i (predicting t+1+i) from next-token targets [B, S]:
// labels_i[b, t] = targets[b, t + i] when t + i < S and inputs t and t + i are
// both real (mask), else ignore_index: the mask shifts with the labels, so no
// head learns from padding. Writes labels [n_heads, B, S].
void multi_token_labels(const index_t* targets, const std::uint8_t* mask, index_t B, index_t S,
                        index_t n_heads, index_t ignore_index, index_t* labels);

}  // namespace moe
