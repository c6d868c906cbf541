#include "small_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <new>
#include <type_traits>

#include "aligned_buffer.h"
#include "blas.h"

namespace moe {

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define MOE_SMALL_GEMM_SIMD 1

namespace {

// One SIMD register of T, and the few operations the micro-kernel needs.
template <typename T>
struct Simd;

#if defined(__AVX512F__)
constexpr int kRows = 12;  // micro-tile rows: 2 x 12 accumulators + 2 B vectors + 1 broadcast <= 32 zmm

template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __mmask16 mask(int n) { return n >= L ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
  static V load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_n(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  // p[j * stride] for j < n (zeros beyond)
  static V gather_n(const float* p, int stride, int n) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set1_epi32(stride),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                             12, 13, 14, 15));
    return _mm512_mask_i32gather_ps(zero(), mask(n), idx, p, 4);
  }
};

template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int L = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static __mmask8 mask(int n) { return n >= L ? __mmask8(0xFF) : __mmask8((1u << n) - 1); }
  static V load_n(const double* p, int n) { return _mm512_maskz_loadu_pd(mask(n), p); }
  static void store_n(double* p, V v, int n) { _mm512_mask_storeu_pd(p, mask(n), v); }
  static V gather_n(const double* p, int stride, int n) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_set1_epi32(stride),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm512_mask_i32gather_pd(zero(), mask(n), idx, p, 8);
  }
};
#else
constexpr int kRows = 6;  // 2 x 6 accumulators + 2 B vectors + 1 broadcast <= 16 ymm

template <>
struct Simd<float> {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store_n(float* p, V v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static V gather_n(const float* p, int stride, int n) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_set1_epi32(stride),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_mask_i32gather_ps(zero(), p, idx, _mm256_castsi256_ps(mask(n)), 4);
  }
};

template <>
struct Simd<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double a) { return _mm256_set1_pd(a); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static V load_n(const double* p, int n) { return _mm256_maskload_pd(p, mask(n)); }
  static void store_n(double* p, V v, int n) { _mm256_maskstore_pd(p, mask(n), v); }
  static V gather_n(const double* p, int stride, int n) {
    const __m128i idx = _mm_mullo_epi32(_mm_set1_epi32(stride), _mm_setr_epi32(0, 1, 2, 3));
    return _mm256_mask_i32gather_pd(zero(), p, idx, _mm256_castsi256_pd(mask(n)), 8);
  }
};
#endif

// Columns per packed panel: two registers.
template <typename T>
constexpr index_t kCols = 2 * Simd<T>::L;
static_assert(kPackedColumnAlign % kCols<float> == 0 && kPackedColumnAlign % kCols<double> == 0,
              "a packed column range must start on a panel");

// k and columns per block of packed panels: kKc x kNc values stay in L2 (512 KiB in
// float32), one micro-tile's rows of A (kRows x kKc) in L1.
constexpr index_t kKc = kSmallGemmKBlock;
constexpr index_t kNc = 512;

// dst[c * ldd + r] = src[r * ld + c] for r, c < 8: an 8 x 8 block of floats transposed with
// shuffles, which move 64 values in about 24 instructions where gathers fetch a value per
// cycle at best. (AVX-512 CPUs have AVX2: the same code serves both builds.)
#if defined(__AVX2__)
#define MOE_TRANSPOSE_8X8 1
inline void transpose_8x8(const float* src, index_t ld, float* dst, index_t ldd) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; i += 2) {  // t[i]: rows i, i+1 interleaved (columns 0,1 | 4,5), t[i+1]: (2,3 | 6,7)
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4)  // u[h + c]: column c (c | c + 4) of rows h..h+3
    for (int q = 0; q < 2; ++q) {
      u[h + 2 * q] = _mm256_shuffle_ps(t[h + q], t[h + 2 + q], _MM_SHUFFLE(1, 0, 1, 0));
      u[h + 2 * q + 1] = _mm256_shuffle_ps(t[h + q], t[h + 2 + q], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ldd, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
  }
}
#endif

