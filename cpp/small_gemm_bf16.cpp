#include "small_gemm_bf16.h"

#include <atomic>
#include <memory>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "bf16.h"
#include "small_gemm.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOE_BF16_KERNELS 1
#endif

namespace moe {

const char* bf16_kernel_name(Bf16Kernel k) {
  switch (k) {
    case Bf16Kernel::avx512_bf16: return "avx512_bf16";
    case Bf16Kernel::emulated: return "emulated";
    case Bf16Kernel::amx: return "amx";
    case Bf16Kernel::amx_emulated: return "amx_emulated";
    default: return "fallback";
  }
}

#if MOE_BF16_KERNELS

namespace {

// CPUID leaf 7 sub-leaf `sub`, or zeros past the CPU's highest leaf.
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};
Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs{};
  return r;
}

// Whether the OS saves the register state in `mask` (XCR0 bits) across context switches.
bool os_saves(std::uint64_t mask) {
  if (!(cpuid(1, 0).c & (1u << 27))) return false;  // OSXSAVE: XGETBV usable
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((std::uint64_t(hi) << 32 | lo) & mask) == mask;
}

// Each asked once per process: CPUID traps to the hypervisor in a VM (microseconds), and
// every GEMM call checks its kernel.
bool cpu_has_avx512_bf16() {
  static const bool ok = [] {
    const Regs l7 = cpuid(7, 0), l7s1 = cpuid(7, 1);
    const bool f = l7.b & (1u << 16), bw = l7.b & (1u << 30), vl = l7.b & (1u << 31);
    const bool bf16 = l7s1.a & (1u << 5);
    return f && bw && vl && bf16 && os_saves(0xE6);  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
  }();
  return ok;
}

