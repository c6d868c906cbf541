#include "machine.h"

#include <omp.h>

#include "blas.h"
#include "small_gemm.h"
#include "pool.h"

namespace moe {

std::vector<std::pair<std::string, std::string>> build_facts() {
  std::string simd;
  // what the compiler was allowed to emit (-march), not what this CPU has
#ifdef __SSE4_2__
  simd += "sse4.2 ";
#endif
#ifdef __AVX__
  simd += "avx ";
#endif
#ifdef __AVX2__
  simd += "avx2 ";
#endif
#ifdef __FMA__
  simd += "fma ";
#endif
#ifdef __AVX512F__
  simd += "avx512f ";
#endif
#ifdef __AVX512BW__
  simd += "avx512bw ";
#endif
#ifdef __AVX512VL__
  simd += "avx512vl ";
#endif
#ifdef __ARM_NEON
  simd += "neon ";
#endif
  if (!simd.empty()) simd.pop_back();
  return {
      {"compiler", MOE_COMPILER},
      {"cxx_flags", MOE_CXX_FLAGS},
      {"compiled_simd", simd},
      {"eigen", std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) +
                    "." + std::to_string(EIGEN_MINOR_VERSION)},
      {"eigen_simd", Eigen::SimdInstructionSetsInUse()},
      {"openmp", std::to_string(_OPENMP)},
      {"blas", MOE_BLAS_NAME},
      {"blas_config", blas_config()},
      {"blas_corename", blas_corename()},
      {"gemm_kernel", small_gemm_kernel()},
      {"block_cache", pool_enabled() ? "on" : "off (sanitizer build)"},
  };
}

FmaPeakResult fma_peak(index_t iters) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int kLanes = int(sizeof(Packet) / sizeof(float));
  constexpr int kAcc = 16;
  float total = 0.0f;
  int threads = 1;
#pragma omp parallel reduction(+ : total)
  {
#pragma omp single
    threads = omp_get_num_threads();
    using namespace Eigen::internal;
    Packet acc[kAcc];
    for (int a = 0; a < kAcc; ++a) acc[a] = pset1<Packet>(1.0f + 1e-3f * float(a));
    // mul close to 1 and add tiny, so nothing overflows or denormalises
    const Packet mul = pset1<Packet>(0.999999f), add = pset1<Packet>(1e-7f);
    for (index_t i = 0; i < iters; ++i)
      for (int a = 0; a < kAcc; ++a) acc[a] = pmadd(acc[a], mul, add);
    for (int a = 0; a < kAcc; ++a) total += predux(acc[a]);
  }
  return {2.0 * double(kLanes) * kAcc * double(iters) * threads, total};
}

}  // namespace moe
