#include "blas.h"

#include "pool.h"
#include "small_gemm.h"
#include "small_gemm_bf16.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

// PyPI's scipy-openblas32 prefixes every symbol with scipy_ (so that it can sit
// beside another OpenBLAS in one process); a system OpenBLAS has no prefix.
#define MOE_CAT2(a, b) a##b
#define MOE_CAT(a, b) MOE_CAT2(a, b)
#define BLAS(name) MOE_CAT(MOE_BLAS_PREFIX, name)

namespace moe {

namespace {
CBLAS_TRANSPOSE op(bool t) { return t ? CblasTrans : CblasNoTrans; }
}  // namespace

void check_blas_dims(std::initializer_list<index_t> dims) {
  constexpr index_t kMax = std::numeric_limits<int>::max();
  for (index_t d : dims)
    if (d > kMax)
      throw std::length_error("a matrix product has a dimension of " + std::to_string(d) +
                              ", above the 32-bit BLAS's 2^31 - 1: use smaller batches");
}

void gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, float alpha,
          const float* A, index_t lda, const float* B, index_t ldb, float beta, float* C,
          index_t ldc) {
  if (M == 0 || N == 0) return;
  BLAS(cblas_sgemm)(CblasRowMajor, op(trans_a), op(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C,
              ldc);
}

void gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, double alpha,
          const double* A, index_t lda, const double* B, index_t ldb, double beta, double* C,
          index_t ldc) {
  if (M == 0 || N == 0) return;
  BLAS(cblas_dgemm)(CblasRowMajor, op(trans_a), op(trans_b), M, N, K, alpha, A, lda, B, ldb, beta, C,
              ldc);
}

namespace {

// The tiles of C [M, N] of gemm_tiled and gemm_tiled_bf16. A product with few tiles (a
// weight gradient: few rows and columns, a long K) gets smaller ones, so that every thread
// has work. Chosen from the shape alone.
struct Tiling {
  index_t row_tile = kGemmRowTile, col_tile = kGemmColTile, row_tiles = 0, col_tiles = 0;
  Tiling(index_t M, index_t N, index_t small_rows = kGemmSmallRowTile,
         index_t small_cols = kGemmSmallColTile) {
    const auto count = [](index_t n, index_t tile) { return (n + tile - 1) / tile; };
    if (count(M, row_tile) * count(N, col_tile) < kGemmMinTiles) {
      row_tile = small_rows;
      col_tile = small_cols;
    }
    row_tiles = count(M, row_tile);
    col_tiles = count(N, col_tile);
  }
  index_t tiles() const { return row_tiles * col_tiles; }
  bool parallel() const { return tiles() > 1 && !omp_in_parallel(); }
};

}  // namespace

template <typename T>
void gemm_tiled(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, T alpha,
                const T* A, index_t lda, const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  check_blas_dims({M, N, K, lda, ldb, ldc});
  const Tiling tiling(M, N);
  const index_t row_tile = tiling.row_tile, col_tile = tiling.col_tile;
  const index_t col_tiles = tiling.col_tiles, tiles = tiling.tiles();
  const bool parallel = tiling.parallel();
  // Row r0 of op(A) starts at A + r0*lda (plain) or at column r0 (transposed);
  // column c0 of op(B) at B + c0 (plain) or at row c0 (transposed).
  const auto a_rows = [&](index_t r0) { return trans_a ? A + r0 : A + r0 * lda; };
  const auto b_cols = [&](index_t c0) { return trans_b ? B + c0 * ldb : B + c0; };
  if (!(alpha == T(1) && (beta == T(0) || beta == T(1)))) {
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (index_t i = 0; i < tiles; ++i) {
      const index_t r0 = (i / col_tiles) * row_tile, c0 = (i % col_tiles) * col_tile;
      gemm(trans_a, trans_b, std::min(row_tile, M - r0), std::min(col_tile, N - c0), K,
           alpha, a_rows(r0), lda, b_cols(c0), ldb, beta, C + r0 * ldc + c0, ldc);
    }
    return;
  }
  // op(B) packed once, by column tiles, for every row tile (not once per tile)
  static_assert(kGemmColTile % kPackedColumnAlign == 0 && kGemmSmallColTile % kPackedColumnAlign == 0,
                "column tiles must start on a panel");
  Scratch<T> packed(packed_b_size<T>(K, N));
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(dynamic, 1)
    for (index_t c = 0; c < col_tiles; ++c) {
      const index_t c0 = c * col_tile;
      pack_b(trans_b, K, std::min(col_tile, N - c0), b_cols(c0), ldb, packed.get() + c0 * K);
    }
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < tiles; ++i) {
      const index_t r0 = (i / col_tiles) * row_tile, c0 = (i % col_tiles) * col_tile;
      small_gemm_packed(trans_a, std::min(row_tile, M - r0), std::min(col_tile, N - c0),
                        K, a_rows(r0), lda, packed.get() + c0 * K, beta == T(1),
                        C + r0 * ldc + c0, ldc);
    }
  }
}

void gemm_tiled_bf16(Bf16Kernel k, bool trans_a, bool trans_b, index_t M, index_t N, index_t K,
                     const float* A, index_t lda, const float* B, index_t ldb, bool accumulate,
                     float* C, index_t ldc) {
  check_blas_dims({M, N, K, lda, ldb, ldc});
  // small tiles of whole 32-row AMX blocks and 32-column panels: each tile packs its A
  // anew, which at the bfloat16 kernels' speed costs as much as a small tile's product
  const Tiling tiling(M, N, 64, 128);
  const index_t row_tile = tiling.row_tile, col_tile = tiling.col_tile;
  const index_t col_tiles = tiling.col_tiles, tiles = tiling.tiles();
  const auto a_rows = [&](index_t r0) { return trans_a ? A + r0 : A + r0 * lda; };
  const auto b_cols = [&](index_t c0) { return trans_b ? B + c0 * ldb : B + c0; };
  // op(B) packed once per column tile, each in its own stretch, for every row tile
  const index_t stretch = packed_b_bf16_size(k, K, col_tile);
  Scratch<std::uint32_t> packed(col_tiles * stretch);
#pragma omp parallel if (tiling.parallel())
  {
#pragma omp for schedule(dynamic, 1)
    for (index_t c = 0; c < col_tiles; ++c)
      pack_b_bf16(k, trans_b, K, std::min(col_tile, N - c * col_tile), b_cols(c * col_tile), ldb,
                  packed.get() + c * stretch);
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < tiles; ++i) {
      const index_t r = i / col_tiles, c = i % col_tiles, r0 = r * row_tile, c0 = c * col_tile;
      small_gemm_packed_bf16(k, trans_a, std::min(row_tile, M - r0), std::min(col_tile, N - c0), K,
                             a_rows(r0), lda, packed.get() + c * stretch, accumulate,
                             C + r0 * ldc + c0, ldc);
    }
  }
}

template void gemm_tiled<float>(bool, bool, index_t, index_t, index_t, float, const float*,
                                index_t, const float*, index_t, float, float*, index_t);
template void gemm_tiled<double>(bool, bool, index_t, index_t, index_t, double, const double*,
                                 index_t, const double*, index_t, double, double*, index_t);

void blas_init() { BLAS(openblas_set_num_threads)(1); }

std::string blas_config() { return BLAS(openblas_get_config)(); }

std::string blas_corename() { return BLAS(openblas_get_corename)(); }

}  // namespace moe
