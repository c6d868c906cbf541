// Bias-free linear layer y = x W (W [in, out]) on our deterministic GEMM path.
#pragma once
#include "tensor.h"

namespace moe {

template <typename T>
void linear_forward(const T* x, const T* w, index_t n, index_t in, index_t out, T* y);

// dx = dy W^T (written, if dx is not null); dW += x^T dy (tiles over W's rows,
// so the sum over tokens is never split between threads).
template <typename T>
void linear_backward(const T* x, const T* w, const T* dy, index_t n, index_t in, index_t out,
                     T* dx, T* dw);

}  // namespace moe
