// bfloat16 GEMMs with float32 sums for the expert tiles (compute_dtype="bfloat16"):
// C [M,N] (+)= op(A) op(B), row-major, A and B given as float32 and rounded to bfloat16
// (nearest, ties to even: bf16.h) as they are packed into pairs along k.
//
// Kernels:
//   avx512_bf16  VDPBF16PS on zmm: per 32-bit lane, acc += a[2j] b[2j] + a[2j+1] b[2j+1]
//                (each product of two bfloat16 values is exact in float32; the instruction
//                treats bfloat16 subnormals as zero and flushes subnormal results).
//   emulated     the same code with that instruction emulated by two float32 FMAs on ymm
//                (element 2j + 1 first, then 2j, as the Intel SDM writes VDPBF16PS): it
//                runs on any AVX2 CPU, so that the packing, blocking and edges of the
//                bfloat16 kernel are tested on machines without AVX512-BF16.
//   amx          TDPBF16PS on AMX tiles (Sapphire/Emerald Rapids, where the OS lets the
//                process use them): 32 x 32 blocks of C, k in tiles of 16 pairs.
//   amx_emulated the amx kernel's code with the tiles emulated on AVX2, for the same reason
//                (sums in the order of the ISA pseudo-code; the hardware's differ: .cpp).
//   fallback     no kernel here: the callers round the operands and run small_gemm's float32
//                FMAs (the same products, summed in k order).
// Both kernels are compiled into every x86-64 build (function-level target options) and
// picked at run time from CPUID and the OS's saved register state, so a wheel built on
// one CPU runs right on another.
//
// Sums, as small_gemm's: over k in blocks of kSmallGemmKBlock (even), each block's sum
// added into C in order; inside a block, over k pairs (2p, 2p + 1) in order. The tile
// kernels (amx, amx_emulated) continue C's sum in the tiles instead of adding a block's sum
// to it, so a product split into calls at k blocks gives the same bits there too. The bits
// depend on the shapes and the kernel only, never on threads or alignment, and a packed B
// gives the same bits as an unpacked one.
#pragma once
#include <cstdint>

#include "tensor.h"

namespace moe {

enum class Bf16Kernel { fallback = 0, avx512_bf16 = 1, emulated = 2, amx = 3, amx_emulated = 4 };

const char* bf16_kernel_name(Bf16Kernel k);

// Whether this CPU and OS can run k (fallback: always).
bool bf16_kernel_available(Bf16Kernel k);

// Whether k, where available, is faster than the fallback on this CPU, and so may be the
// default: amx always; avx512_bf16 on AMD only (Zen 4 runs VDPBF16PS at twice the float32
// FMA rate, an Intel Xeon, family 6 model 167, at about 0.6x: benchmarks/README.md).
bool bf16_kernel_pays(Bf16Kernel k);

// The kernel the experts use with bf16 compute. By default the first of amx and avx512_bf16
// that is available and passes its self-check (bf16_self_check), else fallback;
// set_bf16_kernel changes it for the process (it throws if k is not available here).
Bf16Kernel bf16_kernel();
void set_bf16_kernel(Bf16Kernel k);

// Whether kernel k agrees with a float64 product of the rounded operands on a few shapes
// (odd k, edges, both transpositions, several k blocks) within float32 accumulation
// error; run once before avx512_bf16 becomes the default.
bool bf16_self_check(Bf16Kernel k);

// op(A) is [M,K]: A [M,K] (lda >= K) or, when trans_a, A [K,M] (lda >= M); likewise op(B).
// k: avx512_bf16 or emulated, and available.
void small_gemm_bf16(Bf16Kernel k, bool trans_a, bool trans_b, index_t M, index_t N,
                     index_t K, const float* A, index_t lda, const float* B, index_t ldb,
                     bool accumulate, float* C, index_t ldc);

// op(B) packed once for many products (an expert's weights): packed_b_bf16_size words.
index_t packed_b_bf16_size(Bf16Kernel k, index_t K, index_t N);
void pack_b_bf16(Bf16Kernel k, bool trans_b, index_t K, index_t N, const float* B, index_t ldb,
                 std::uint32_t* packed);
void small_gemm_packed_bf16(Bf16Kernel k, bool trans_a, index_t M, index_t N, index_t K,
                            const float* A, index_t lda, const std::uint32_t* packed,
                            bool accumulate, float* C, index_t ldc);

}  // namespace moe
