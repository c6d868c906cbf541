// Causal multi-head self-attention core (the projections are plain GEMMs done
// by the caller): softmax(Q K^T / sqrt(hd) + mask) V per (sequence, head).
// A query sees keys j <= i that are real tokens; a padded query outputs 0.
#pragma once
#include "tensor.h"

namespace moe {

struct AttentionShape {
  index_t batch, seq, heads, head_dim;  // d_model = heads * head_dim
};

// qkv [B, S, 3D]: q in columns [0, D), k in [D, 2D), v in [2D, 3D), head h at
// h*hd within each. mask [B, S]. Writes out [B, S, D] and saves probs [B, H, S, S].
template <typename T>
void attention_forward(const AttentionShape& s, const T* qkv, const std::uint8_t* mask, T* out,
                       T* probs);

// From qkv and probs (saved) and dout [B, S, D]: writes dqkv [B, S, 3D].
template <typename T>
void attention_backward(const AttentionShape& s, const T* qkv, const std::uint8_t* mask,
                        const T* probs, const T* dout, T* dqkv);

}  // namespace moe
