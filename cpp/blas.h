// GEMM entry points. Eigen is the array layer; matrix products go to OpenBLAS,
// always single-threaded: parallelism is ours (OpenMP over fixed tiles), so the
// result never depends on the number of threads.
#pragma once
#include <initializer_list>
#include <string>

#include "small_gemm_bf16.h"
#include "tensor.h"

namespace moe {

// Throws std::length_error (ValueError in Python) if a size passes the BLAS's 32-bit int.
// Call it before a parallel region: a throw inside one would terminate the process.
void check_blas_dims(std::initializer_list<index_t> dims);

// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major. Sizes must have passed
// check_blas_dims (gemm_tiled checks its own).
// op(A) is [M,K]: A is [M,K] (lda >= K) or, when trans_a, [K,M] (lda >= M).
void gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha,
          const float* A, index_t lda, const float* B, index_t ldb, float beta, float* C,
          index_t ldc);
void gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, double alpha,
          const double* A, index_t lda, const double* B, index_t ldb, double beta, double* C,
          index_t ldc);

// Rows and columns of C per tile in gemm_tiled. Fixed (never derived from the thread count)
// so that every run splits the work the same way and gets the same bits.
constexpr index_t kGemmRowTile = 128;
constexpr index_t kGemmColTile = 256;
// Below kGemmMinTiles tiles of that size, a product is split into these smaller ones.
constexpr index_t kGemmMinTiles = 8;
constexpr index_t kGemmSmallRowTile = 48;
constexpr index_t kGemmSmallColTile = 64;

// The same product, with C split into fixed kGemmRowTile x kGemmColTile tiles
// run in parallel (serially when already inside a parallel region). Columns are
// split too so that a product with few rows (a weight gradient) still uses
// every thread. Tiles with alpha 1 and beta 0 or 1 (every caller's) run on
// small_gemm (small_gemm.h), others on the BLAS.
template <typename T>
void gemm_tiled(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, T alpha,
                const T* A, index_t lda, const T* B, index_t ldb, T beta, T* C, index_t ldc);

// C [M, N] (+)= op(A) op(B) on the bfloat16 kernel k (not the fallback), in gemm_tiled's
// tiles: bfloat16 operands (rounded as packed), float32 sums over the whole of K in each
// tile, so that the bits do not depend on the threads.
void gemm_tiled_bf16(Bf16Kernel k, bool trans_a, bool trans_b, index_t M, index_t N, index_t K,
                     const float* A, index_t lda, const float* B, index_t ldb, bool accumulate,
                     float* C, index_t ldc);

// Makes the linked OpenBLAS single-threaded; called once at module import.
void blas_init();

// What the linked OpenBLAS says of itself: its build line ("OpenBLAS 0.3.34
// DYNAMIC_ARCH ...") and the kernel set it picked for this CPU ("SkylakeX").
std::string blas_config();
std::string blas_corename();

}  // namespace moe