// op(B) rows k0..k0+kc, columns j0..j0+nc (nc <= kCols) into panel [kc][kCols], zero-padded.
template <typename T>
void pack_panel(bool trans_b, const T* B, index_t ldb, index_t k0, index_t kc, index_t j0,
                index_t nc, T* panel) {
  constexpr index_t NR = kCols<T>;
  using S = Simd<T>;
  constexpr int L = S::L;
  if (!trans_b) {
    const int n0 = int(std::min<index_t>(nc, L)), n1 = int(nc) - n0;
    for (index_t k = 0; k < kc; ++k) {
      const T* src = B + (k0 + k) * ldb + j0;
      T* dst = panel + k * NR;
      S::store(dst, nc == NR ? S::load(src) : S::load_n(src, n0));
      S::store(dst + L, nc == NR ? S::load(src + L) : n1 > 0 ? S::load_n(src + L, n1) : S::zero());
    }
    return;
  }
  // op(B)(k, j) = B[j * ldb + k]: a full float panel in 8 x 8 blocks of k and columns
  const T* src = B + j0 * ldb + k0;
  index_t k_done = 0;
#if MOE_TRANSPOSE_8X8
  if constexpr (std::is_same_v<T, float>) {
    if (nc == NR) {
      for (; k_done + 8 <= kc; k_done += 8)
        for (index_t j = 0; j < NR; j += 8)
          transpose_8x8(src + j * ldb + k_done, ldb, panel + k_done * NR + j, NR);
    }
  }
#endif
  // the rest: one gather of L columns' values per register
  const int n0 = int(std::min<index_t>(nc, L)), n1 = int(nc) - n0;
  if (L * ldb <= std::numeric_limits<int>::max()) {
    const int stride = int(ldb);
    for (index_t k = k_done; k < kc; ++k) {
      S::store(panel + k * NR, S::gather_n(src + k, stride, n0));
      S::store(panel + k * NR + L, n1 > 0 ? S::gather_n(src + L * ldb + k, stride, n1) : S::zero());
    }
    return;
  }
  if (nc < NR) std::fill(panel, panel + kc * NR, T(0));  // rows too long for 32-bit offsets
  for (index_t j = 0; j < nc; ++j)
    for (index_t k = 0; k < kc; ++k) panel[k * NR + j] = src[j * ldb + k];
}

template <typename T>
void zero_unless(bool accumulate, index_t M, index_t N, T* C, index_t ldc) {
  if (!accumulate)
    for (index_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
}

// op(A)(i, k) of an A stored plain ([M, K]) or transposed ([K, M]); a compile-time choice
// so that the micro-tile's row offsets are constants (transposed) or hoisted pointers.
template <bool TransA, typename T>
inline const T* a_at(const T* a, index_t lda, index_t i, index_t k) {
  return TransA ? a + k * lda + i : a + i * lda + k;
}

// C rows [R][nc] (+)= op(A) rows [R][kc] x panel [kc][kCols], with NV = 2 registers per
// row, or NV = 1 when nc <= L (a narrow product, e.g. a router's E columns, would
// otherwise spend half the FMAs on the panel's zero padding).
template <bool TransA, typename T, int NV, int R>
void micro_tile(index_t kc, const T* a, index_t lda, const T* panel, T* c, index_t ldc,
                index_t nc, bool accumulate) {
  using S = Simd<T>;
  constexpr int L = S::L;
  typename S::V acc[NV][R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[v][i] = S::zero();
  for (index_t k = 0; k < kc; ++k) {
    typename S::V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = S::load(panel + k * 2 * L + v * L);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const typename S::V ai = S::set1(*a_at<TransA>(a, lda, i, k));
      for (int v = 0; v < NV; ++v) acc[v][i] = S::fma(ai, b[v], acc[v][i]);
    }
  }
  if (nc == NV * L) {
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < NV; ++v) {
        T* ci = c + i * ldc + v * L;
        S::store(ci, accumulate ? S::add(S::load(ci), acc[v][i]) : acc[v][i]);
      }
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) {
      const int n = int(std::min<index_t>(L, nc - v * L));
      if (n <= 0) continue;
      T* ci = c + i * ldc + v * L;
      S::store_n(ci, accumulate ? S::add(S::load_n(ci, n), acc[v][i]) : acc[v][i], n);
    }
}

// The micro-tile for the last R < kRows rows of a block (R known only at run time).
template <bool TransA, typename T, int NV, int R = kRows - 1>
void micro_tail(int rows, index_t kc, const T* a, index_t lda, const T* panel, T* c,
                index_t ldc, index_t nc, bool accumulate) {
  if constexpr (R >= 1) {
    if (rows == R) return micro_tile<TransA, T, NV, R>(kc, a, lda, panel, c, ldc, nc, accumulate);
    micro_tail<TransA, T, NV, R - 1>(rows, kc, a, lda, panel, c, ldc, nc, accumulate);
  }
}

