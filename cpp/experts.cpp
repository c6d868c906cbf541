#include "experts.h"

#include <memory>
#include <vector>

#include "activations.h"
#include "blas.h"
#include "pool.h"

namespace moe {

namespace {

// Rows per work item. Large enough that re-packing an expert's weights for
// each tile is cheap next to the tile's GEMM; fixed, never from the thread count.
constexpr index_t kRowTile = 256;

struct Item {
  index_t expert, r0, rows;
};

// (expert, tile) items over `extent(e)` rows per expert, tiles of `tile` rows.
template <typename Extent>
std::vector<Item> tiles(index_t E, index_t tile, Extent extent) {
  std::vector<Item> items;
  for (index_t e = 0; e < E; ++e)
    for (index_t r = 0, n = extent(e); r < n; r += tile)
      items.push_back({e, r, std::min(tile, n - r)});
  return items;
}

}  // namespace

template <typename T>
void experts_forward(const ExpertShape& s, const index_t* offsets, const T* xs, const T* w1,
                     const T* w3, const T* w2, T* h1, T* h3, T* ye) {
  const index_t D = s.d_model, F = s.d_ff;
  check_blas_dims({offsets[s.E], D, F});
  const bool glu = s.act == Activation::swiglu;
  const auto items = tiles(s.E, kRowTile, [&](index_t e) { return offsets[e + 1] - offsets[e]; });
  const index_t n_items = index_t(items.size());

#pragma omp parallel
  {
    std::vector<T> a(kRowTile * F);
#pragma omp for schedule(dynamic, 1)
    for (index_t i = 0; i < n_items; ++i) {
      const Item it = items[i];
      const index_t row = offsets[it.expert] + it.r0;
      const T* x = xs + row * D;
      T* g = h1 + row * F;
      gemm(false, false, it.rows, F, D, T(1), x, D, w1 + it.expert * D * F, F, T(0), g, F);
      if (glu) {
        T* u = h3 + row * F;
        gemm(false, false, it.rows, F, D, T(1), x, D, w3 + it.expert * D * F, F, T(0), u, F);
        swiglu_forward(g, u, a.data(), it.rows * F);
      } else {
        gelu_forward(g, a.data(), it.rows * F);
      }
      gemm(false, false, it.rows, D, F, T(1), a.data(), F, w2 + it.expert * F * D, D, T(0),
           ye + row * D, D);
    }
  }
}

template <typename T>
void experts_backward(const ExpertShape& s, const index_t* offsets, const T* xs, const T* w1,
                      const T* w3, const T* w2, const T* h1, const T* h3, const T* dye, T* dxs,
                      T* dw1, T* dw3, T* dw2) {
  const index_t D = s.d_model, F = s.d_ff;
  const bool glu = s.act == Activation::swiglu;
  const index_t N = offsets[s.E];
  check_blas_dims({N, D, F});
  // uninitialised on purpose: every element is written in phase 1
  Scratch<T> a(N * F), dh1(N * F), dh3(glu ? N * F : 0);

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
      gemm(false, true, it.rows, F, D, T(1), dye + row * D, D, w2 + e * F * D, D, T(0),
           da.data(), F);
      if (glu) {
        swiglu_backward(h1 + row * F, h3 + row * F, da.data(), a.get() + row * F,
                        dh1.get() + row * F, dh3.get() + row * F, n);
        gemm(false, true, it.rows, D, F, T(1), dh1.get() + row * F, F, w1 + e * D * F, F, T(0),
             dxs + row * D, D);
        gemm(false, true, it.rows, D, F, T(1), dh3.get() + row * F, F, w3 + e * D * F, F, T(1),
             dxs + row * D, D);
      } else {
        gelu_backward(h1 + row * F, da.data(), a.get() + row * F, dh1.get() + row * F, n);
        gemm(false, true, it.rows, D, F, T(1), dh1.get() + row * F, F, w1 + e * D * F, F, T(0),
             dxs + row * D, D);
      }
    }
  }

  // Phase 2, over tiles of the weight gradients' rows (never splitting the
  // reduction over an expert's tokens): dW1 = Xs^T dH1, dW3 = Xs^T dH3, dW2 = A^T dYe.
  struct GradItem {
    int which;  // 1, 3, 2
    Item it;
  };
  std::vector<GradItem> items;
  const auto has_rows = [&](index_t e) { return offsets[e + 1] > offsets[e]; };
  for (const Item& it : tiles(s.E, kGemmRowTile, [&](index_t e) { return has_rows(e) ? D : 0; })) {
    items.push_back({1, it});
    if (glu) items.push_back({3, it});
  }
  for (const Item& it : tiles(s.E, kGemmRowTile, [&](index_t e) { return has_rows(e) ? F : 0; }))
    items.push_back({2, it});
  const index_t n_items = index_t(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t i = 0; i < n_items; ++i) {
    const GradItem g = items[i];
    const index_t e = g.it.expert, row = offsets[e], n_e = offsets[e + 1] - offsets[e];
    if (g.which == 2) {
      // rows r0.. of A^T are columns r0.. of A
      gemm(true, false, g.it.rows, D, n_e, T(1), a.get() + row * F + g.it.r0, F, dye + row * D,
           D, T(1), dw2 + e * F * D + g.it.r0 * D, D);
    } else {
      const T* dh = (g.which == 1 ? dh1.get() : dh3.get()) + row * F;
      T* dw = (g.which == 1 ? dw1 : dw3) + e * D * F + g.it.r0 * F;
      gemm(true, false, g.it.rows, F, n_e, T(1), xs + row * D + g.it.r0, D, dh, F, T(1), dw, F);
    }
  }
}

#define MOE_INSTANTIATE(T)                                                                   \
  template void experts_forward<T>(const ExpertShape&, const index_t*, const T*, const T*,   \
                                   const T*, const T*, T*, T*, T*);                          \
  template void experts_backward<T>(const ExpertShape&, const index_t*, const T*, const T*,  \
                                    const T*, const T*, const T*, const T*, const T*, T*, T*, \
                                    T*, T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
