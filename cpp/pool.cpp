#include "pool.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace moe {

namespace {

constexpr std::size_t kAlign = 64;
// Below this, malloc's own free lists already reuse memory without new faults.
constexpr std::size_t kSmall = std::size_t(1) << 20;
// Cached bytes beyond this go straight back to the OS.
constexpr std::size_t kCap = std::size_t(4) << 30;

std::size_t rounded(std::size_t bytes) {
  return bytes == 0 ? kAlign : (bytes + kAlign - 1) / kAlign * kAlign;
}

struct Cache {
  std::mutex mu;
  std::map<std::size_t, std::vector<void*>> free_blocks;
  std::size_t cached = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be freed at interpreter exit
  return *c;
}

}  // namespace

void* pool_alloc(std::size_t bytes) {
  const std::size_t n = rounded(bytes);
  if (n >= kSmall) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.free_blocks.find(n);
    if (it != c.free_blocks.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.cached -= n;
      return p;
    }
  }
  void* p = std::aligned_alloc(kAlign, n);
  if (!p) throw std::bad_alloc();
  return p;
}

void pool_free(void* p, std::size_t bytes) {
  if (!p) return;
  const std::size_t n = rounded(bytes);
  if (n >= kSmall) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.cached + n <= kCap) {
      c.free_blocks[n].push_back(p);
      c.cached += n;
      return;
    }
  }
  std::free(p);
}

std::size_t pool_cached_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.cached;
}

void pool_release() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto& kv : c.free_blocks)
    for (void* p : kv.second) std::free(p);
  c.free_blocks.clear();
  c.cached = 0;
}

}  // namespace moe