// Rows i.. (at most kRows) of C, columns of one panel.
template <bool TransA, typename T, int NV>
void micro_rows(int rows, index_t kc, const T* a, index_t lda, const T* panel, T* c,
                index_t ldc, index_t nc, bool accumulate) {
  if (rows == kRows)
    micro_tile<TransA, T, NV, kRows>(kc, a, lda, panel, c, ldc, nc, accumulate);
  else
    micro_tail<TransA, T, NV>(rows, kc, a, lda, panel, c, ldc, nc, accumulate);
}

// C [M][N] (+)= op(A) rows 0..M, k0..k0+kc x packed panels of that k block (panel j at
// panels + j * stride). Rows outer: the micro-tile's rows of A stay in L1 across the
// panels, which stream from L2 in order.
//
// A transposed A read by many panels is first copied, kRows values per k, into a contiguous
// block: read in place, its kc rows lie lda apart, and with lda a multiple of 512 bytes
// (d_model or d_ff of 128, 256, 512, ...) they all fall into a few L1 sets and evict each
// other on every panel. The copy holds the same values, read in the same order: the same
// bits. Over few panels the copy costs more than it saves (measured at 4 and 8 panels).
constexpr index_t kCopyTransAPanels = 12;
template <bool TransA, typename T>
void panels_block(index_t M, index_t N, index_t kc, const T* a, index_t lda, const T* panels,
                  index_t stride, T* c, index_t ldc, bool accumulate) {
  constexpr index_t NR = kCols<T>;
  alignas(64) T a_block[TransA ? kKc * kRows : 1];
  for (index_t i = 0; i < M; i += kRows) {
    const int rows = int(std::min<index_t>(kRows, M - i));
    const T* ai = a_at<TransA>(a, lda, i, 0);
    index_t la = lda;
    if constexpr (TransA) {
      if (N >= kCopyTransAPanels * NR) {
        using S = Simd<T>;
        for (index_t k = 0; k < kc; ++k)
          for (int v = 0; v < rows; v += S::L)
            S::store_n(a_block + k * kRows + v, S::load_n(ai + k * lda + v, rows - v), rows - v);
        ai = a_block;
        la = kRows;
      }
    }
    for (index_t j0 = 0; j0 < N; j0 += NR) {
      const T* panel = panels + (j0 / NR) * stride;
      const index_t nc = std::min(NR, N - j0);
      if (nc <= Simd<T>::L)
        micro_rows<TransA, T, 1>(rows, kc, ai, la, panel, c + i * ldc + j0, ldc, nc, accumulate);
      else
        micro_rows<TransA, T, 2>(rows, kc, ai, la, panel, c + i * ldc + j0, ldc, nc, accumulate);
    }
  }
}

// Column k0 of op(A).
template <typename T>
const T* a_at(bool trans_a, const T* a, index_t lda, index_t k0) {
  return trans_a ? a + k0 * lda : a + k0;
}

// panels_block with the transposition of A chosen at run time.
template <typename T>
void panels_block(bool trans_a, index_t M, index_t N, index_t kc, const T* a, index_t lda,
                  const T* panels, index_t stride, T* c, index_t ldc, bool accumulate) {
  if (trans_a)
    panels_block<true>(M, N, kc, a, lda, panels, stride, c, ldc, accumulate);
  else
    panels_block<false>(M, N, kc, a, lda, panels, stride, c, ldc, accumulate);
}

}  // namespace

template <typename T>
void small_gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const T* A,
                index_t lda, const T* B, index_t ldb, bool accumulate, T* C, index_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) return zero_unless(accumulate, M, N, C, ldc);
  constexpr index_t NR = kCols<T>;
  // one block of packed panels per thread, reused by every call on it (the kernels call
  // this inside OpenMP); kKc x kNc values, which stay in L2
  thread_local AlignedBuffer<T> panels(kKc * kNc);
  for (index_t n0 = 0; n0 < N; n0 += kNc) {
    const index_t nb = std::min(kNc, N - n0);
    for (index_t k0 = 0; k0 < K; k0 += kKc) {
      const index_t kc = std::min(kKc, K - k0);
      for (index_t j0 = 0; j0 < nb; j0 += NR)
        pack_panel(trans_b, B, ldb, k0, kc, n0 + j0, std::min(NR, nb - j0),
                   panels.get() + (j0 / NR) * kc * NR);
      panels_block(trans_a, M, nb, kc, a_at(trans_a, A, lda, k0), lda, panels.get(), kc * NR,
                   C + n0, ldc, accumulate || k0 > 0);
    }
  }
}

