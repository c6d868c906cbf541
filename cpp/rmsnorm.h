// RMSNorm: y = x * rstd * g, rstd = 1 / sqrt(mean(x^2) + eps), per row.
#pragma once
#include "tensor.h"

namespace moe {

// x [n, d], g [d] -> y [n, d]; saves rstd [n] for the backward.
template <typename T>
void rmsnorm_forward(const T* x, const T* g, index_t n, index_t d, T eps, T* y, T* rstd);

// dx = rstd * (dy*g - x * rstd^2 * mean(dy*g*x));  dg += sum_rows dy * x * rstd.
template <typename T>
void rmsnorm_backward(const T* x, const T* g, const T* rstd, const T* dy, index_t n, index_t d,
                      T* dx, T* dg);

}  // namespace moe
