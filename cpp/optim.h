// The optimiser's element-wise update and the gradient norm, run by our OpenMP threads
// (NumPy's version ran serially while the second core waited).
#pragma once
#include "tensor.h"

namespace moe {

struct AdamWStep {
  double lr;            // this step's learning rate
  double beta1, beta2;  // moment decay rates
  double bias1, bias2;  // 1 - beta1^t, 1 - beta2^t
  double eps;
  double decay;         // 1 - lr * weight_decay (1 where no decay applies)
  double grad_scale;    // clipping factor applied to g first
};

// One AdamW update of n elements, in T:
//   g' = g * grad_scale;  m = beta1 m + (1 - beta1) g';  v = beta2 v + (1 - beta2) g'^2
//   p = p * decay - (lr / bias1) * m / (sqrt(v / bias2) + eps)
// Element-wise, so the bits never depend on the thread count.
template <typename T>
void adamw_step(T* p, const T* g, T* m, T* v, index_t n, const AdamWStep& s);

// sum of g^2 in float64, over fixed chunks added in order (thread-count independent).
template <typename T>
double sum_squares(const T* g, index_t n);

}  // namespace moe