template <typename T>
index_t packed_b_size(index_t K, index_t N) {
  constexpr index_t NR = kCols<T>;
  return (N + NR - 1) / NR * NR * K;
}

template <typename T>
void pack_b(bool trans_b, index_t K, index_t N, const T* B, index_t ldb, T* packed) {
  constexpr index_t NR = kCols<T>;
  for (index_t j0 = 0; j0 < N; j0 += NR)
    pack_panel(trans_b, B, ldb, 0, K, j0, std::min(NR, N - j0), packed + (j0 / NR) * K * NR);
}

template <typename T>
void small_gemm_packed(bool trans_a, index_t M, index_t N, index_t K, const T* A, index_t lda,
                       const T* packed, bool accumulate, T* C, index_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) return zero_unless(accumulate, M, N, C, ldc);
  constexpr index_t NR = kCols<T>;
  // the same blocks, in the same order, as small_gemm: the same bits
  for (index_t n0 = 0; n0 < N; n0 += kNc)
    for (index_t k0 = 0; k0 < K; k0 += kKc)
      panels_block(trans_a, M, std::min(kNc, N - n0), std::min(kKc, K - k0),
                   a_at(trans_a, A, lda, k0), lda, packed + (n0 / NR) * K * NR + k0 * NR, K * NR,
                   C + n0, ldc, accumulate || k0 > 0);
}

const char* small_gemm_kernel() {
#if defined(__AVX512F__)
  return "avx512";
#else
  return "avx2";
#endif
}

#else  // no AVX2/AVX-512 in this build: the BLAS

// One BLAS call per k block of kSmallGemmKBlock, in order: a product over K is then bitwise
// the same as the k blocks accumulated one call at a time, as with the SIMD kernels (the
// experts' by-expert backward adds each row tile's weight-gradient share that way).
template <typename T>
void small_gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const T* A,
                index_t lda, const T* B, index_t ldb, bool accumulate, T* C, index_t ldc) {
  index_t k0 = 0;
  do {
    const index_t kc = std::min(kSmallGemmKBlock, K - k0);
    const T* a = trans_a ? A + k0 * lda : A + k0;
    const T* b = trans_b ? B + k0 : B + k0 * ldb;
    gemm(trans_a, trans_b, M, N, kc, T(1), a, lda, b, ldb, accumulate || k0 > 0 ? T(1) : T(0),
         C, ldc);
    k0 += kc;
  } while (k0 < K);
}

template <typename T>
index_t packed_b_size(index_t K, index_t N) {
  return K * N;
}

// "packed" is op(B)^T, row-major [N, K]: column j starts at packed + j * K, as in the
// SIMD layout
template <typename T>
void pack_b(bool trans_b, index_t K, index_t N, const T* B, index_t ldb, T* packed) {
  for (index_t j = 0; j < N; ++j)
    for (index_t k = 0; k < K; ++k) packed[j * K + k] = trans_b ? B[j * ldb + k] : B[k * ldb + j];
}

template <typename T>
void small_gemm_packed(bool trans_a, index_t M, index_t N, index_t K, const T* A, index_t lda,
                       const T* packed, bool accumulate, T* C, index_t ldc) {
  small_gemm(trans_a, true, M, N, K, A, lda, packed, K, accumulate, C, ldc);
}

const char* small_gemm_kernel() { return "blas"; }

#endif

#define MOE_INSTANTIATE(T)                                                                  \
  template void small_gemm<T>(bool, bool, index_t, index_t, index_t, const T*, index_t,     \
                              const T*, index_t, bool, T*, index_t);                        \
  template index_t packed_b_size<T>(index_t, index_t);                                      \
  template void pack_b<T>(bool, index_t, index_t, const T*, index_t, T*);                   \
  template void small_gemm_packed<T>(bool, index_t, index_t, index_t, const T*, index_t,    \
                                     const T*, bool, T*, index_t);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
