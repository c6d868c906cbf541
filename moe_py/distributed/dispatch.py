"""AllToAllDispatcher: moe_py/dispatch.py's interface with the experts spread over MPI ranks.

Rank q of P holds experts [q E/P, (q+1) E/P). dispatch: the local plan groups this rank's
slots by expert, so the rows for rank q are one contiguous block; one Alltoall of the counts
per (rank, expert) and one Alltoallv of the rows bring every rank the rows of its experts.
They arrive grouped by source rank, then expert; one row gather puts them by expert, then
source rank, which is the global token order: each expert sees exactly the rows, tiles and
reduction order of the single-process layer, so its outputs and weight gradients are bitwise
those of MoELayer. combine sends the outputs back the same way (one Alltoallv) and combines
them on the tokens' own rank. The combine weights apply on that rank too: to the outputs
there (combine "output"), or to the rows before they leave (combine "input", Llama 4), so
either combine runs unchanged here. The backward runs the same path in reverse.

Every rank calls every collective in the same order, whatever its tokens: a rank with no
tokens, or no rows for some expert, sends and receives zero counts.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import numpy as np

from .._kernels import kernel
from ..dispatch import LocalDispatcher, LocalState
from . import comm as C

# Timed per call into `timings` (seconds, accumulated); the a2a phases time the MPI calls
# alone, so they include waiting for the slowest rank. "experts" is the time between
# dispatch and combine (the expert kernels), "experts_bwd" between their backwards.
FORWARD_PHASES = ("dispatch", "a2a_out", "experts", "a2a_back", "combine")
BACKWARD_PHASES = ("combine_bwd", "a2a_out_bwd", "experts_bwd", "a2a_back_bwd")


class AllToAllState(LocalState):
    """LocalState plus the rows' travel plan."""

    __slots__ = ("send_rows", "recv_rows", "perm", "inv")
    send_rows: np.ndarray  # [P] rows this rank sends to each rank
    recv_rows: np.ndarray  # [P] rows it receives from each rank
    perm: Optional[np.ndarray]  # arrival order -> expert-major order; None when they coincide
    inv: Optional[np.ndarray]  # its inverse

    def __init__(self, local: LocalState):  # the local dispatch's state, wrapped
        local.copy_to(self)


class AllToAllDispatcher:
    def __init__(self, comm, num_experts: int):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        if num_experts % self.size:
            raise ValueError(f"num_experts: expected a multiple of the number of MPI ranks ({self.size}), "
                             f"got {num_experts}")
        self.per_rank = num_experts // self.size
        self.local = LocalDispatcher()  # the plan, gather and combine on this rank's tokens
        self.timings: Dict[str, float] = {p: 0.0 for p in FORWARD_PHASES + BACKWARD_PHASES}
        self.bytes_sent = 0  # bytes of rows sent to other ranks
        self._clock = time.perf_counter()

    def local_experts(self, num_experts: int) -> Tuple[int, int]:
        return self.rank * self.per_rank, (self.rank + 1) * self.per_rank

    def _tick(self, phase: Optional[str]) -> None:
        now = time.perf_counter()
        if phase is not None:
            self.timings[phase] += now - self._clock
        self._clock = now

    def _count_bytes(self, rows: np.ndarray, row_bytes: int) -> None:
        # rows kept on this rank cross no wire
        self.bytes_sent += int((rows.sum() - rows[self.rank]) * row_bytes)

    def _rows(self, a: np.ndarray, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
        out = C.alltoallv_rows(self.comm, a, send, recv)
        self._count_bytes(send, a.shape[1] * a.itemsize)
        return out

    def dispatch(self, x2: np.ndarray, topk_indices: np.ndarray, topk_weights: np.ndarray,
                 dropped: np.ndarray, num_experts: int,
                 combine: str = "output") -> Tuple[np.ndarray, np.ndarray, AllToAllState]:
        """The local dispatch (which applies the weights to the rows for combine "input"),
        then the rows to their experts' ranks."""
        self._tick(None)
        xs, offsets, local = self.local.dispatch(x2, topk_indices, topk_weights, dropped, num_experts,
                                                 combine)
        per_expert = np.diff(offsets).reshape(self.size, self.per_rank)
        self._tick("dispatch")
        recv_counts = C.alltoall_counts(self.comm, per_expert)  # [source rank, local expert]
        state = AllToAllState(local)
        state.send_rows, state.recv_rows = per_expert.sum(axis=1), recv_counts.sum(axis=1)
        xr = self._rows(xs, state.send_rows, state.recv_rows)
        self._tick("a2a_out")
        state.perm, state.inv = _expert_major(recv_counts)
        xe = _gather(xr, state.perm)
        local_offsets = np.concatenate(([0], np.cumsum(recv_counts.sum(axis=0)))).astype(np.int64)
        return xe, local_offsets, state

    def combine(self, ye: np.ndarray, state: AllToAllState) -> np.ndarray:
        ye_r = _gather(ye, state.inv)
        self._tick("experts")
        ye_back = self._rows(ye_r, state.recv_rows, state.send_rows)
        self._tick("a2a_back")
        y = self.local.combine(ye_back, state)
        self._tick("combine")
        return y

    def combine_backward(self, dy2: np.ndarray, state: AllToAllState) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        self._tick(None)
        dye, d_weights = self.local.combine_backward(dy2, state)
        self._tick("combine_bwd")
        dye_r = self._rows(dye, state.send_rows, state.recv_rows)
        self._tick("a2a_out_bwd")
        return _gather(dye_r, state.perm), d_weights

    def dispatch_backward(self, dxe: np.ndarray, state: AllToAllState) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        dxs_r = _gather(dxe, state.inv)
        self._tick("experts_bwd")
        dxs = self._rows(dxs_r, state.recv_rows, state.send_rows)
        self._tick("a2a_back_bwd")
        return self.local.dispatch_backward(dxs, state)


def _gather(rows: np.ndarray, order: Optional[np.ndarray]) -> np.ndarray:
    return rows if order is None else kernel("gather_rows", rows.dtype)(x=rows, row_token=order)


def _expert_major(recv_counts: np.ndarray) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Rows arrive grouped by source rank, then local expert; the experts want them by
    expert, then source rank (= global token order). Returns the row gather that does it
    and its inverse, or (None, None) when the two orders coincide (one expert per rank,
    or one rank)."""
    P, El = recv_counts.shape
    if P == 1 or El == 1:
        return None, None
    start = (np.cumsum(recv_counts.ravel()) - recv_counts.ravel()).reshape(P, El)
    parts = [np.arange(start[s, e], start[s, e] + recv_counts[s, e], dtype=np.int64)
             for e in range(El) for s in range(P)]
    perm = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm), dtype=np.int64)
    return perm, inv
