// The body of one bfloat16 small-GEMM kernel (small_gemm_bf16.h), included by
// small_gemm_bf16.cpp once per kernel, inside that kernel's namespace and target options,
// after its `Ops`: no include guard and no includes, on purpose.
//
// Ops gives: F (a float32 vector of L lanes) and I (L 32-bit lanes, each a bfloat16 pair);
// L and kRows (micro-tile rows); zero, add, load, store, load_n, store_n (the first n lanes);
// load_pairs, bcast (one pair to every lane) and dot(acc, a, b): acc + the pairwise products;
// pack_row, pack_two_rows, pack_columns and pack_rows_across (ScalarPacking's, or faster with
// the same products).
// A tile kernel (AMX) also sets kTiles, pads k to kPairAlign pairs (a tile's depth) and
// gives tile_block, the product of one packed A block and one panel, its tiles starting
// from C when accumulating (from zero otherwise); Session is what a
// product must hold while it runs (the tile configuration), an empty struct otherwise.

constexpr index_t L = Ops::L;
constexpr int kRows = Ops::kRows;
constexpr index_t NR = 2 * L;              // columns per packed panel: two registers
constexpr index_t kKc = kSmallGemmKBlock;  // k per block (even: a pair never straddles two)
// columns per block of panels: A is packed once per block; the tile kernels' panels come
// from L2 either way, so they take twice as many columns (half the packing of A)
constexpr index_t kNc = Ops::kTiles ? 1024 : 512;
static_assert(kKc % 2 == 0 && kNc % NR == 0, "blocks hold whole pairs and whole panels");

inline index_t pairs(index_t k) { return (k + 1) / 2; }
// pairs(k) rounded up to whole tiles of k (zeros past pairs(k))
inline index_t padded_pairs(index_t k) {
  return (pairs(k) + Ops::kPairAlign - 1) / Ops::kPairAlign * Ops::kPairAlign;
}
inline index_t lesser(index_t a, index_t b) { return a < b ? a : b; }
static_assert((kKc / 2) % Ops::kPairAlign == 0, "k blocks start on whole tiles");

// op(B) rows [k0, k0 + kc), columns [j0, j0 + nc) (nc <= NR) into panel [pairs(kc)][NR]:
// the pair (row 2p, row 2p + 1) of each column, zero past kc and past nc. Inner loops
// without branches (the odd last row is its own pass), so that they vectorise.
inline void pack_panel(bool trans_b, const float* B, index_t ldb, index_t k0, index_t kc,
                       index_t j0, index_t nc, std::uint32_t* panel) {
  const index_t full = kc / 2;
  if (trans_b) {  // op(B)(k, j) = B[j * ldb + k]: row j's pairs down the panel's column j
    Ops::pack_rows_across(B + j0 * ldb + k0, ldb, nc, full, panel, NR);
    if (full < pairs(kc))
      for (index_t j = 0; j < nc; ++j) panel[full * NR + j] = bf16_pair(B[(j0 + j) * ldb + k0 + 2 * full], 0.0f);
  }
  for (index_t p = 0; p < pairs(kc); ++p) {
    std::uint32_t* row = panel + p * NR;
    if (!trans_b) {
      const float* b0 = B + (k0 + 2 * p) * ldb + j0;
      const float* b1 = b0 + ldb;
      if (p < full)
        Ops::pack_two_rows(b0, b1, nc, row);
      else
        for (index_t j = 0; j < nc; ++j) row[j] = bf16_pair(b0[j], 0.0f);
    }
    for (index_t j = nc; j < NR; ++j) row[j] = 0;
  }
  for (index_t p = pairs(kc); p < padded_pairs(kc); ++p)
    for (index_t j = 0; j < NR; ++j) panel[p * NR + j] = 0;
}

