#include "attention.h"

#include <cmath>
#include <limits>
#include <vector>

#include "activations.h"
#include "blas.h"
#include "pool.h"
#include "reduce.h"
#include "small_gemm.h"

namespace moe {

namespace {

// Query rows per block of the causal products: a block of rows [r0, r1) only needs keys
// [0, r1), so the products skip most of the upper triangle (about 40 % of the FLOPs at
// S = 128). Fixed, so the bits never depend on anything but the shapes.
constexpr index_t kCausalRows = 24;

}  // namespace

template <typename T>
void attention_forward(const AttentionShape& s, const T* qkv, const std::uint8_t* mask, T* out,
                       T* probs) {
  const index_t S = s.seq, H = s.heads, hd = s.head_dim, D = H * hd, ld = 3 * D;
  const T scale = T(1) / std::sqrt(T(hd));
  check_blas_dims({S, ld});
#pragma omp parallel
  {
    Scratch<T> kt(packed_b_size<T>(hd, S));  // K^T, packed once per (sequence, head)
    // per key: -inf / 0 for padded keys, 0 / 1 for real ones (branch-free softmax rows)
    std::vector<T> key_bias(S), key_keep(S);
#pragma omp for schedule(dynamic, 1)
  for (index_t bh = 0; bh < s.batch * H; ++bh) {
    const index_t b = bh / H, h = bh % H;
    const T* q = qkv + b * S * ld + h * hd;
    const T* k = q + D;
    const T* v = q + 2 * D;
    const std::uint8_t* m = mask + b * S;
    T* P = probs + bh * S * S;
    for (index_t j = 0; j < S; ++j) {
      key_bias[j] = m[j] ? T(0) : -std::numeric_limits<T>::infinity();
      key_keep[j] = m[j] ? T(1) : T(0);
    }
    pack_b(true, hd, S, k, ld, kt.get());
    for (index_t r0 = 0; r0 < S; r0 += kCausalRows) {  // scores Q K^T, keys j < r1 only
      const index_t r1 = std::min(S, r0 + kCausalRows);
      small_gemm_packed(false, r1 - r0, r1, hd, q + r0 * ld, ld, kt.get(), false, P + r0 * S, S);
    }
    for (index_t i = 0; i < S; ++i) {
      T* row = P + i * S;
      if (!m[i]) {
        std::fill(row, row + S, T(0));
        continue;
      }
      const index_t n = i + 1;
      for (index_t j = 0; j < n; ++j) row[j] = row[j] * scale + key_bias[j];
      // the query itself is always visible, so the max is finite
      const T mx = ConstArrMap<T>(row, n).maxCoeff();
      exp_shifted(row, mx, row, n);
      for (index_t j = 0; j < n; ++j) row[j] *= key_keep[j];  // exactly 0 for padded keys
      const T inv = T(1) / sum(row, n);
      for (index_t j = 0; j < n; ++j) row[j] *= inv;
      std::fill(row + n, row + S, T(0));
    }
    for (index_t r0 = 0; r0 < S; r0 += kCausalRows) {  // out = P V: row i of P is 0 past i
      const index_t r1 = std::min(S, r0 + kCausalRows);
      small_gemm(false, false, r1 - r0, hd, r1, P + r0 * S, S, v, ld, false,
                 out + b * S * D + r0 * D + h * hd, D);
    }
  }
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
    Scratch<T> vt(packed_b_size<T>(hd, S));  // V^T, packed once per (sequence, head)
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
      // Row blocks [r0, r1) of products whose rows are queries need keys j < r1; row blocks
      // of products whose rows are keys (dV, dK) need queries i >= r0 (P is 0 above).
      pack_b(true, hd, S, v, ld, vt.get());
      for (index_t r0 = 0; r0 < S; r0 += kCausalRows) {
        const index_t r1 = std::min(S, r0 + kCausalRows), n = r1 - r0;
        small_gemm_packed(false, n, r1, hd, dO + r0 * D, D, vt.get(), false, dP.data() + r0 * S,
                          S);                                                    // dP = dO V^T
        small_gemm(true, false, n, hd, S - r0, P + r0 * S + r0, S, dO + r0 * D, D, false,
                   dv + r0 * ld, ld);                                            // dV = P^T dO
      }
      // softmax backward, row by row: dS = P * (dP - <dP, P>), then the scale
      for (index_t i = 0; i < S; ++i) {
        const T* p = P + i * S;
        T* d = dP.data() + i * S;
        const T c = dot(p, d, i + 1);
        for (index_t j = 0; j <= i; ++j) d[j] = p[j] * (d[j] - c) * scale;
        std::fill(d + i + 1, d + S, T(0));
      }
      for (index_t r0 = 0; r0 < S; r0 += kCausalRows) {
        const index_t r1 = std::min(S, r0 + kCausalRows), n = r1 - r0;
        small_gemm(false, false, n, hd, r1, dP.data() + r0 * S, S, k, ld, false, dq + r0 * ld,
                   ld);                                                          // dQ = dS K
        small_gemm(true, false, n, hd, S - r0, dP.data() + r0 * S + r0, S, q + r0 * ld, ld,
                   false, dk + r0 * ld, ld);                                     // dK = dS^T Q
      }
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
