// Counter-based Gaussian noise: each value is a pure function of
// (seed, step, index), so it is the same whatever thread draws it.
#pragma once
#include <cmath>
#include <cstdint>

namespace moe {

inline std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform in the open interval (0, 1) from 53 random bits.
inline double uniform_open(std::uint64_t bits) {
  return (double(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// Standard normal by Box-Muller from two hashed counters.
inline double normal_at(std::uint64_t seed, std::uint64_t step, std::uint64_t index) {
  const std::uint64_t base = splitmix64(splitmix64(seed) ^ (step * 0xD1B54A32D192ED03ULL));
  const double u1 = uniform_open(splitmix64(base ^ (2 * index)));
  const double u2 = uniform_open(splitmix64(base ^ (2 * index + 1)));
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

}  // namespace moe
