// bfloat16 arithmetic emulated in float32 (MoEConfig.compute_dtype = "bfloat16").
//
// A bfloat16 is the upper 16 bits of a float32: the same exponent range, 8 significant bits.
// Rounding keeps those bits, to nearest with ties to even (what torch, oneDNN and the
// AVX512-BF16 VCVTNEPS2BF16 instruction do); NaN stays NaN (quieted, sign kept), +-inf stays,
// a finite value past the largest bfloat16 rounds to inf, subnormals round like the rest.
// The rounded value is stored back as a float32 (low 16 bits 0): the product of two such
// values is exact in float32 (8 + 8 significant bits), so a float32 GEMM of rounded operands
// is a bfloat16 GEMM with float32 accumulation, bit for bit in the GEMM's summation order.
#pragma once
#include <cstdint>
#include <cstring>

#include "tensor.h"

namespace moe {

inline float round_to_bf16(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  // a NaN's payload may sit in the low bits only: set the quiet bit so it survives the cut
  u = nan ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  float y;
  std::memcpy(&y, &u, sizeof y);
  return y;
}

// lo and hi rounded to bfloat16 and packed into one 32-bit word, lo in the low half: the
// pair (element 2j, element 2j + 1) of a 32-bit lane as VDPBF16PS reads it.
inline std::uint32_t bf16_pair(float lo, float hi) {
  const float l = round_to_bf16(lo), h = round_to_bf16(hi);
  std::uint32_t ul, uh;
  std::memcpy(&ul, &l, sizeof ul);
  std::memcpy(&uh, &h, sizeof uh);
  return (uh & 0xffff0000u) | (ul >> 16);
}

// out[i] = round_to_bf16(in[i]) for n values (in == out allowed).
void round_to_bf16(const float* in, float* out, index_t n);

// A fingerprint of n float32 values' bits: 16 lanes of 32 bits, lane j mixing the values
// j, j + 16, ... as h = (h ^ bits) * odd. Each step is a bijection of h, so changing any one
// value always changes the fingerprint; two different arrays share one with probability
// about 2^-32 per changed lane. It lets a cache of rounded weights see that they changed.
struct Fingerprint {
  std::uint32_t lanes[16];
};
Fingerprint fingerprint(const float* x, index_t n);

}  // namespace moe