// AMX-TILE and AMX-BF16, the OS saving the tile state (XCR0 bits 17, 18), and Linux's
// permission for this process to use it (arch_prctl ARCH_REQ_XCOMP_PERM; without it the
// first tile instruction raises SIGILL).
bool cpu_has_amx_bf16() {
  static const bool ok = [] {
    const Regs l7 = cpuid(7, 0);
    const bool tile = l7.d & (1u << 24), bf16 = l7.d & (1u << 22);
    if (!(tile && bf16 && cpu_has_avx512_bf16() && os_saves(0x60000))) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool cpu_is_amd() {
  static const bool ok = [] {
    const Regs r = cpuid(0, 0);  // vendor string in ebx, edx, ecx
    return r.b == 0x68747541u && r.d == 0x69746e65u && r.c == 0x444d4163u;  // "AuthenticAMD"
  }();
  return ok;
}

bool cpu_has_avx2_fma() {
  static const bool ok = [] {
    const bool fma = cpuid(1, 0).c & (1u << 12), avx2 = cpuid(7, 0).b & (1u << 5);
    return fma && avx2 && os_saves(0x6);
  }();
  return ok;
}

// Packing, value by value (bf16_pair): the kernels without a conversion instruction.
struct ScalarPacking {
  // out[p] = the pair (x[2p], x[2p + 1]), p < n
  static void pack_row(const float* x, index_t n, std::uint32_t* out) {
    for (index_t p = 0; p < n; ++p) out[p] = bf16_pair(x[2 * p], x[2 * p + 1]);
  }
  // out[j] = the pair (b0[j], b1[j]), j < n
  static void pack_two_rows(const float* b0, const float* b1, index_t n, std::uint32_t* out) {
    for (index_t j = 0; j < n; ++j) out[j] = bf16_pair(b0[j], b1[j]);
  }
  // blk[i * stride + p] = the pair (a[2p][i], a[2p + 1][i]) (row r of a at a + r * lda),
  // i < rows, p < n: the columns of a transposed A, side by side
  static void pack_columns(const float* a, index_t lda, index_t rows, index_t n,
                           std::uint32_t* blk, index_t stride) {
    for (index_t p = 0; p < n; ++p) {
      const float* a0 = a + 2 * p * lda;
      const float* a1 = a0 + lda;
      for (index_t i = 0; i < rows; ++i) blk[i * stride + p] = bf16_pair(a0[i], a1[i]);
    }
  }
  // out[p * stride + j] = the pair (b[j][2p], b[j][2p + 1]) (row j of b at b + j * ldb),
  // j < rows, p < n: each row's pairs down a column of out (a transposed B's panel)
  static void pack_rows_across(const float* b, index_t ldb, index_t rows, index_t n,
                               std::uint32_t* out, index_t stride) {
    for (index_t j = 0; j < rows; ++j)
      for (index_t p = 0; p < n; ++p) out[p * stride + j] = bf16_pair(b[j * ldb + 2 * p], b[j * ldb + 2 * p + 1]);
  }
};

// A tile kernel's 32 x 32 block of C, rows [rows][nc] of c, through `out` (ld 32): loaded,
// zero-padded, to start from (accumulate: C, else 0), and stored back.
void load_block(float* out, int rows, const float* c, index_t ldc, index_t nc, bool accumulate) {
  for (int i = 0; i < 32; ++i)
    for (index_t j = 0; j < 32; ++j)
      out[i * 32 + j] = accumulate && i < rows && j < nc ? c[i * ldc + j] : 0.0f;
}
void store_block(const float* out, int rows, float* c, index_t ldc, index_t nc) {
  for (int i = 0; i < rows; ++i)
    for (index_t j = 0; j < nc; ++j) c[i * ldc + j] = out[i * 32 + j];
}

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
namespace bf16_avx512 {
// 32 float32 values (lo, then hi) rounded to bfloat16 in order, as round_to_bf16 rounds them
// for the products: VCVTNE2PS2BF16 rounds normal values, inf and NaN the same way (checked
// over 64 M random bit patterns) but flushes subnormal inputs to zero. VDPBF16PS and
// TDPBF16PS read bfloat16 subnormals as zero anyway, so only the subnormals that round up
// to the smallest normal (|x| in [2^-126 - 2^-134, 2^-126)) are put right here.
inline __m512i round_32(__m512 lo, __m512 hi) {
  const __m512i r = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), from = _mm512_set1_epi32(0x007f8000),
                below = _mm512_set1_epi32(0x00800000);
  const auto lifted = [&](__m512 v) {
    const __m512i u = _mm512_and_si512(_mm512_castps_si512(v), magnitude);
    return __mmask32(_mm512_cmpge_epu32_mask(u, from) & _mm512_cmplt_epu32_mask(u, below));
  };
  const __mmask32 m = lifted(lo) | (lifted(hi) << 16);
  if (!m) return r;
  // the signs of the 32 inputs, with 2^-126's bits
  const __m512i top = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(lo), 16))),
      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(hi), 16)), 1);
  const __m512i sign = _mm512_and_si512(top, _mm512_set1_epi16(short(0x8000)));
  return _mm512_mask_mov_epi16(r, m, _mm512_or_si512(sign, _mm512_set1_epi16(0x0080)));
}

