// A 64-byte aligned buffer of n values of T (uninitialised), freed with its owner: the
// small GEMMs' per-thread packing blocks (a vector load that splits two cache lines costs
// two).
#pragma once
#include <cstddef>
#include <cstdlib>
#include <new>

namespace moe {

template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(std::size_t n)
      : p_(static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64))) {
    if (!p_) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(p_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* get() { return p_; }

 private:
  T* p_;
};

}  // namespace moe