// Rows [0, rows) of op(A), k [0, kc) (a at op(A)(0, k0)) into blk [kRows][bs], bs >=
// padded_pairs(kc): row i's pairs side by side, as a plain A's row already holds them (the
// micro-kernel broadcasts blk[i][p] for each row, as small_gemm broadcasts A[i][k]).
inline void pack_a(bool trans_a, const float* a, index_t lda, int rows, index_t kc,
                   std::uint32_t* blk, index_t bs) {
  const index_t full = kc / 2, padded = padded_pairs(kc);
  if (trans_a) {  // op(A)(i, k) = a[k * lda + i]: rows 2p and 2p + 1 of a, side by side
    Ops::pack_columns(a, lda, rows, full, blk, bs);
    if (full < pairs(kc))
      for (int i = 0; i < rows; ++i) blk[i * bs + full] = bf16_pair(a[2 * full * lda + i], 0.0f);
  } else {
    for (int i = 0; i < rows; ++i) {
      const float* ai = a + i * lda;
      std::uint32_t* out = blk + i * bs;
      Ops::pack_row(ai, full, out);
      if (full < pairs(kc)) out[full] = bf16_pair(ai[2 * full], 0.0f);
    }
  }
  // a tile reads whole tiles: zeros past the pairs and, below the rows, zero rows
  for (int i = 0; i < (Ops::kTiles ? kRows : rows); ++i)
    for (index_t p = i < rows ? pairs(kc) : 0; p < padded; ++p) blk[i * bs + p] = 0;
}