struct Ops {
  using F = __m512;
  using I = __m512i;
  static constexpr index_t L = 16;
  static constexpr int kRows = 12;  // 2 x 12 accumulators + 2 panel vectors + 1 broadcast <= 32 zmm
  static constexpr bool kTiles = false;
  static constexpr index_t kPairAlign = 1;
  struct Session {};
  static F zero() { return _mm512_setzero_ps(); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static __mmask16 mask(int n) { return __mmask16((1u << n) - 1); }  // n < 16
  static F load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store_n(float* p, F v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static I load_pairs(const std::uint32_t* p) { return _mm512_loadu_si512(p); }
  static I bcast(std::uint32_t x) { return _mm512_set1_epi32(int(x)); }
  static F dot(F acc, I a, I b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  // ScalarPacking's, 16 pairs at a time
  static void pack_row(const float* x, index_t n, std::uint32_t* out) {
    index_t p = 0;
    for (; p + 16 <= n; p += 16)
      _mm512_storeu_si512(out + p, round_32(_mm512_loadu_ps(x + 2 * p), _mm512_loadu_ps(x + 2 * p + 16)));
    ScalarPacking::pack_row(x + 2 * p, n - p, out + p);
  }
  // the pairs (b0[j], b1[j]) of 16 columns j
  static __m512i pairs_of(const float* b0, const float* b1) {
    // 16-bit elements 0-15 from b0, 16-31 from b1: interleaved into (b0[j], b1[j]) pairs
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(pairs, round_32(_mm512_loadu_ps(b0), _mm512_loadu_ps(b1)));
  }
  static void pack_two_rows(const float* b0, const float* b1, index_t n, std::uint32_t* out) {
    index_t j = 0;
    for (; j + 16 <= n; j += 16) _mm512_storeu_si512(out + j, pairs_of(b0 + j, b1 + j));
    ScalarPacking::pack_two_rows(b0 + j, b1 + j, n - j, out + j);
  }
  // r[q][i] -> r[i][q], 16 x 16 32-bit words: pairs of words, then of their halves, then
  // 128-bit lanes gathered across registers in two steps
  static void transpose_16x16(__m512i r[16]) {
    __m512i a[16];
    for (int q = 0; q < 16; q += 2) {
      a[q] = _mm512_unpacklo_epi32(r[q], r[q + 1]);
      a[q + 1] = _mm512_unpackhi_epi32(r[q], r[q + 1]);
    }
    // b[4k + m], lane l: word 4l + m of rows 4k .. 4k + 3
    __m512i b[16];
    for (int k = 0; k < 16; k += 4) {
      b[k] = _mm512_unpacklo_epi64(a[k], a[k + 2]);
      b[k + 1] = _mm512_unpackhi_epi64(a[k], a[k + 2]);
      b[k + 2] = _mm512_unpacklo_epi64(a[k + 1], a[k + 3]);
      b[k + 3] = _mm512_unpackhi_epi64(a[k + 1], a[k + 3]);
    }
    for (int m = 0; m < 4; ++m) {
      // lanes 0 and 2 (c), 1 and 3 (d) of rows 0-7 and of rows 8-15
      const __m512i c0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0x88), d0 = _mm512_shuffle_i32x4(b[m], b[4 + m], 0xdd);
      const __m512i c1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0x88),
                    d1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], 0xdd);
      r[m] = _mm512_shuffle_i32x4(c0, c1, 0x88);
      r[8 + m] = _mm512_shuffle_i32x4(c0, c1, 0xdd);
      r[4 + m] = _mm512_shuffle_i32x4(d0, d1, 0x88);
      r[12 + m] = _mm512_shuffle_i32x4(d0, d1, 0xdd);
    }
  }
  // out[(x0 + x) * stride + y0 + y] = word x of row(x0, y0, y), for the 16 x 16 squares at
  // x0 < xs, y0 < ys (multiples of 16): 16 vectors made, transposed in registers, stored
  template <class Row>
  static void transposed_squares(index_t xs, index_t ys, Row row, std::uint32_t* out, index_t stride) {
    for (index_t x0 = 0; x0 < xs; x0 += 16)
      for (index_t y0 = 0; y0 < ys; y0 += 16) {
        __m512i r[16];  // [y][x], then [x][y]
        for (index_t y = 0; y < 16; ++y) r[y] = row(x0, y0, y);
        transpose_16x16(r);
        for (index_t x = 0; x < 16; ++x) _mm512_storeu_si512(out + (x0 + x) * stride + y0, r[x]);
      }
  }
  // ScalarPacking's, 16 x 16 pairs at a time: each p's 16 pairs made as pack_two_rows
  // makes them, then transposed in registers
  static void pack_columns(const float* a, index_t lda, index_t rows, index_t n,
                           std::uint32_t* blk, index_t stride) {
    const index_t rows16 = rows / 16 * 16, n16 = n / 16 * 16;
    transposed_squares(rows16, n16, [&](index_t i0, index_t p0, index_t q) {
      const float* a0 = a + 2 * (p0 + q) * lda + i0;
      return pairs_of(a0, a0 + lda);
    }, blk, stride);
    // the rest: rows past the last 16, and pairs past the last 16 of the others
    ScalarPacking::pack_columns(a + rows16, lda, rows - rows16, n, blk + rows16 * stride, stride);
    ScalarPacking::pack_columns(a + 2 * n16 * lda, lda, rows16, n - n16, blk + n16, stride);
  }
  // ScalarPacking's, 16 x 16 pairs at a time: each row's 16 pairs made as pack_row makes
  // them, then transposed in registers
  static void pack_rows_across(const float* b, index_t ldb, index_t rows, index_t n,
                               std::uint32_t* out, index_t stride) {
    const index_t rows16 = rows / 16 * 16, n16 = n / 16 * 16;
    transposed_squares(n16, rows16, [&](index_t p0, index_t j0, index_t j) {
      const float* bj = b + (j0 + j) * ldb + 2 * p0;
      return round_32(_mm512_loadu_ps(bj), _mm512_loadu_ps(bj + 16));
    }, out, stride);
    ScalarPacking::pack_rows_across(b + rows16 * ldb, ldb, rows - rows16, n, out + rows16, stride);
    ScalarPacking::pack_rows_across(b + 2 * n16, ldb, rows16, n - n16, out + n16 * stride, stride);
  }
};
#include "small_gemm_bf16_impl.h"
}  // namespace bf16_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace bf16_emulated {
struct Ops : ScalarPacking {
  using F = __m256;
  using I = __m256i;
  static constexpr index_t L = 8;
  // 2 x 4 accumulators + 2 panel vectors + the 4 halves the emulation unpacks <= 16 ymm
  static constexpr int kRows = 4;
  static constexpr bool kTiles = false;
  static constexpr index_t kPairAlign = 1;
  struct Session {};
  static F zero() { return _mm256_setzero_ps(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static __m256i mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store_n(float* p, F v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static I load_pairs(const std::uint32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static I bcast(std::uint32_t x) { return _mm256_set1_epi32(int(x)); }
  // a bfloat16 is the top half of a float32: the low element shifted up, the high one masked
  static F even(I x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
  static F odd(I x) {
    return _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xffff0000u))));
  }
  // VDPBF16PS as the SDM writes it: element 2j + 1's product, then element 2j's
  static F dot(F acc, I a, I b) {
    return _mm256_fmadd_ps(even(a), even(b), _mm256_fmadd_ps(odd(a), odd(b), acc));
  }
};
#include "small_gemm_bf16_impl.h"
}  // namespace bf16_emulated
#pragma GCC pop_options

