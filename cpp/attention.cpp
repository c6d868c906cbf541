#include "attention.h"

#include <cmath>
#include <vector>

#include "activations.h"
#include "blas.h"
#include "reduce.h"

namespace moe {

template <typename T>
void attention_forward(const AttentionShape& s, const T* qkv, const std::uint8_t* mask, T* out,
                       T* probs) {
  const index_t S = s.seq, H = s.heads, hd = s.head_dim, D = H * hd, ld = 3 * D;
  const T scale = T(1) / std::sqrt(T(hd));
  check_blas_dims({S, ld});
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t bh = 0; bh < s.batch * H; ++bh) {
    const index_t b = bh / H, h = bh % H;
    const T* q = qkv + b * S * ld + h * hd;
    const T* k = q + D;
    const T* v = q + 2 * D;
    const std::uint8_t* m = mask + b * S;
    T* P = probs + bh * S * S;
    gemm(false, true, S, S, hd, scale, q, ld, k, ld, T(0), P, S);  // scores
    for (index_t i = 0; i < S; ++i) {
      T* row = P + i * S;
      if (!m[i]) {
        std::fill(row, row + S, T(0));
        continue;
      }
      T mx = row[i];  // the query itself is always visible
      for (index_t j = 0; j < i; ++j)
        if (m[j]) mx = std::max(mx, row[j]);
      exp_shifted(row, mx, row, i + 1);
      T sum = 0;
      for (index_t j = 0; j <= i; ++j) {
        if (!m[j]) row[j] = T(0);
        sum += row[j];
      }
      const T inv = T(1) / sum;
      for (index_t j = 0; j <= i; ++j) row[j] *= inv;
      std::fill(row + i + 1, row + S, T(0));
    }
    gemm(false, false, S, hd, S, T(1), P, S, v, ld, T(0), out + b * S * D + h * hd, D);
  }
}

template <typename T>
void attention_backward(const AttentionShape& s, const T* qkv, const std::uint8_t* mask,
                        const T* probs, const T* dout, T* dqkv) {
  const index_t S = s.seq, H = s.heads, hd = s.head_dim, D = H * hd, ld = 3 * D;
  const T scale = T(1) / std::sqrt(T(hd));
  check_blas_dims({S, ld});
#pragma omp parallel
  {
    std::vector<T> dP(S * S);
#pragma omp for schedule(dynamic, 1)
    for (index_t bh = 0; bh < s.batch * H; ++bh) {
      const index_t b = bh / H, h = bh % H;
      const T* q = qkv + b * S * ld + h * hd;
      const T* k = q + D;
      const T* v = q + 2 * D;
      const T* P = probs + bh * S * S;
      const T* dO = dout + b * S * D + h * hd;
      T* dq = dqkv + b * S * ld + h * hd;
      T* dk = dq + D;
      T* dv = dq + 2 * D;
      gemm(false, true, S, S, hd, T(1), dO, D, v, ld, T(0), dP.data(), S);  // dP = dO V^T
      gemm(true, false, S, hd, S, T(1), P, S, dO, D, T(0), dv, ld);         // dV = P^T dO
      // softmax backward, row by row: dS = P * (dP - <dP, P>), then the scale
      for (index_t i = 0; i < S; ++i) {
        const T* p = P + i * S;
        T* d = dP.data() + i * S;
        const T c = dot(p, d, i + 1);
        for (index_t j = 0; j <= i; ++j) d[j] = p[j] * (d[j] - c) * scale;
        std::fill(d + i + 1, d + S, T(0));
      }
      gemm(false, false, S, hd, S, T(1), dP.data(), S, k, ld, T(0), dq, ld);  // dQ = dS K
      gemm(true, false, S, hd, S, T(1), dP.data(), S, q, ld, T(0), dk, ld);   // dK = dS^T Q
    }
  }
}

#define MOE_INSTANTIATE(T)                                                                  \
  template void attention_forward<T>(const AttentionShape&, const T*, const std::uint8_t*, \
                                     T*, T*);                                              \
  template void attention_backward<T>(const AttentionShape&, const T*, const std::uint8_t*, \
                                      const T*, const T*, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
