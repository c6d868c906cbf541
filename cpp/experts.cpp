#include "experts.h"

#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "bf16.h"
#include "blas.h"
#include "pool.h"
#include "small_gemm.h"

namespace moe {

namespace {

// Rows per work item. Large enough that re-packing an expert's weights for
// each tile is cheap next to the tile's GEMM; fixed, never from the thread count.
constexpr index_t kRowTile = 256;
static_assert(kRowTile == kSmallGemmKBlock,
              "a tile's weight-gradient share must be one k block of small_gemm");

struct Item {
  index_t expert, r0, rows;
};

// out[r] += v for each of `rows` rows of `width`: a bias added after its GEMM.
template <typename T>
void add_to_rows(T* out, index_t rows, index_t width, const T* v) {
  const ConstArrMap<T> b(v, width);
  for (index_t r = 0; r < rows; ++r) ArrMap<T>(out + r * width, width) += b;
}

// sum += each of `rows` rows of src, in row order: a bias's gradient.
template <typename T>
void add_rows_to(T* sum, index_t rows, index_t width, const T* src) {
  ArrMap<T> acc(sum, width);
  for (index_t r = 0; r < rows; ++r) acc += ConstArrMap<T>(src + r * width, width);
}

// Whether the GEMMs need their operands rounded beforehand: bf16 compute on the fallback
// (a bfloat16 kernel rounds what it packs).
inline bool rounds_operands(const ExpertShape& s) {
  return s.bf16 && s.bf16_kernel == Bf16Kernel::fallback;
}

// When rounds_operands: n values of src rounded to bfloat16 into dst (dst == src: in
// place), returning dst; otherwise src as it is.
template <typename T>
const T* gemm_operand(const ExpertShape& s, const T* src, T* dst, index_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (rounds_operands(s)) {
      round_to_bf16(src, dst, n);
      return dst;
    }
  }
  return src;
}

// With bf16 compute (any kernel), dh rounded in place: the GEMMs read it rounded, and the
// bias gradients sum what they read.
template <typename T>
void round_gradient(const ExpertShape& s, T* dh, index_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (s.bf16) round_to_bf16(dh, dh, n);
  }
}

// The shape with the bfloat16 kernel of this call (fallback unless bf16 compute; that of
// the packs when given), checked.
template <typename T>
ExpertShape with_bf16_kernel(const ExpertShape& shape, const PackedExpertWeights* packed) {
  if ((shape.bf16 || packed) && !std::is_same_v<T, float>)
    throw std::invalid_argument("bf16: bfloat16 compute needs float32 inputs and weights");
  ExpertShape s = shape;
  s.bf16_kernel = packed ? packed->kernel : s.bf16 ? bf16_kernel() : Bf16Kernel::fallback;
  return s;
}

