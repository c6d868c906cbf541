#include "pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>
#include <new>
#include <vector>

namespace moe {

namespace {

constexpr std::size_t kAlign = 64;
// Below this, malloc serves the block. Kernel scratch made on every call (packed weights,
// each OpenMP thread's row tiles: 128 KiB and up) comes from the cache: glibc may hand such
// blocks back to the OS on free, and every call then faulted its pages in again.
constexpr std::size_t kSmall = std::size_t(64) << 10;
// The cache may always hold this much, and beyond it as much as the largest working set
// (bytes handed out at once) seen so far: enough for every buffer of one step to come
// back from the cache in the next, never more.
constexpr std::size_t kMinCap = std::size_t(64) << 20;

std::size_t rounded(std::size_t bytes) {
  return bytes == 0 ? kAlign : (bytes + kAlign - 1) / kAlign * kAlign;
}

// Large blocks come in size classes a quarter of a power of two apart (at most 25 %
// waste), so a buffer whose size moves a little from step to step (rows per expert
// change with every batch) finds last step's block again.
std::size_t size_class(std::size_t n) {
  std::size_t base = kSmall;
  while (base * 2 <= n) base *= 2;
  const std::size_t step = base / 4;
  return (n + step - 1) / step * step;
}

// A cached block serves a request up to this much smaller than itself (best fit).
constexpr double kMaxFitWaste = 1.5;

struct Cache {
  std::mutex mu;
  std::map<std::size_t, std::vector<void*>> free_blocks;   // by mapped size
  std::unordered_map<void*, std::size_t> mapped_size;      // of every large block handed out
  std::size_t cached = 0;  // bytes in free_blocks
  std::size_t in_use = 0;  // large bytes handed out and not yet freed
  std::size_t peak_in_use = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: blocks may be freed at interpreter exit
  return *c;
}

// Large blocks are mapped and unmapped directly, so giving one back really returns its
// pages to the OS (malloc keeps freed heap memory below its mmap threshold).
void* map_block(std::size_t n) {
  void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  return p;
}

}  // namespace

#ifdef MOE_NO_POOL
constexpr bool kPool = false;  // sanitizer builds: plain malloc, so ASan checks every block
#else
constexpr bool kPool = true;
#endif

bool pool_enabled() { return kPool; }

void* pool_alloc(std::size_t bytes) {
  const std::size_t n = rounded(bytes);
  if (!kPool || n < kSmall) {
    void* p = std::aligned_alloc(kAlign, n);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const std::size_t c = size_class(n);
  {
    Cache& cc = cache();
    std::lock_guard<std::mutex> lock(cc.mu);
    // the smallest cached block that fits without wasting more than kMaxFitWaste
    auto it = cc.free_blocks.lower_bound(c);
    while (it != cc.free_blocks.end() && it->second.empty()) ++it;
    if (it != cc.free_blocks.end() && double(it->first) <= kMaxFitWaste * double(c)) {
      const std::size_t size = it->first;
      void* p = it->second.back();
      it->second.pop_back();
      if (it->second.empty()) cc.free_blocks.erase(it);
      cc.cached -= size;
      cc.in_use += size;
      cc.peak_in_use = std::max(cc.peak_in_use, cc.in_use);
      cc.mapped_size[p] = size;
      return p;
    }
  }
  void* p = map_block(c);
  Cache& cc = cache();
  std::lock_guard<std::mutex> lock(cc.mu);
  cc.in_use += c;
  cc.peak_in_use = std::max(cc.peak_in_use, cc.in_use);
  cc.mapped_size[p] = c;
  return p;
}

void pool_free(void* p, std::size_t bytes) {
  if (!p) return;
  const std::size_t n = rounded(bytes);
  if (!kPool || n < kSmall) {
    std::free(p);
    return;
  }
  std::size_t size;
  {
    Cache& cc = cache();
    std::lock_guard<std::mutex> lock(cc.mu);
    auto it = cc.mapped_size.find(p);
    size = it->second;
    cc.mapped_size.erase(it);
    cc.in_use -= size;
    if (cc.cached + size <= std::max(kMinCap, cc.peak_in_use)) {
      cc.free_blocks[size].push_back(p);
      cc.cached += size;
      return;
    }
  }
  munmap(p, size);
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
    for (void* p : kv.second) munmap(p, kv.first);
  c.free_blocks.clear();
  c.cached = 0;
}

}  // namespace moe