// AMX: a 32 x 32 block of C in four 16 x 16 float32 tiles (tmm0-3), two A tiles of 16 rows
// x 16 pairs (tmm4-5), two B tiles of 16 pairs x 16 columns (tmm6-7). The Intel ISA
// reference's pseudo-code adds, per element of C, the products of 16 pairs in order, element
// 2k then 2k + 1 of each; the hardware does not (measured on a Xeon, family 6 model 167:
// 2^24 - 2^24 + 1 within one instruction gives 0, 2^20 - 2^20 + 1 gives 1, so the products
// are not added one at a time; on random operands its sums err less than sequential ones).
// So this kernel's bits are not amx_emulated's; both meet the same float64 bound. Unlike
// the register kernels, the tiles start from C (when accumulating) rather than from zero:
// a block's sum is not added into C afterwards, which saves a pass over C per k block, and a
// product split into calls at k blocks still gives the same bits.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")
namespace bf16_amx {
struct Ops : bf16_avx512::Ops {
  static constexpr int kRows = 32;
  static constexpr bool kTiles = true;
  static constexpr index_t kPairAlign = 16;
  // palette 1, tiles 0-7 of 16 rows x 64 bytes: loaded per product, released after it
  struct Session {
    Session() {
      alignas(64) std::uint8_t cfg[64] = {};
      cfg[0] = 1;  // palette
      for (int t = 0; t < 8; ++t) {
        cfg[16 + 2 * t] = 64;  // colsb (uint16, little-endian)
        cfg[48 + t] = 16;      // rows
      }
      _tile_loadconfig(cfg);
    }
    ~Session() { _tile_release(); }
  };
  static void tile_block(int rows, index_t kp, const std::uint32_t* blk, index_t bs,
                         const std::uint32_t* panel, index_t nr, float* c, index_t ldc,
                         index_t nc, bool accumulate) {
    const long sa = long(bs * 4), sb = long(nr * 4);
    // a whole block is read and written in place, an edge block through `out`
    alignas(64) float out[32 * 32];
    const bool whole = rows == 32 && nc == 32;
    float* acc = whole ? c : out;
    const long sc = whole ? long(ldc * 4) : 128;
    if (!whole) load_block(out, rows, c, ldc, nc, accumulate);
    if (accumulate || !whole) {
      _tile_loadd(0, acc, sc);
      _tile_loadd(1, acc + 16, sc);
      _tile_loadd(2, acc + 16 * (sc / 4), sc);
      _tile_loadd(3, acc + 16 * (sc / 4) + 16, sc);
    } else {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    }
    for (index_t p = 0; p < kp; p += 16) {
      _tile_loadd(4, blk + p, sa);
      _tile_loadd(5, blk + 16 * bs + p, sa);
      _tile_loadd(6, panel + p * nr, sb);
      _tile_loadd(7, panel + p * nr + 16, sb);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, acc, sc);
    _tile_stored(1, acc + 16, sc);
    _tile_stored(2, acc + 16 * (sc / 4), sc);
    _tile_stored(3, acc + 16 * (sc / 4) + 16, sc);
    if (!whole) store_block(out, rows, c, ldc, nc);
  }
};
#include "small_gemm_bf16_impl.h"
}  // namespace bf16_amx
#pragma GCC pop_options