// C (+)= op(A) op(B) for one expert: the bfloat16 kernel when the call has one, else
// small_gemm (on operands the caller rounded, under bf16 compute).
template <typename T>
void expert_gemm(const ExpertShape& s, bool trans_a, bool trans_b, index_t M, index_t N,
                 index_t K, const T* A, index_t lda, const T* B, index_t ldb, bool accumulate,
                 T* C, index_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (s.bf16_kernel != Bf16Kernel::fallback)
      return small_gemm_bf16(s.bf16_kernel, trans_a, trans_b, M, N, K, A, lda, B, ldb,
                             accumulate, C, ldc);
  }
  small_gemm(trans_a, trans_b, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

// op(B) [K, N] of one of the experts' GEMMs: W_e^T of W_e [N, K] when trans, else W_e.
struct PackShape {
  index_t K, N;
  bool trans;
};

// That of w1 and w3 (up) or w2 in a forward or a backward: the forward multiplies by the
// weights (x W1 [D, F], a W2 [F, D] in the column layout; a transpose in the linear one),
// the backward by their transposes.
inline PackShape pack_shape(const ExpertShape& s, bool up, bool backward) {
  const index_t rows = up ? s.d_model : s.d_ff, cols = up ? s.d_ff : s.d_model;
  return backward ? PackShape{cols, rows, !s.linear} : PackShape{rows, cols, s.linear};
}

// op(B) of one of the experts' GEMMs packed for the call's products, expert e's at
// e * stride: packed by the call (for the experts with rows: a transposed pack costs as much
// as a small tile's product), or given already packed (pack_expert_weights).
template <typename T>
class PackedWeights {
 public:
  PackedWeights(const ExpertShape& s, PackShape p, bool needed)
      : kernel_(s.bf16_kernel), p_(p),
        stride_(bf16() ? packed_b_bf16_size(kernel_, p.K, p.N) : packed_b_size<T>(p.K, p.N)),
        f_(needed && !bf16() ? s.E * stride_ : 0), b_(needed && bf16() ? s.E * stride_ : 0),
        fp_(f_.get()), bp_(b_.get()) {}
  PackedWeights(const ExpertShape& s, PackShape p, const std::uint32_t* packed, index_t stride)
      : kernel_(s.bf16_kernel), p_(p), stride_(stride), f_(0), b_(0), fp_(nullptr), bp_(packed) {}

  void pack(index_t e, const T* w) {
    const index_t ldb = p_.trans ? p_.K : p_.N;
    if constexpr (std::is_same_v<T, float>) {
      if (bf16())
        return pack_b_bf16(kernel_, p_.trans, p_.K, p_.N, w, ldb, b_.get() + e * stride_);
    }
    pack_b(p_.trans, p_.K, p_.N, w, ldb, fp_ + e * stride_);
  }
  // C [M, N] (+)= A [M, K] op(B)_e
  void gemm(index_t e, index_t M, const T* A, bool accumulate, T* C) const {
    if constexpr (std::is_same_v<T, float>) {
      if (bf16())
        return small_gemm_packed_bf16(kernel_, false, M, p_.N, p_.K, A, p_.K, bp_ + e * stride_,
                                      accumulate, C, p_.N);
    }
    small_gemm_packed(false, M, p_.N, p_.K, A, p_.K, fp_ + e * stride_, accumulate, C, p_.N);
  }

 private:
  bool bf16() const { return std::is_same_v<T, float> && kernel_ != Bf16Kernel::fallback; }
  Bf16Kernel kernel_;
  PackShape p_;
  index_t stride_;
  Scratch<T> f_;
  Scratch<std::uint32_t> b_;
  T* fp_;
  const std::uint32_t* bp_;
};

// op(B) of the experts' GEMMs (pack_shape), the forward's or the backward's: packed once per
// call and in parallel for the experts with rows, or the caller's packs.
template <typename T>
struct PackedExperts {
  PackedWeights<T> w1, w3, w2;

  PackedExperts(const ExpertShape& s, const index_t* offsets, const ExpertWeights<T>& w,
                bool backward)
      : w1(s, pack_shape(s, true, backward), true),
        w3(s, pack_shape(s, true, backward), gated(s.act)),
        w2(s, pack_shape(s, false, backward), true) {
    const index_t n = gated(s.act) ? 3 : 2;
#pragma omp parallel for schedule(dynamic, 1)
    for (index_t i = 0; i < s.E * n; ++i) {
      const index_t e = i / n, which = i % n;
      if (offsets[e + 1] == offsets[e]) continue;
      if (which == 0) w2.pack(e, w.w2[e]);
      if (which == 1) w1.pack(e, w.w1[e]);
      if (which == 2) w3.pack(e, w.w3[e]);
    }
  }
  PackedExperts(const ExpertShape& s, const PackedExpertWeights& p)
      : w1(s, pack_shape(s, true, p.backward), p.w1(), p.stride1),
        w3(s, pack_shape(s, true, p.backward), p.w3(), p.stride3),
        w2(s, pack_shape(s, false, p.backward), p.w2(), p.stride2) {}
};

// One expert's weight gradient over its `rows` rows, rows [r0, r0 + n) of it: in the column
// layout dW [P, Q] (+)= L^T R (L [rows, P], R [rows, Q]); in the linear one dW^T [Q, P] (+)=
// R^T L. Each element is the same products summed in the same order either way.
template <typename T>
void weight_gradient(const ExpertShape& s, index_t rows, const T* L, index_t P, const T* R,
                     index_t Q, T* dw, index_t r0, index_t n, bool accumulate) {
  if (s.linear) {
    std::swap(L, R);
    std::swap(P, Q);
  }
  expert_gemm(s, true, false, n, Q, rows, L + r0, P, R, Q, accumulate, dw + r0 * Q, Q);
}

// sum (+)= each of `rows` rows of src: a bias's gradient, added to (accumulate) or written.
template <typename T>
void bias_gradient(T* sum, index_t rows, index_t width, const T* src, bool accumulate) {
  if (!accumulate) std::fill(sum, sum + width, T(0));
  add_rows_to(sum, rows, width, src);
}

// With written (not added) gradients: those of the experts without rows, zero.
template <typename T>
void zero_unrouted_gradients(const ExpertShape& s, const index_t* offsets,
                             const ExpertWeightGrads<T>& dw, const ExpertBiasGrads<T>& db) {
  const index_t D = s.d_model, F = s.d_ff;
  for (index_t e = 0; e < s.E; ++e) {
    if (offsets[e + 1] > offsets[e]) continue;
    std::fill(dw.dw1[e], dw.dw1[e] + D * F, T(0));
    if (gated(s.act)) std::fill(dw.dw3[e], dw.dw3[e] + D * F, T(0));
    std::fill(dw.dw2[e], dw.dw2[e] + D * F, T(0));
    if (db.db1) std::fill(db.db1 + e * F, db.db1 + (e + 1) * F, T(0));
    if (db.db3) std::fill(db.db3 + e * F, db.db3 + (e + 1) * F, T(0));
    if (db.db2) std::fill(db.db2 + e * D, db.db2 + (e + 1) * D, T(0));
  }
}

// Rows of the gradient of a column-layout [P, Q] matrix, in the shape's layout.
inline index_t gradient_rows(const ExpertShape& s, index_t P, index_t Q) { return s.linear ? Q : P; }

// a = act(h1, h3) on n values (h3 read by the gated activations only).
template <typename T>
void activation_forward(const ExpertShape& s, const T* h1, const T* h3, T* a, index_t n) {
  switch (s.act) {
    case Activation::swiglu: return swiglu_forward(h1, h3, a, n);
    case Activation::gelu: return gelu_forward(h1, a, n);
    case Activation::clamped_swiglu:
      return clamped_swiglu_forward(h1, h3, a, n, T(s.alpha), T(s.limit));
  }
}

// From h1, h3 and da: a (recomputed), dh1 and (gated) dh3.
template <typename T>
void activation_backward(const ExpertShape& s, const T* h1, const T* h3, const T* da, T* a,
                         T* dh1, T* dh3, index_t n) {
  switch (s.act) {
    case Activation::swiglu: return swiglu_backward(h1, h3, da, a, dh1, dh3, n);
    case Activation::gelu: return gelu_backward(h1, da, a, dh1, n);
    case Activation::clamped_swiglu:
      return clamped_swiglu_backward(h1, h3, da, a, dh1, dh3, n, T(s.alpha), T(s.limit));
  }
}

// (expert, tile) items over `extent(e)` rows per expert, tiles of `tile` rows.
template <typename Extent>
std::vector<Item> tiles(index_t E, index_t tile, Extent extent) {
  std::vector<Item> items;
  for (index_t e = 0; e < E; ++e)
    for (index_t r = 0, n = extent(e); r < n; r += tile)
      items.push_back({e, r, std::min(tile, n - r)});
  return items;
}

// One expert's backward, tile by tile: dA = dYe W2^T, the activation backward, dXs, then
// the tile's share of dW1 = Xs^T dH1, dW3 = Xs^T dH3, dW2 = A^T dYe while its rows are
// still in cache. Adding tile after tile of kRowTile = small_gemm's k block rows gives the
// very sums (and bits) of one product over all the expert's rows.
template <typename T>
void expert_backward_tiles(const ExpertShape& s, index_t e, const index_t* offsets, const T* xs,
                           const T* h1, const T* h3, const T* dye, const PackedExperts<T>& wt,
                           T* dxs, const ExpertWeightGrads<T>& dw, const ExpertBiasGrads<T>& db,
                           bool accumulate, T* da, T* a, T* dh1, T* dh3, T* x_bf16, T* dy_bf16) {
  const index_t D = s.d_model, F = s.d_ff;
  const bool glu = gated(s.act);
  const index_t n_e = offsets[e + 1] - offsets[e];
  for (index_t r0 = 0; r0 < n_e; r0 += kRowTile) {
    const index_t rows = std::min(kRowTile, n_e - r0), row = offsets[e] + r0, n = rows * F;
    const T* dy = gemm_operand(s, dye + row * D, dy_bf16, rows * D);
    const T* x = gemm_operand(s, xs + row * D, x_bf16, rows * D);
    wt.w2.gemm(e, rows, dy, false, da);
    activation_backward(s, h1 + row * F, glu ? h3 + row * F : nullptr, da, a, dh1, dh3, n);
    gemm_operand(s, a, a, n);
    round_gradient(s, dh1, n);
    if (glu) round_gradient(s, dh3, n);
    wt.w1.gemm(e, rows, dh1, false, dxs + row * D);
    if (glu) wt.w3.gemm(e, rows, dh3, true, dxs + row * D);
    // dW1 = Xs^T dH1, dW3 = Xs^T dH3, dW2 = A^T dYe (column layout)
    const bool acc = accumulate || r0 > 0;  // written gradients: the first tile writes
    weight_gradient(s, rows, x, D, dh1, F, dw.dw1[e], 0, gradient_rows(s, D, F), acc);
    if (glu) weight_gradient(s, rows, x, D, dh3, F, dw.dw3[e], 0, gradient_rows(s, D, F), acc);
    weight_gradient(s, rows, a, F, dy, D, dw.dw2[e], 0, gradient_rows(s, F, D), acc);
    if (db.db1) bias_gradient(db.db1 + e * F, rows, F, dh1, acc);
    if (db.db3) bias_gradient(db.db3 + e * F, rows, F, dh3, acc);
    if (db.db2) bias_gradient(db.db2 + e * D, rows, D, dye + row * D, acc);
  }
}

// The experts' backward with one item per expert (expert_backward_tiles), largest first.
template <typename T>
void experts_backward_by_expert(const ExpertShape& s, const index_t* offsets, const T* xs,
                                const T* h1, const T* h3, const T* dye,
                                const PackedExperts<T>& wt, T* dxs,
                                const ExpertWeightGrads<T>& dw, const ExpertBiasGrads<T>& db,
                                bool accumulate) {
  const index_t F = s.d_ff;
  const bool glu = gated(s.act);
  const auto rows = [&](index_t e) { return offsets[e + 1] - offsets[e]; };
  std::vector<index_t> order;
  for (index_t e = 0; e < s.E; ++e)
    if (rows(e) > 0) order.push_back(e);
  std::stable_sort(order.begin(), order.end(), [&](index_t x, index_t y) { return rows(x) > rows(y); });
  const index_t n = index_t(order.size());
#pragma omp parallel
  {
    Scratch<T> da(kRowTile * F), a(kRowTile * F), dh1(kRowTile * F), dh3(glu ? kRowTile * F : 0);
    const index_t D = s.d_model, rounded = rounds_operands(s) ? kRowTile * D : 0;
    Scratch<T> x_bf16(rounded), dy_bf16(rounded);
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < n; ++i) {
      const index_t e = order[i];
      expert_backward_tiles(s, e, offsets, xs, h1, h3, dye, wt, dxs, dw, db, accumulate, da.get(), a.get(),
                            dh1.get(), dh3.get(), x_bf16.get(), dy_bf16.get());
    }
  }
}

