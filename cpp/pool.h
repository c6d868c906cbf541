// A cache of large aligned blocks, reused by size class. Training asks for about the
// same buffer sizes every step; fresh pages cost a page fault each (on this
// machine kind ~40 ms per 64 MB, as much as the GEMMs that fill them), so the
// kernels' outputs and scratch come from here and go back here when freed.
#pragma once
#include <cstddef>

namespace moe {

void* pool_alloc(std::size_t bytes);           // 64-byte aligned, never null
void pool_free(void* p, std::size_t bytes);    // back to the cache (or to the OS past the cap)
std::size_t pool_cached_bytes();
void pool_release();                           // return every cached block to the OS
bool pool_enabled();                           // false in sanitizer builds (plain malloc)

// Scoped scratch buffer of n values of T (uninitialised).
template <typename T>
class Scratch {
 public:
  explicit Scratch(std::size_t n) : n_(n), p_(static_cast<T*>(pool_alloc(n * sizeof(T)))) {}
  ~Scratch() { pool_free(p_, n_ * sizeof(T)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }
  T* get() { return p_; }

 private:
  std::size_t n_;
  T* p_;
};

}  // namespace moe
