// A single-threaded GEMM for the expert tiles: C [M,N] (+)= op(A) op(B), row-major.
//
// Why not the BLAS: an expert tile is small (a few hundred rows, d_model and d_ff of
// 128-1024) and OpenBLAS re-packs both operands and walks its blocking logic on every
// such call; at (256 x 128) x (128 x 128) it runs at ~120 GFLOP/s of the ~180 one
// AVX-512 core can do. This kernel packs only op(B) (K-blocks of NR-column panels,
// small enough for L1) and streams op(A) straight from memory with broadcasts, which
// reads a transposed A (the weight gradients' X^T) as cheaply as a plain one.
//
// Each C element is one sequential sum over k in blocks of kKc, added into C block by
// block: the bits depend on the shapes only, never on threads or alignment (FMAs are
// explicit; edges use masked vectors, not a scalar tail).
//
// Built with AVX-512F (zmm) or AVX2+FMA (ymm) when the compiler targets them; otherwise
// it is the BLAS gemm (small_gemm_kernel() says which).
#pragma once
#include "tensor.h"

namespace moe {

// Each C element's sum runs over k in blocks of this many, each block's sum added into C
// in order: a product over K rows equals, bit for bit, the same product accumulated
// block by block over row ranges [0, kSmallGemmKBlock), [kSmallGemmKBlock, ...), ...
constexpr index_t kSmallGemmKBlock = 256;

// op(A) is [M,K]: A [M,K] (lda >= K) or, when trans_a, A [K,M] (lda >= M); likewise
// op(B) [K,N]. accumulate: C += op(A) op(B), else C = op(A) op(B).
template <typename T>
void small_gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const T* A,
                index_t lda, const T* B, index_t ldb, bool accumulate, T* C, index_t ldc);

// The same product with op(B) packed beforehand, for a B used by many calls (an expert's
// weights, by every row tile): pack_b writes packed_b_size(K, N) values (64-byte aligned
// storage keeps the kernel's loads within cache lines). Bitwise the same as small_gemm with
// the SIMD kernels; the BLAS fallback may pick another kernel for the packed (transposed) B.
//
// Packed columns [j, j + n) of op(B), for j a multiple of kPackedColumnAlign, start at
// packed + j * K and are exactly what pack_b of those columns alone writes: threads may
// pack disjoint column ranges, and a product may use a column range of a packed B.
constexpr index_t kPackedColumnAlign = 64;
template <typename T>
index_t packed_b_size(index_t K, index_t N);
template <typename T>
void pack_b(bool trans_b, index_t K, index_t N, const T* B, index_t ldb, T* packed);
template <typename T>
void small_gemm_packed(bool trans_a, index_t M, index_t N, index_t K, const T* A, index_t lda,
                       const T* packed, bool accumulate, T* C, index_t ldc);

// "avx512", "avx2" or "blas": what small_gemm runs on in this build.
const char* small_gemm_kernel();

}  // namespace moe
