#include "finite.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace moe {

namespace {

// Values per work item: large enough that a thread's start-up is noise.
constexpr index_t kChunk = 1 << 16;

// A value is NaN or Inf exactly when all its exponent bits are set; testing the bits
// lets the compiler vectorise the loop without any floating-point comparison.
template <typename T>
bool chunk_finite(const T* p, index_t n) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  constexpr U exp_mask = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U bad = 0;
  for (index_t i = 0; i < n; ++i) {
    U u;
    std::memcpy(&u, p + i, sizeof(T));
    bad |= U((u & exp_mask) == exp_mask);
  }
  return bad == 0;
}

}  // namespace

template <typename T>
bool all_finite(const T* p, index_t n) {
  const index_t chunks = (n + kChunk - 1) / kChunk;
  bool ok = true;
#pragma omp parallel for schedule(static) reduction(&& : ok) if (chunks > 1)
  for (index_t c = 0; c < chunks; ++c) {
    const index_t i0 = c * kChunk;
    ok = chunk_finite(p + i0, std::min(kChunk, n - i0)) && ok;
  }
  return ok;
}

template bool all_finite<float>(const float*, index_t);
template bool all_finite<double>(const double*, index_t);

}  // namespace moe
