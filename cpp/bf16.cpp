#include "bf16.h"

namespace moe {

void round_to_bf16(const float* in, float* out, index_t n) {
  for (index_t i = 0; i < n; ++i) out[i] = round_to_bf16(in[i]);
}

Fingerprint fingerprint(const float* x, index_t n) {
  constexpr std::uint32_t kOdd = 0x9e3779b1u;
  Fingerprint f;
  for (int j = 0; j < 16; ++j) f.lanes[j] = 0x811c9dc5u + std::uint32_t(j);
  index_t i = 0;
  std::uint32_t bits[16];
  for (; i + 16 <= n; i += 16) {
    std::memcpy(bits, x + i, sizeof bits);
    for (int j = 0; j < 16; ++j) f.lanes[j] = (f.lanes[j] ^ bits[j]) * kOdd;
  }
  for (int j = 0; i < n; ++i, ++j) {
    std::uint32_t b;
    std::memcpy(&b, x + i, sizeof b);
    f.lanes[j] = (f.lanes[j] ^ b) * kOdd;
  }
  return f;
}

}  // namespace moe
