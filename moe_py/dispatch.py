"""Token dispatch: how routed rows reach their experts and come back (route -> dispatch ->
compute -> combine, as Megatron-Core's token dispatchers name the steps).

A dispatcher has four calls, forward and backward side by side:

  dispatch(x2, topk_indices, dropped) -> (xe, offsets, state)
      the rows this process's experts compute, grouped by local expert (expert e's rows
      are xe[offsets[e]:offsets[e+1]]);
  combine(ye, topk_weights, state) -> y2
      the experts' outputs ye (rows of xe) weighted back onto the tokens;
  combine_backward(dy2, state) -> (dye, d_topk_weights)
  dispatch_backward(dxe, state) -> dx2

LocalDispatcher keeps every expert in this process. AllToAllDispatcher (in
moe_py/distributed/dispatch.py) sends each row to the MPI rank that holds its expert. The
experts' compute (moe_py/experts.py) is the same code behind either.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import _kernels
from ._kernels import kernel


class LocalState:
    """One dispatch's bookkeeping: the slot -> row map, and what combine's backward reads."""

    __slots__ = ("slot_row", "ye", "topk_weights")

    def __init__(self, slot_row: np.ndarray):
        self.slot_row = slot_row
        self.ye: Optional[np.ndarray] = None
        self.topk_weights: Optional[np.ndarray] = None


class LocalDispatcher:
    """Every expert in this process: the plan groups the slots' rows by expert, one gather
    copies them, and combine sums each token's k weighted outputs (cpp/dispatch.cpp)."""

    def local_experts(self, num_experts: int) -> Tuple[int, int]:
        """The range of experts this process computes."""
        return 0, num_experts

    def dispatch(self, x2: np.ndarray, topk_indices: np.ndarray, dropped: np.ndarray,
                 num_experts: int) -> Tuple[np.ndarray, np.ndarray, LocalState]:
        offsets, row_token, slot_row = _kernels.dispatch_plan(
            topk_indices=topk_indices, dropped=dropped.view(np.uint8), num_experts=num_experts)
        xs = kernel("gather_rows", x2.dtype)(x=x2, row_token=row_token)
        return xs, offsets, LocalState(slot_row)

    def combine(self, ye: np.ndarray, topk_weights: np.ndarray, state: LocalState) -> np.ndarray:
        state.ye, state.topk_weights = ye, topk_weights
        return kernel("combine_forward", ye.dtype)(ye=ye, slot_row=state.slot_row, topk_weights=topk_weights)

    def combine_backward(self, dy2: np.ndarray, state: LocalState) -> Tuple[np.ndarray, np.ndarray]:
        return kernel("combine_backward", dy2.dtype)(dy=dy2, ye=state.ye, slot_row=state.slot_row,
                                                     topk_weights=state.topk_weights)

    def dispatch_backward(self, dxe: np.ndarray, state: LocalState) -> np.ndarray:
        return kernel("gather_rows_backward", dxe.dtype)(dxs=dxe, slot_row=state.slot_row)
