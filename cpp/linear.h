// Bias-free linear layer y = x W (W [in, out]) on our deterministic GEMM path.
#pragma once
#include "tensor.h"

namespace moe {

// bf16: bfloat16 operands, float32 sums (ModelConfig.compute_dtype = "bfloat16"; float32
// only): on the bfloat16 kernel in use (small_gemm_bf16.h), or on the fallback's rounded
// operands in the float32 GEMMs.
template <typename T>
void linear_forward(const T* x, const T* w, index_t n, index_t in, index_t out, T* y,
                    bool bf16 = false);

// dx = dy W^T (written, if dx is not null); dW += x^T dy (tiles over W's rows,
// so the sum over tokens is never split between threads). With bf16, dy is read rounded
// to bfloat16 too, as autocast's bfloat16 gradient would be.
template <typename T>
void linear_backward(const T* x, const T* w, const T* dy, index_t n, index_t in, index_t out,
                     T* dx, T* dw, bool bf16 = false);

}  // namespace moe