// The AMX kernel's code (its packing, padding, blocks and edges) with the tiles emulated on
// AVX2: each element of the 32 x 32 block sums the pairs in the order of TDPBF16PS's
// pseudo-code (not the hardware's, above).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace bf16_amx_emulated {
struct Ops : bf16_emulated::Ops {
  static constexpr index_t L = 16;  // the AMX layout: panels of 32 columns
  static constexpr int kRows = 32;
  static constexpr bool kTiles = true;
  static constexpr index_t kPairAlign = 16;
  struct Session {};
  static void tile_block(int rows, index_t kp, const std::uint32_t* blk, index_t bs,
                         const std::uint32_t* panel, index_t nr, float* c, index_t ldc,
                         index_t nc, bool accumulate) {
    alignas(64) float out[32 * 32];
    load_block(out, rows, c, ldc, nc, accumulate);  // the tiles start from C, as amx's
    for (int m = 0; m < 32; ++m)
      for (int q = 0; q < 4; ++q) {  // 8 of the 32 columns at a time
        __m256 acc = load(out + m * 32 + 8 * q);
        for (index_t p = 0; p < kp; ++p) {
          const I a = bcast(blk[m * bs + p]), b = load_pairs(panel + p * nr + 8 * q);
          acc = _mm256_fmadd_ps(odd(a), odd(b), _mm256_fmadd_ps(even(a), even(b), acc));
        }
        store(out + m * 32 + 8 * q, acc);
      }
    store_block(out, rows, c, ldc, nc);
  }
};
#include "small_gemm_bf16_impl.h"
}  // namespace bf16_amx_emulated
#pragma GCC pop_options