// One item per expert keeps each tile's rows in cache from dXs to the weight gradients,
// but only pays while the experts can share the threads: not when one holds most rows.
bool fused_backward_pays(index_t E, const index_t* offsets) {
  index_t largest = 0;
  for (index_t e = 0; e < E; ++e) largest = std::max(largest, offsets[e + 1] - offsets[e]);
  return 4 * largest <= offsets[E];
}

}  // namespace

template <typename T>
void experts_forward(const ExpertShape& shape, const index_t* offsets, const T* xs,
                     const ExpertWeights<T>& w, const ExpertBiases<T>& bias, T* h1, T* h3, T* ye,
                     const PackedExpertWeights* given) {
  const ExpertShape s = with_bf16_kernel<T>(shape, given);
  const index_t D = s.d_model, F = s.d_ff;
  check_blas_dims({offsets[s.E], D, F});
  const bool glu = gated(s.act);
  const auto items = tiles(s.E, kRowTile, [&](index_t e) { return offsets[e + 1] - offsets[e]; });
  const index_t n_items = index_t(items.size());
  // C [M, N] = A [M, K] W_e, W_e [K, N] or (linear) [N, K]. In float32 the GEMM packs W_e
  // per row tile into a buffer that stays in L2 (docs/design.md): packing once per call
  // measured no faster (the packed copy comes back from memory). A bfloat16 kernel reads
  // each expert's weights packed once per call, or once per update by the caller (given):
  // its product is several times faster than float32's while its pack is not, and the
  // packed copy is half the size.
  std::optional<PackedExperts<T>> packed;
  if (given)
    packed.emplace(s, *given);
  else if (s.bf16_kernel != Bf16Kernel::fallback)
    packed.emplace(s, offsets, w, false);
  // (pw: the packed weights, or null to pack per tile)
  const auto product = [&](const PackedWeights<T>* pw, const Stack<const T>& ws, index_t e,
                           index_t M, index_t N, index_t K, const T* A, T* C) {
    if (pw) return pw->gemm(e, M, A, false, C);
    expert_gemm(s, false, s.linear, M, N, K, A, K, ws[e], s.linear ? K : N, false, C, N);
  };
  const PackedWeights<T>* p1 = packed ? &packed->w1 : nullptr;
  const PackedWeights<T>* p3 = packed ? &packed->w3 : nullptr;
  const PackedWeights<T>* p2 = packed ? &packed->w2 : nullptr;

#pragma omp parallel
  {
    std::vector<T> a(kRowTile * F), x_bf16(rounds_operands(s) ? kRowTile * D : 0);
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < n_items; ++i) {
      const Item it = items[i];
      const index_t row = offsets[it.expert] + it.r0;
      const T* x = gemm_operand(s, xs + row * D, x_bf16.data(), it.rows * D);
      T* g = h1 + row * F;
      const index_t e = it.expert;
      product(p1, w.w1, e, it.rows, F, D, x, g);
      if (bias.b1) add_to_rows(g, it.rows, F, bias.b1 + e * F);
      T* u = glu ? h3 + row * F : nullptr;
      if (glu) {
        product(p3, w.w3, e, it.rows, F, D, x, u);
        if (bias.b3) add_to_rows(u, it.rows, F, bias.b3 + e * F);
      }
      activation_forward(s, g, u, a.data(), it.rows * F);
      gemm_operand(s, a.data(), a.data(), it.rows * F);
      product(p2, w.w2, e, it.rows, D, F, a.data(), ye + row * D);
      if (bias.b2) add_to_rows(ye + row * D, it.rows, D, bias.b2 + e * D);
    }
  }
}

