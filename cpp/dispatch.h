// Dispatch and combine: group the kept (token, slot) assignments by expert so
// every expert runs dense GEMMs over contiguous rows, and bring the expert
// outputs back to their tokens. Padded tokens and dropped slots get no row.
#pragma once
#include "tensor.h"

namespace moe {

// Counting sort of the kept assignments by expert, stable in (token, slot)
// order. Writes offsets[E + 1] (rows of expert e are offsets[e] .. offsets[e+1]),
// row_token[N] (the token each row copies) and slot_row[n, k] (the row of each
// assignment, -1 when dropped or padded). Returns N.
index_t dispatch_plan(const index_t* topk_indices, const std::uint8_t* dropped, index_t n_tokens,
                      index_t k, index_t E, index_t* offsets, index_t* row_token,
                      index_t* slot_row);

// xs[r] = x[row_token[r]]
template <typename T>
void gather_rows(const T* x, const index_t* row_token, index_t rows, index_t d, T* xs);

// dx[t] = sum_j dxs[slot_row[t, j]]  (the backward of gather_rows, per token:
// a fixed slot order, no atomics)
template <typename T>
void gather_rows_backward(const T* dxs, const index_t* slot_row, index_t n_tokens, index_t k,
                          index_t d, T* dx);

// The combine weights scale either the experts' outputs (MoEConfig.combine "output") or their
// inputs ("input", Llama 4). The two are each other's transpose: the weighted sum onto the
// tokens (combine_forward) is the input combine's dispatch backward, and the weighted scatter
// onto the rows (combine_backward) is its dispatch. Each formula is written once below.

// y[t] = sum_j weights[t, j] * ye[slot_row[t, j]]                      (combine "output")
template <typename T>
void combine_forward(const T* ye, const index_t* slot_row, const T* weights, index_t n_tokens,
                     index_t k, index_t d, T* y);

// dye[slot_row[t, j]] = weights[t, j] * dy[t];  d_weights[t, j] = <dy[t], ye[slot_row[t, j]]>
template <typename T>
void combine_backward(const T* dy, const T* ye, const index_t* slot_row, const T* weights,
                      index_t n_tokens, index_t k, index_t d, T* dye, T* d_weights);

// xs[slot_row[t, j]] = weights[t, j] * x[t]: the rows of the input combine ("input"), whose
// experts' outputs are then summed unweighted (gather_rows_backward)
template <typename T>
void dispatch_weighted(const T* x, const index_t* slot_row, const T* weights, index_t n_tokens,
                       index_t k, index_t d, T* xs);

// Its backward: dx[t] = sum_j weights[t, j] * dxs[slot_row[t, j]];
// d_weights[t, j] = <x[t], dxs[slot_row[t, j]]> (0 for a slot with no row)
template <typename T>
void dispatch_weighted_backward(const T* dxs, const T* x, const index_t* slot_row,
                                const T* weights, index_t n_tokens, index_t k, index_t d, T* dx,
                                T* d_weights);

// table_grad[v] += sum of dout[t] over the tokens t with ids[t] == v, summed in
// token order per id (the backward of an embedding lookup; no atomics).
template <typename T>
void scatter_add_rows(const T* dout, const index_t* ids, index_t n_tokens, index_t n_ids,
                      index_t d, T* table_grad);

}  // namespace moe
