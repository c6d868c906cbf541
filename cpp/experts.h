// Expert FFNs over rows grouped by expert (see dispatch.h), forward and backward.
//   swiglu: FFN(x) = (silu(x W1) * (x W3)) W2      gelu: FFN(x) = gelu_erf(x W1) W2
//   clamped_swiglu (gpt-oss): g = min(x W1, limit), u = clamp(x W3, -limit, limit),
//                             FFN(x) = ((u + 1) * g * sigmoid(alpha g)) W2
// Each expert is a run of dense GEMMs on its contiguous rows; work is split into
// fixed (expert, row tile) items run by OpenMP, so uneven expert loads still
// keep every core busy and the bits never depend on the thread count.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "pool.h"
#include "small_gemm_bf16.h"
#include "tensor.h"

namespace moe {

enum class Activation { swiglu = 0, gelu = 1, clamped_swiglu = 2 };

// Whether the activation gates a second projection (x W3): then w3 and h3 exist.
constexpr bool gated(Activation a) { return a != Activation::gelu; }

struct ExpertShape {
  index_t E, d_model, d_ff;
  Activation act;
  double alpha = 0, limit = 0;  // clamped_swiglu only: MoEConfig's swiglu_alpha, swiglu_limit
  // bfloat16 compute (float32 only; bf16.h): every GEMM reads bfloat16-rounded operands and
  // sums in float32. The kernels round xs, the activation a, dye and dh1/dh3 as they use
  // them; the weights must come rounded already (the caller's copy, made once per update).
  // h1, h3, the activations' arithmetic, ye, dxs and the gradients stay float32.
  bool bf16 = false;
  // Which bfloat16 GEMM runs them (small_gemm_bf16.h): set by experts_forward/backward from
  // bf16_kernel() at each call; fallback means small_gemm on the rounded operands.
  Bf16Kernel bf16_kernel = Bf16Kernel::fallback;
  // How each expert's weight matrices (and their gradients) are laid out: false, the column
  // layout x W (w1, w3 [d_model, d_ff], w2 [d_ff, d_model]); true, nn.Linear's x W^T, as
  // transformers stores experts (w1, w3 [d_ff, d_model], w2 [d_model, d_ff]). Every sum is
  // the same in both (the same products in the same k order): the same bits, transposed.
  bool linear = false;
};

// One matrix per expert, expert e's at p + e * stride: back to back (stride = the matrix's
// size) or apart, as gate and up lie inside transformers' gate_up_proj [E, 2 d_ff, d_model].
template <typename P>
struct Stack {
  P* p = nullptr;
  index_t stride = 0;
  P* operator[](index_t e) const { return p + e * stride; }
};

// The experts' weights (w3 empty when the activation is not gated) and their gradients,
// each in ExpertShape::linear's layout.
template <typename T>
struct ExpertWeights {
  Stack<const T> w1, w3, w2;
};
template <typename T>
struct ExpertWeightGrads {
  Stack<T> dw1, dw3, dw2;
};

// The experts' biases b1, b3 [E, d_ff] and b2 [E, d_model], each added after its GEMM;
// all null for experts without biases (b3 also null when the activation is not gated).
template <typename T>
struct ExpertBiases {
  const T *b1 = nullptr, *b3 = nullptr, *b2 = nullptr;
};

// Their gradients, accumulated (+=) as the weights' are; null where there is no bias.
template <typename T>
struct ExpertBiasGrads {
  T *db1 = nullptr, *db3 = nullptr, *db2 = nullptr;
};

// The experts' weights packed for a bfloat16 kernel as the products of a forward (x W1,
// x W3, a W2) or of a backward (dh W1^T, dh W3^T, dy W2^T) read them. The caller makes them
// once per parameter update (moe_py/bf16.py) and passes them to any number of calls, which
// then pack no weights and run on their kernel.
struct PackedExpertWeights {
  Bf16Kernel kernel = Bf16Kernel::fallback;
  bool backward = false, linear = false, gated = false;
  index_t E = 0, d_model = 0, d_ff = 0;
  index_t offset3 = 0, offset2 = 0, stride1 = 0, stride3 = 0, stride2 = 0;  // in words
  // w1's E packs, w3's, w2's, in a block of the pool (pool.h): packs are made anew at every
  // update, and the last update's block comes back instead of fresh pages
  struct PoolFree {
    std::size_t bytes;
    void operator()(std::uint32_t* p) const { pool_free(p, bytes); }
  };
  std::unique_ptr<std::uint32_t, PoolFree> words{nullptr, PoolFree{0}};
  const std::uint32_t* w1() const { return words.get(); }
  const std::uint32_t* w3() const { return words.get() + offset3; }
  const std::uint32_t* w2() const { return words.get() + offset2; }
};

// Packs every expert of w (shape s: s.bf16_kernel, the kernel to pack for, a bfloat16 one).
PackedExpertWeights pack_expert_weights(const ExpertShape& s, const ExpertWeights<float>& w,
                                        bool backward);

// xs [N, d_model] rows grouped by expert (offsets [E+1]); w1, w3 [E, d_model, d_ff]
// (w3 unused for gelu); w2 [E, d_ff, d_model] (linear: each expert's matrices transposed).
// Saves for backward: h1 = xs W1 + b1 and (gated) h3 = xs W3 + b3, both [N, d_ff].
// Writes ye [N, d_model] = act(h1, h3) W2 + b2. packed: the forward's packs of w (bf16
// only, the binding checks them against s), whose kernel then runs the call; else the
// call packs what it needs.
template <typename T>
void experts_forward(const ExpertShape& s, const index_t* offsets, const T* xs,
                     const ExpertWeights<T>& w, const ExpertBiases<T>& bias, T* h1, T* h3, T* ye,
                     const PackedExpertWeights* packed = nullptr);

// How the backward walks the work: by expert (each expert's row tiles from dye to its
// weight-gradient shares while in cache) or in two phases (dxs for every row tile, then the
// weight gradients tiled over the weights' rows). Both give the same bits; automatic picks
// by expert unless one expert holds over a quarter of the rows. The choice is exposed so
// that the tests can hold the two to that.
enum class BackwardPath { automatic = 0, by_expert = 1, two_phase = 2 };

// Reads xs, h1, h3 (saved) and dye [N, d_model]; writes dxs [N, d_model] and
// accumulates (+=) into dw1, dw3, dw2 and the bias gradients (with bf16: db1 and db3 sum
// the rounded dh1, dh3 the GEMMs read, db2 dye as given). A bias gradient adds the
// expert's rows one by one in row order on one thread, on either path: the same bits at
// any thread count. An expert with no rows is not touched. packed: the backward's packs
// of w, as experts_forward's. accumulate false: the gradients are written instead (the
// buffers' contents never read; an expert with no rows gets zeros), the same bits as
// adding into zeros.
template <typename T>
void experts_backward(const ExpertShape& s, const index_t* offsets, const T* xs,
                      const ExpertWeights<T>& w, const T* h1, const T* h3, const T* dye, T* dxs,
                      const ExpertWeightGrads<T>& dw, const ExpertBiasGrads<T>& dbias,
                      BackwardPath path = BackwardPath::automatic,
                      const PackedExpertWeights* packed = nullptr, bool accumulate = true);

}  // namespace moe