// C rows [R][nc] (+)= the packed A rows x one panel, over kp pairs; NV registers per row
// (1 when nc <= L, so that a narrow product skips the panel's zero half).
template <int NV, int R>
void micro_tile(index_t kp, const std::uint32_t* blk, index_t bs, const std::uint32_t* panel,
                float* c, index_t ldc, index_t nc, bool accumulate) {
  typename Ops::F acc[NV][R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[v][i] = Ops::zero();
  for (index_t p = 0; p < kp; ++p) {
    typename Ops::I b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Ops::load_pairs(panel + p * NR + v * L);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const typename Ops::I ai = Ops::bcast(blk[i * bs + p]);
      for (int v = 0; v < NV; ++v) acc[v][i] = Ops::dot(acc[v][i], ai, b[v]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) {
      const index_t n = lesser(L, nc - v * L);
      if (n <= 0) continue;
      float* ci = c + i * ldc + v * L;
      if (n == L)
        Ops::store(ci, accumulate ? Ops::add(Ops::load(ci), acc[v][i]) : acc[v][i]);
      else
        Ops::store_n(ci, accumulate ? Ops::add(Ops::load_n(ci, int(n)), acc[v][i]) : acc[v][i],
                     int(n));
    }
}

// The micro-tile for `rows` <= kRows rows (a template per row count).
template <int NV, int R = kRows>
void micro_rows(int rows, index_t kp, const std::uint32_t* blk, index_t bs,
                const std::uint32_t* panel, float* c, index_t ldc, index_t nc, bool accumulate) {
  if constexpr (R >= 1) {
    if (rows == R) return micro_tile<NV, R>(kp, blk, bs, panel, c, ldc, nc, accumulate);
    micro_rows<NV, R - 1>(rows, kp, blk, bs, panel, c, ldc, nc, accumulate);
  }
}

// C rows [rows][nc] (+)= one packed A block x one panel, over kp pairs: the tiles, or the
// register micro-tile (one register per row when nc <= L, so that a narrow product skips
// the panel's zero half). A template, so that only the branch its Ops has is compiled.
template <class O = Ops>
void block_product(int rows, index_t kp, const std::uint32_t* blk, index_t bs,
                   const std::uint32_t* panel, float* c, index_t ldc, index_t nc, bool accumulate) {
  if constexpr (O::kTiles)
    O::tile_block(rows, kp, blk, bs, panel, NR, c, ldc, nc, accumulate);
  else if (nc <= L)
    micro_rows<1>(rows, kp, blk, bs, panel, c, ldc, nc, accumulate);
  else
    micro_rows<2>(rows, kp, blk, bs, panel, c, ldc, nc, accumulate);
}

// A block of kRows packed rows of A, kp pairs each: a per-thread buffer, grown as needed.
inline std::uint32_t* a_block(index_t kp) {
  thread_local std::unique_ptr<AlignedBuffer<std::uint32_t>> buffer;
  thread_local index_t size = 0;
  if (kRows * kp > size) {
    buffer = std::make_unique<AlignedBuffer<std::uint32_t>>(kRows * kp);
    size = kRows * kp;
  }
  return buffer->get();
}

// C [M][N] (+)= op(A) rows 0..M, k0..k0+kc (a at op(A)(0, k0)) x the packed panels of that
// k block (panel j at panels + j * stride). Rows outer: a block of kRows rows of A is
// packed once and stays in L1 (in L2 when a tile kernel takes the whole of a long K) while
// the panels stream from L2.
inline void panels_block(bool trans_a, index_t M, index_t N, index_t kc, const float* a,
                         index_t lda, const std::uint32_t* panels, index_t stride, float* c,
                         index_t ldc, bool accumulate) {
  const index_t kp = padded_pairs(kc);
  std::uint32_t* blk = a_block(kp);
  for (index_t i = 0; i < M; i += kRows) {
    const int rows = int(lesser(kRows, M - i));
    pack_a(trans_a, trans_a ? a + i : a + i * lda, lda, rows, kc, blk, kp);
    for (index_t j0 = 0; j0 < N; j0 += NR) {
      const std::uint32_t* panel = panels + (j0 / NR) * stride;
      const index_t nc = lesser(NR, N - j0);
      block_product(rows, kp, blk, kp, panel, c + i * ldc + j0, ldc, nc, accumulate);
    }
  }
}

inline const float* column_k(bool trans_a, const float* A, index_t lda, index_t k0) {
  return trans_a ? A + k0 * lda : A + k0;
}

inline void zero_unless(bool accumulate, index_t M, index_t N, float* C, index_t ldc) {
  if (!accumulate)
    for (index_t i = 0; i < M; ++i)
      for (index_t j = 0; j < N; ++j) C[i * ldc + j] = 0.0f;
}

void gemm(bool trans_a, bool trans_b, index_t M, index_t N, index_t K, const float* A,
          index_t lda, const float* B, index_t ldb, bool accumulate, float* C, index_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) return zero_unless(accumulate, M, N, C, ldc);
  [[maybe_unused]] const typename Ops::Session session;
  // one block of packed panels per thread, reused by every call on it
  thread_local AlignedBuffer<std::uint32_t> panels((kKc / 2) * kNc);
  for (index_t n0 = 0; n0 < N; n0 += kNc) {
    const index_t nb = lesser(kNc, N - n0);
    for (index_t k0 = 0; k0 < K; k0 += kKc) {
      const index_t kc = lesser(kKc, K - k0), stride = padded_pairs(kc) * NR;
      for (index_t j0 = 0; j0 < nb; j0 += NR)
        pack_panel(trans_b, B, ldb, k0, kc, n0 + j0, lesser(NR, nb - j0),
                   panels.get() + (j0 / NR) * stride);
      panels_block(trans_a, M, nb, kc, column_k(trans_a, A, lda, k0), lda, panels.get(), stride,
                   C + n0, ldc, accumulate || k0 > 0);
    }
  }
}

// Packed: panel j0 / NR holds all K (padded_pairs(K) rows of NR words); k block k0 starts
// at its pair k0 / 2. The pairs are those gemm packs block by block (k0 is even, and a
// whole number of tiles): the same bits.
index_t packed_size(index_t K, index_t N) { return (N + NR - 1) / NR * NR * padded_pairs(K); }

void pack_b(bool trans_b, index_t K, index_t N, const float* B, index_t ldb,
            std::uint32_t* packed) {
  for (index_t j0 = 0; j0 < N; j0 += NR)
    pack_panel(trans_b, B, ldb, 0, K, j0, lesser(NR, N - j0), packed + (j0 / NR) * padded_pairs(K) * NR);
}

void gemm_packed(bool trans_a, index_t M, index_t N, index_t K, const float* A, index_t lda,
                 const std::uint32_t* packed, bool accumulate, float* C, index_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) return zero_unless(accumulate, M, N, C, ldc);
  [[maybe_unused]] const typename Ops::Session session;
  const index_t stride = padded_pairs(K) * NR;
  // The tiles continue C's sum, so the whole of K at once gives the bits of k block after
  // k block, with one load and store of C per block of C instead of one per k block; up to
  // kWholeKPairs, so that the packed A block (kRows rows of it) stays within L2.
  constexpr index_t kWholeKPairs = 4096;
  if constexpr (Ops::kTiles) {
    if (padded_pairs(K) <= kWholeKPairs) {
      for (index_t n0 = 0; n0 < N; n0 += kNc)
        panels_block(trans_a, M, lesser(kNc, N - n0), K, A, lda, packed + (n0 / NR) * stride,
                     stride, C + n0, ldc, accumulate);
      return;
    }
  }
  for (index_t n0 = 0; n0 < N; n0 += kNc)
    for (index_t k0 = 0; k0 < K; k0 += kKc)
      panels_block(trans_a, M, lesser(kNc, N - n0), lesser(kKc, K - k0),
                   column_k(trans_a, A, lda, k0), lda, packed + (n0 / NR) * stride + (k0 / 2) * NR,
                   stride, C + n0, ldc, accumulate || k0 > 0);
}
