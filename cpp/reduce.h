// Fixed-order reductions. Eigen's vectorised sum() splits a map at its first
// aligned address, so its bits depend on where a buffer happens to start;
// these loops depend on nothing but the values (8 lanes, then the tail, then
// the lanes summed in a fixed tree), and the compiler still vectorises them.
#pragma once
#include "tensor.h"

namespace moe {

template <typename T>
inline T dot(const T* a, const T* b, index_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  index_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

template <typename T>
inline T sum(const T* a, index_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  index_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l];
  for (int l = 0; i < n; ++i, ++l) acc[l] += a[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Rows per chunk when a sum over tokens is split for threads: fixed, so the
// partial sums (and the order they are added in) never depend on the thread count.
constexpr index_t kReduceRowChunk = 64;

}  // namespace moe