template <typename T>
void experts_backward(const ExpertShape& shape, const index_t* offsets, const T* xs,
                      const ExpertWeights<T>& w, const T* h1, const T* h3, const T* dye, T* dxs,
                      const ExpertWeightGrads<T>& dw, const ExpertBiasGrads<T>& db,
                      BackwardPath path, const PackedExpertWeights* given, bool accumulate) {
  const ExpertShape s = with_bf16_kernel<T>(shape, given);
  const index_t D = s.d_model, F = s.d_ff;
  const bool glu = gated(s.act);
  const index_t N = offsets[s.E];
  check_blas_dims({N, D, F});
  // op(B) = W2^T [D, F], W1^T and W3^T [F, D] of the experts with rows
  std::optional<PackedExperts<T>> packs;
  if (given)
    packs.emplace(s, *given);
  else
    packs.emplace(s, offsets, w, true);
  const PackedExperts<T>& wt = *packs;

  if (!accumulate) zero_unrouted_gradients(s, offsets, dw, db);
  if (path == BackwardPath::by_expert ||
      (path == BackwardPath::automatic && fused_backward_pays(s.E, offsets)))
    return experts_backward_by_expert(s, offsets, xs, h1, h3, dye, wt, dxs, dw, db, accumulate);

  // uninitialised on purpose: every element is written in phase 1
  Scratch<T> a(N * F), dh1(N * F), dh3(glu ? N * F : 0);
  // bf16: the rounded xs and dye, which phase 2 reads again
  const bool rounds = rounds_operands(s);
  Scratch<T> xs_bf16(rounds ? N * D : 0), dye_bf16(rounds ? N * D : 0);
  const T* xg = rounds ? xs_bf16.get() : xs;
  const T* dyg = rounds ? dye_bf16.get() : dye;

  // Phase 1, over row tiles: dA = dYe W2^T, the activation backward, dXs.
  const auto row_items =
      tiles(s.E, kRowTile, [&](index_t e) { return offsets[e + 1] - offsets[e]; });
  const index_t n_row_items = index_t(row_items.size());
#pragma omp parallel
  {
    std::vector<T> da(kRowTile * F);
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < n_row_items; ++i) {
      const Item it = row_items[i];
      const index_t e = it.expert, row = offsets[e] + it.r0, n = it.rows * F;
      const T* dy = dye + row * D;
      if (rounds) {  // (the scratch is empty otherwise: no pointer into it)
        gemm_operand(s, xs + row * D, xs_bf16.get() + row * D, it.rows * D);
        dy = gemm_operand(s, dy, dye_bf16.get() + row * D, it.rows * D);
      }
      wt.w2.gemm(e, it.rows, dy, false, da.data());
      activation_backward(s, h1 + row * F, glu ? h3 + row * F : nullptr, da.data(),
                          a.get() + row * F, dh1.get() + row * F,
                          glu ? dh3.get() + row * F : nullptr, n);
      gemm_operand(s, a.get() + row * F, a.get() + row * F, n);
      round_gradient(s, dh1.get() + row * F, n);
      if (glu) round_gradient(s, dh3.get() + row * F, n);
      wt.w1.gemm(e, it.rows, dh1.get() + row * F, false, dxs + row * D);
      if (glu) wt.w3.gemm(e, it.rows, dh3.get() + row * F, true, dxs + row * D);
    }
  }

  // Phase 2, over tiles of the weight gradients' rows (never splitting the
  // reduction over an expert's tokens): dW1 = Xs^T dH1, dW3 = Xs^T dH3, dW2 = A^T dYe
  // (column layout: transposed in the linear one);
  // and one item per expert for its bias gradients (the column sums of dH1, dH3, dYe).
  struct GradItem {
    int which;  // 1, 3, 2; 0: the biases
    Item it;
  };
  std::vector<GradItem> items;
  const auto has_rows = [&](index_t e) { return offsets[e + 1] > offsets[e]; };
  if (db.db1 || db.db3 || db.db2)
    for (index_t e = 0; e < s.E; ++e)
      if (has_rows(e)) items.push_back({0, {e, 0, 0}});
  const index_t rows13 = gradient_rows(s, D, F), rows2 = gradient_rows(s, F, D);
  for (const Item& it : tiles(s.E, kGemmRowTile, [&](index_t e) { return has_rows(e) ? rows13 : 0; })) {
    items.push_back({1, it});
    if (glu) items.push_back({3, it});
  }
  for (const Item& it : tiles(s.E, kGemmRowTile, [&](index_t e) { return has_rows(e) ? rows2 : 0; }))
    items.push_back({2, it});
  const index_t n_items = index_t(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t i = 0; i < n_items; ++i) {
    const GradItem g = items[i];
    const index_t e = g.it.expert, row = offsets[e], n_e = offsets[e + 1] - offsets[e];
    if (g.which == 0) {
      if (db.db1) bias_gradient(db.db1 + e * F, n_e, F, dh1.get() + row * F, accumulate);
      if (db.db3) bias_gradient(db.db3 + e * F, n_e, F, dh3.get() + row * F, accumulate);
      if (db.db2) bias_gradient(db.db2 + e * D, n_e, D, dye + row * D, accumulate);
    } else if (g.which == 2) {
      weight_gradient(s, n_e, a.get() + row * F, F, dyg + row * D, D, dw.dw2[e], g.it.r0,
                      g.it.rows, accumulate);
    } else {
      const T* dh = (g.which == 1 ? dh1.get() : dh3.get()) + row * F;
      weight_gradient(s, n_e, xg + row * D, D, dh, F, (g.which == 1 ? dw.dw1 : dw.dw3)[e],
                      g.it.r0, g.it.rows, accumulate);
    }
  }
}