namespace {

// One kernel's entry points (each namespace above defines the same four).
struct Entry {
  void (*gemm)(bool, bool, index_t, index_t, index_t, const float*, index_t, const float*,
               index_t, bool, float*, index_t);
  index_t (*packed_size)(index_t, index_t);
  void (*pack_b)(bool, index_t, index_t, const float*, index_t, std::uint32_t*);
  void (*gemm_packed)(bool, index_t, index_t, index_t, const float*, index_t,
                      const std::uint32_t*, bool, float*, index_t);
};

#define MOE_BF16_ENTRY(ns) \
  Entry { &ns::gemm, &ns::packed_size, &ns::pack_b, &ns::gemm_packed }

// k's entry points; throws unless k is a kernel this CPU runs
const Entry& entry(Bf16Kernel k) {
  static const Entry avx512 = MOE_BF16_ENTRY(bf16_avx512), emulated = MOE_BF16_ENTRY(bf16_emulated),
                     amx = MOE_BF16_ENTRY(bf16_amx), amx_emulated = MOE_BF16_ENTRY(bf16_amx_emulated);
  if (k == Bf16Kernel::fallback)
    throw std::invalid_argument("bf16 kernel: the fallback has no GEMM of its own (small_gemm)");
  if (!bf16_kernel_available(k))
    throw std::invalid_argument(std::string("bf16 kernel: ") + bf16_kernel_name(k) +
                                " does not run on this CPU");
  switch (k) {
    case Bf16Kernel::avx512_bf16: return avx512;
    case Bf16Kernel::amx: return amx;
    case Bf16Kernel::amx_emulated: return amx_emulated;
    default: return emulated;
  }
}
#undef MOE_BF16_ENTRY

// -1: not decided yet; else the Bf16Kernel in use
std::atomic<int> g_kernel{-1};

// |C - C64| <= (K + 2) u32 sum |a||b| + tiny, C64 the float64 product of the rounded values
bool agrees(Bf16Kernel k, bool ta, bool tb, index_t M, index_t N, index_t K, bool packed) {
  std::vector<float> A(M * K), B(K * N), C(M * N, 0.5f);
  std::uint32_t state = 12345u;  // a fixed LCG: the check is the same on every run
  const auto next = [&] {
    state = state * 1664525u + 1013904223u;
    return float(int(state >> 8) - (1 << 23)) / float(1 << 22);
  };
  for (float& v : A) v = next();
  for (float& v : B) v = next();
  const index_t lda = ta ? M : K, ldb = tb ? K : N;
  if (packed) {
    std::vector<std::uint32_t> pb(packed_b_bf16_size(k, K, N));
    pack_b_bf16(k, tb, K, N, B.data(), ldb, pb.data());
    small_gemm_packed_bf16(k, ta, M, N, K, A.data(), lda, pb.data(), true, C.data(), N);
  } else {
    small_gemm_bf16(k, ta, tb, M, N, K, A.data(), lda, B.data(), ldb, true, C.data(), N);
  }
  for (index_t i = 0; i < M; ++i)
    for (index_t j = 0; j < N; ++j) {
      double sum = 0.5, mag = 0.5;
      for (index_t q = 0; q < K; ++q) {
        const double a = round_to_bf16(ta ? A[q * M + i] : A[i * K + q]);
        const double b = round_to_bf16(tb ? B[j * K + q] : B[q * N + j]);
        sum += a * b;
        mag += std::fabs(a * b);
      }
      if (!(std::fabs(C[i * N + j] - sum) <= double(K + 2) * 0x1p-24 * mag + 1e-30)) return false;
    }
  return true;
}

}  // namespace

bool bf16_kernel_available(Bf16Kernel k) {
  switch (k) {
    case Bf16Kernel::avx512_bf16: return cpu_has_avx512_bf16();
    case Bf16Kernel::amx: return cpu_has_amx_bf16();
    case Bf16Kernel::emulated:
    case Bf16Kernel::amx_emulated: return cpu_has_avx2_fma();
    default: return true;
  }
}

