// Facts about this build and this machine, for build_info() and the benchmarks.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "tensor.h"

namespace moe {

// (key, value) pairs fixed when the extension was compiled and linked: compiler,
// flags, the SIMD sets the code was compiled for, OpenMP, Eigen, the BLAS.
std::vector<std::pair<std::string, std::string>> build_facts();

// Runs `iters` rounds of independent fused multiply-adds on SIMD registers
// (16 accumulators, enough to hide the FMA latency on the two FMA ports of
// current x86 cores) on every OpenMP thread; returns the FLOPs done
// (2 per lane per FMA) and a checksum that keeps the loop from being removed.
// The caller times it: FLOPs / seconds is the machine's FP32 FMA peak.
struct FmaPeakResult {
  double flops;
  float checksum;
};
FmaPeakResult fma_peak(index_t iters);

}  // namespace moe
