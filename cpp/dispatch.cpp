#include "dispatch.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace moe {

index_t dispatch_plan(const index_t* topk_indices, const std::uint8_t* dropped, index_t n_tokens,
                      index_t k, index_t E, index_t* offsets, index_t* row_token,
                      index_t* slot_row) {
  std::vector<index_t> count(E, 0);
  for (index_t i = 0; i < n_tokens * k; ++i)
    if (topk_indices[i] >= 0 && !dropped[i]) ++count[topk_indices[i]];
  offsets[0] = 0;
  for (index_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + count[e];
  std::vector<index_t> next(offsets, offsets + E);
  for (index_t i = 0; i < n_tokens * k; ++i) {
    const index_t e = topk_indices[i];
    if (e < 0 || dropped[i]) {
      slot_row[i] = -1;
      continue;
    }
    const index_t r = next[e]++;
    slot_row[i] = r;
    row_token[r] = i / k;
  }
  return offsets[E];
}

template <typename T>
void gather_rows(const T* x, const index_t* row_token, index_t rows, index_t d, T* xs) {
#pragma omp parallel for schedule(static)
  for (index_t r = 0; r < rows; ++r)
    std::memcpy(xs + r * d, x + row_token[r] * d, sizeof(T) * d);
}

template <typename T>
void gather_rows_backward(const T* dxs, const index_t* slot_row, index_t n_tokens, index_t k,
                          index_t d, T* dx) {
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < n_tokens; ++t) {
    ArrMap<T> out(dx + t * d, d);
    out.setZero();
    for (index_t j = 0; j < k; ++j) {
      const index_t r = slot_row[t * k + j];
      if (r >= 0) out += ConstArrMap<T>(dxs + r * d, d);
    }
  }
}

namespace {

// out[t] = sum_j weights[t, j] * rows[slot_row[t, j]], per token (fixed slot order); with
// `dot` also d_weights[t, j] = <dot[t], rows[slot_row[t, j]]>.
template <typename T>
void weighted_sum_to_tokens(const T* rows, const index_t* slot_row, const T* weights,
                            index_t n_tokens, index_t k, index_t d, T* out, const T* dot,
                            T* d_weights) {
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < n_tokens; ++t) {
    ArrMap<T> o(out + t * d, d);
    o.setZero();
    for (index_t j = 0; j < k; ++j) {
      const index_t r = slot_row[t * k + j];
      if (dot) d_weights[t * k + j] = r < 0 ? T(0) : (ConstArrMap<T>(dot + t * d, d) *
                                                        ConstArrMap<T>(rows + r * d, d)).sum();
      if (r >= 0) o += weights[t * k + j] * ConstArrMap<T>(rows + r * d, d);
    }
  }
}

// rows[slot_row[t, j]] = weights[t, j] * src[t]; with `dot` also
// d_weights[t, j] = <src[t], dot[slot_row[t, j]]>.
template <typename T>
void weighted_scatter_to_rows(const T* src, const index_t* slot_row, const T* weights,
                              index_t n_tokens, index_t k, index_t d, T* rows, const T* dot,
                              T* d_weights) {
#pragma omp parallel for schedule(static)
  for (index_t t = 0; t < n_tokens; ++t) {
    ConstArrMap<T> g(src + t * d, d);
    for (index_t j = 0; j < k; ++j) {
      const index_t r = slot_row[t * k + j];
      if (dot) d_weights[t * k + j] = r < 0 ? T(0) : (g * ConstArrMap<T>(dot + r * d, d)).sum();
      if (r >= 0) ArrMap<T>(rows + r * d, d) = weights[t * k + j] * g;
    }
  }
}

}  // namespace

template <typename T>
void combine_forward(const T* ye, const index_t* slot_row, const T* weights, index_t n_tokens,
                     index_t k, index_t d, T* y) {
  weighted_sum_to_tokens<T>(ye, slot_row, weights, n_tokens, k, d, y, nullptr, nullptr);
}

template <typename T>
void combine_backward(const T* dy, const T* ye, const index_t* slot_row, const T* weights,
                      index_t n_tokens, index_t k, index_t d, T* dye, T* d_weights) {
  weighted_scatter_to_rows(dy, slot_row, weights, n_tokens, k, d, dye, ye, d_weights);
}

template <typename T>
void dispatch_weighted(const T* x, const index_t* slot_row, const T* weights, index_t n_tokens,
                       index_t k, index_t d, T* xs) {
  weighted_scatter_to_rows<T>(x, slot_row, weights, n_tokens, k, d, xs, nullptr, nullptr);
}

template <typename T>
void dispatch_weighted_backward(const T* dxs, const T* x, const index_t* slot_row,
                                const T* weights, index_t n_tokens, index_t k, index_t d, T* dx,
                                T* d_weights) {
  weighted_sum_to_tokens(dxs, slot_row, weights, n_tokens, k, d, dx, x, d_weights);
}

template <typename T>
void scatter_add_rows(const T* dout, const index_t* ids, index_t n_tokens, index_t n_ids,
                      index_t d, T* table_grad) {
  // group the tokens by id with the same counting sort as the experts' dispatch
  std::vector<std::uint8_t> keep(n_tokens, 0);
  std::vector<index_t> offsets(n_ids + 1), row_token(n_tokens), slot_row(n_tokens);
  dispatch_plan(ids, keep.data(), n_tokens, 1, n_ids, offsets.data(), row_token.data(),
                slot_row.data());
#pragma omp parallel for schedule(dynamic, 16)
  for (index_t v = 0; v < n_ids; ++v) {
    T* g = table_grad + v * d;
    for (index_t r = offsets[v]; r < offsets[v + 1]; ++r) {
      const T* src = dout + row_token[r] * d;
      for (index_t i = 0; i < d; ++i) g[i] += src[i];
    }
  }
}

#define MOE_INSTANTIATE(T)                                                                     \
  template void gather_rows<T>(const T*, const index_t*, index_t, index_t, T*);                \
  template void gather_rows_backward<T>(const T*, const index_t*, index_t, index_t, index_t,   \
                                        T*);                                                   \
  template void combine_forward<T>(const T*, const index_t*, const T*, index_t, index_t,       \
                                   index_t, T*);                                               \
  template void combine_backward<T>(const T*, const T*, const index_t*, const T*, index_t,     \
                                    index_t, index_t, T*, T*);                               \
  template void dispatch_weighted<T>(const T*, const index_t*, const T*, index_t, index_t,     \
                                     index_t, T*);                                             \
  template void dispatch_weighted_backward<T>(const T*, const T*, const index_t*, const T*,    \
                                              index_t, index_t, index_t, T*, T*);              \
  template void scatter_add_rows<T>(const T*, const index_t*, index_t, index_t, index_t, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