bool bf16_self_check(Bf16Kernel k) {
  if (k == Bf16Kernel::fallback) return true;
  if (!bf16_kernel_available(k)) return false;
  struct Case {
    bool ta, tb;
    index_t M, N, K;
    bool packed;
  };
  // odd K, a K over one block, column edges (1, < 16, < 32, > 512), row tails (of 4, 12
  // and 32 rows), several tiles of k, both layouts
  const Case cases[] = {{false, false, 13, 37, 5, false}, {true, false, 7, 70, 259, false},
                        {false, true, 29, 16, 1, false},  {true, true, 3, 530, 18, false},
                        {false, true, 45, 45, 513, true}, {true, false, 12, 1, 7, true},
                        {false, false, 64, 64, 96, false}};
  for (const Case& c : cases)
    if (!agrees(k, c.ta, c.tb, c.M, c.N, c.K, c.packed)) return false;
  return true;
}

bool bf16_kernel_pays(Bf16Kernel k) {
  return k == Bf16Kernel::amx || (k == Bf16Kernel::avx512_bf16 && cpu_is_amd());
}

Bf16Kernel bf16_kernel() {
  int k = g_kernel.load();
  if (k < 0) {  // decided once; concurrent first calls decide the same
    k = int(Bf16Kernel::fallback);
    for (Bf16Kernel fast : {Bf16Kernel::amx, Bf16Kernel::avx512_bf16})  // fastest first
      if (bf16_kernel_available(fast) && bf16_kernel_pays(fast) && bf16_self_check(fast)) {
        k = int(fast);
        break;
      }
    int expected = -1;
    g_kernel.compare_exchange_strong(expected, k);
    k = g_kernel.load();
  }
  return Bf16Kernel(k);
}

void set_bf16_kernel(Bf16Kernel k) {
  if (k != Bf16Kernel::fallback) entry(k);  // throws unless k runs here
  g_kernel.store(int(k));
}

void small_gemm_bf16(Bf16Kernel k, bool trans_a, bool trans_b, index_t M, index_t N,
                     index_t K, const float* A, index_t lda, const float* B, index_t ldb,
                     bool accumulate, float* C, index_t ldc) {
  entry(k).gemm(trans_a, trans_b, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

index_t packed_b_bf16_size(Bf16Kernel k, index_t K, index_t N) {
  return entry(k).packed_size(K, N);
}

void pack_b_bf16(Bf16Kernel k, bool trans_b, index_t K, index_t N, const float* B, index_t ldb,
                 std::uint32_t* packed) {
  entry(k).pack_b(trans_b, K, N, B, ldb, packed);
}

void small_gemm_packed_bf16(Bf16Kernel k, bool trans_a, index_t M, index_t N, index_t K,
                            const float* A, index_t lda, const std::uint32_t* packed,
                            bool accumulate, float* C, index_t ldc) {
  entry(k).gemm_packed(trans_a, M, N, K, A, lda, packed, accumulate, C, ldc);
}

#else  // not x86-64: only the fallback

bool bf16_kernel_available(Bf16Kernel k) { return k == Bf16Kernel::fallback; }
bool bf16_self_check(Bf16Kernel k) { return k == Bf16Kernel::fallback; }
bool bf16_kernel_pays(Bf16Kernel) { return false; }
Bf16Kernel bf16_kernel() { return Bf16Kernel::fallback; }
void set_bf16_kernel(Bf16Kernel k) {
  if (k != Bf16Kernel::fallback) throw std::invalid_argument("bf16 kernel: only the fallback on this CPU");
}
[[noreturn]] static void no_kernel() { throw std::invalid_argument("bf16 kernel: none on this CPU"); }
void small_gemm_bf16(Bf16Kernel, bool, bool, index_t, index_t, index_t, const float*, index_t,
                     const float*, index_t, bool, float*, index_t) { no_kernel(); }
index_t packed_b_bf16_size(Bf16Kernel, index_t, index_t) { no_kernel(); }
void pack_b_bf16(Bf16Kernel, bool, index_t, index_t, const float*, index_t, std::uint32_t*) { no_kernel(); }
void small_gemm_packed_bf16(Bf16Kernel, bool, index_t, index_t, index_t, const float*, index_t,
                            const std::uint32_t*, bool, float*, index_t) { no_kernel(); }

#endif

}  // namespace moe