PackedExpertWeights pack_expert_weights(const ExpertShape& s, const ExpertWeights<float>& w,
                                        bool backward) {
  if (s.bf16_kernel == Bf16Kernel::fallback)
    throw std::invalid_argument("kernel: the fallback packs no weights");
  PackedExpertWeights p;
  p.kernel = s.bf16_kernel;
  p.backward = backward;
  p.linear = s.linear;
  p.gated = gated(s.act);
  p.E = s.E;
  p.d_model = s.d_model;
  p.d_ff = s.d_ff;
  const auto size = [&](PackShape q) { return packed_b_bf16_size(s.bf16_kernel, q.K, q.N); };
  const PackShape up = pack_shape(s, true, backward), down = pack_shape(s, false, backward);
  p.stride1 = size(up);
  p.stride3 = p.gated ? size(up) : 0;
  p.stride2 = size(down);
  p.offset3 = s.E * p.stride1;
  p.offset2 = p.offset3 + s.E * p.stride3;
  const std::size_t bytes = 4 * std::size_t(std::max<index_t>(1, p.offset2 + s.E * p.stride2));
  p.words = {static_cast<std::uint32_t*>(pool_alloc(bytes)), PackedExpertWeights::PoolFree{bytes}};
  std::uint32_t* out = p.words.get();
  const index_t n = p.gated ? 3 : 2;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t i = 0; i < s.E * n; ++i) {
    const index_t e = i / n, which = i % n;
    const PackShape q = which == 0 ? down : up;
    const float* src = which == 0 ? w.w2[e] : which == 1 ? w.w1[e] : w.w3[e];
    std::uint32_t* dst = out + (which == 0 ? p.offset2 + e * p.stride2
                                : which == 1 ? e * p.stride1 : p.offset3 + e * p.stride3);
    pack_b_bf16(s.bf16_kernel, q.trans, q.K, q.N, src, q.trans ? q.K : q.N, dst);
  }
  return p;
}

#define MOE_INSTANTIATE(T)                                                                  \
  template void experts_forward<T>(const ExpertShape&, const index_t*, const T*,            \
                                   const ExpertWeights<T>&, const ExpertBiases<T>&, T*, T*,  \
                                   T*, const PackedExpertWeights*);                          \
  template void experts_backward<T>(const ExpertShape&, const index_t*, const T*,           \
                                    const ExpertWeights<T>&, const T*, const T*, const T*,   \
                                    T*, const ExpertWeightGrads<T>&,                         \
                                    const ExpertBiasGrads<T>&, BackwardPath,                 \
                                    const PackedExpertWeights*, bool);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
