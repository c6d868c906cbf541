"""Token dispatch: how routed rows reach their experts and come back (route -> dispatch ->
compute -> combine, as Megatron-Core's token dispatchers name the steps).

A dispatcher has four calls, forward and backward side by side:

  dispatch(x2, topk_indices, topk_weights, dropped, num_experts, combine) -> (xe, offsets, state)
      the rows this process's experts compute, grouped by local expert (expert e's rows
      are xe[offsets[e]:offsets[e+1]]); with combine "input" each row is its slot's weight
      times the token (Llama 4), with "output" the token itself;
  combine(ye, state) -> y2
      the experts' outputs ye (rows of xe) back onto the tokens: weighted by topk_weights
      ("output"), or summed unweighted ("input": the weights are in the rows already);
  combine_backward(dy2, state) -> (dye, d_topk_weights or None)
  dispatch_backward(dxe, state) -> (dx2, d_topk_weights or None)
      d_topk_weights come from the step that applied the weights: combine_backward for
      "output" (<dy, ye>), dispatch_backward for "input" (<dL/d row, x>); the other gives None.

LocalDispatcher keeps every expert in this process. AllToAllDispatcher (in
moe_py/distributed/dispatch.py) sends each row to the MPI rank that holds its expert, around
the local dispatcher's calls, so either combine works there too. The experts' compute
(moe_py/experts.py) is the same code behind either.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import _kernels
from ._kernels import kernel
from .config import COMBINES


class LocalState:
    """One dispatch's bookkeeping: the slot -> row map and the row -> token map, the combine
    weights, and what the backward of the step that applied them reads (ye for "output",
    x2 for "input")."""

    __slots__ = ("slot_row", "row_token", "topk_weights", "scale_input", "x2", "ye")

    def __init__(self, slot_row: np.ndarray, row_token: np.ndarray, topk_weights: np.ndarray,
                 scale_input: bool, x2: Optional[np.ndarray] = None):
        self.slot_row, self.row_token, self.topk_weights = slot_row, row_token, topk_weights
        self.scale_input, self.x2 = scale_input, x2
        self.ye: Optional[np.ndarray] = None

    def copy_to(self, other: "LocalState") -> None:
        """Every field into `other` (a subclass's state that wraps this one)."""
        for name in LocalState.__slots__:
            setattr(other, name, getattr(self, name))


class LocalDispatcher:
    """Every expert in this process: the plan groups the slots' rows by expert, one gather
    (weighted, for the input combine) copies them, and combine sums each token's k outputs,
    weighted for the output combine (cpp/dispatch.cpp)."""

    def local_experts(self, num_experts: int) -> Tuple[int, int]:
        """The range of experts this process computes."""
        return 0, num_experts

    def dispatch(self, x2: np.ndarray, topk_indices: np.ndarray, topk_weights: np.ndarray,
                 dropped: np.ndarray, num_experts: int,
                 combine: str = "output") -> Tuple[np.ndarray, np.ndarray, LocalState]:
        if combine not in COMBINES:
            raise ValueError(f"combine: expected one of {COMBINES}, got {combine!r}")
        offsets, row_token, slot_row = _kernels.dispatch_plan(
            topk_indices=topk_indices, dropped=dropped.view(np.uint8), num_experts=num_experts)
        scale_input = combine == "input"
        if scale_input:
            xs = kernel("dispatch_weighted", x2.dtype)(x=x2, slot_row=slot_row, topk_weights=topk_weights,
                                                       rows=len(row_token))
            return xs, offsets, LocalState(slot_row, row_token, topk_weights, True, x2)
        xs = kernel("gather_rows", x2.dtype)(x=x2, row_token=row_token)
        return xs, offsets, LocalState(slot_row, row_token, topk_weights, False)

    def combine(self, ye: np.ndarray, state: LocalState) -> np.ndarray:
        if state.scale_input:  # the plain sum of the token's rows: gather's backward
            return kernel("gather_rows_backward", ye.dtype)(dxs=ye, slot_row=state.slot_row)
        state.ye = ye
        return kernel("combine_forward", ye.dtype)(ye=ye, slot_row=state.slot_row,
                                                   topk_weights=state.topk_weights)

    def combine_backward(self, dy2: np.ndarray, state: LocalState) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if state.scale_input:  # every row of a token gets its dy: gather's forward
            return kernel("gather_rows", dy2.dtype)(x=dy2, row_token=state.row_token), None
        return kernel("combine_backward", dy2.dtype)(dy=dy2, ye=state.ye, slot_row=state.slot_row,
                                                     topk_weights=state.topk_weights)

    def dispatch_backward(self, dxe: np.ndarray, state: LocalState) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        if state.scale_input:
            return kernel("dispatch_weighted_backward", dxe.dtype)(
                dxs=dxe, x=state.x2, slot_row=state.slot_row, topk_weights=state.topk_weights)
        return kernel("gather_rows_backward", dxe.dtype)(dxs=dxe, slot_row=state.slot_row), None
