"""The few MPI collectives expert parallelism needs, on contiguous NumPy buffers.

Only mpi4py's uppercase (buffer) methods are used: the arrays travel as raw memory, never
pickled. This is the one module of moe_py that imports mpi4py, and only when it is used:
the core package works without it (`pip install moe_py[mpi]` brings mpi4py and mpich).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np


def mpi():
    """mpi4py's MPI module, with an install hint instead of a bare ImportError."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("moe_py.distributed needs mpi4py and an MPI: pip install 'moe_py[mpi]' "
                          f"({e})") from None
    return MPI


def mpi_ranks_from_launcher() -> int:
    """The job size mpiexec announced in the environment (MPICH's hydra: PMI_SIZE; Open
    MPI: OMPI_COMM_WORLD_SIZE), 1 outside MPI; read without importing mpi4py."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def world():
    return mpi().COMM_WORLD


def check_comm(comm):
    """comm: an mpi4py intracommunicator (None: COMM_WORLD)."""
    MPI = mpi()
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm: expected an mpi4py Intracomm (e.g. MPI.COMM_WORLD), "
                        f"got {type(comm).__name__}")
    return comm


# Counts and displacements of Alltoallv are C ints: one message must stay below this.
_MAX_ELEMS = 2**31 - 1


def alltoallv_rows(comm, send: np.ndarray, send_rows: np.ndarray, recv_rows: np.ndarray,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
    """One Alltoallv of row blocks: rows [sum(send_rows[:q]), +send_rows[q]) of `send`
    [N, d] go to rank q; the result holds, in source-rank order, the recv_rows[s] rows
    rank s sent here. Every rank takes part even with nothing to send or receive (zero
    counts), so empty buffers never deadlock."""
    MPI = mpi()
    d = send.shape[1]
    send = np.ascontiguousarray(send)
    if out is None:
        out = np.empty((int(recv_rows.sum()), d), dtype=send.dtype)
    sc, rc = send_rows.astype(np.int64) * d, recv_rows.astype(np.int64) * d
    if sc.sum() > _MAX_ELEMS or rc.sum() > _MAX_ELEMS:
        raise ValueError(f"x: an all-to-all of {max(sc.sum(), rc.sum())} elements exceeds MPI's "
                         f"32-bit counts ({_MAX_ELEMS}): split the batch")
    sd = np.concatenate(([0], np.cumsum(sc)[:-1]))
    rd = np.concatenate(([0], np.cumsum(rc)[:-1]))
    t = MPI._typedict[send.dtype.char]
    comm.Alltoallv([send, (sc.astype(np.int32), sd.astype(np.int32)), t],
                   [out, (rc.astype(np.int32), rd.astype(np.int32)), t])
    return out


def alltoall_counts(comm, counts: np.ndarray) -> np.ndarray:
    """counts [P, m] int64: row q goes to rank q; returns [P, m], row s from rank s."""
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    out = np.empty_like(counts)
    comm.Alltoall(counts, out)
    return out


def allreduce_sum(comm, a: np.ndarray) -> np.ndarray:
    """Elementwise sum over ranks (a new array; `a` is left as it was)."""
    a = np.ascontiguousarray(a)
    out = np.empty_like(a)
    comm.Allreduce(a, out, op=mpi().SUM)
    return out


def allreduce_sum_inplace(comm, a: np.ndarray) -> None:
    """a <- sum over ranks of a (a C-contiguous array)."""
    comm.Allreduce(mpi().IN_PLACE, a, op=mpi().SUM)


def allgather_rows(comm, local: np.ndarray, counts: Optional[np.ndarray] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Every rank's `local` [n_r, ...] stacked in rank order, with the n_r (`counts`, when
    the caller already knows every rank's n_r, saves the Allgather that finds them)."""
    local = np.ascontiguousarray(local)
    if counts is None:
        n = np.array([local.shape[0]], np.int64)
        counts = np.empty(comm.Get_size(), np.int64)
        comm.Allgather(n, counts)
    row = int(np.prod(local.shape[1:], dtype=np.int64))
    if int(counts.sum()) * row > _MAX_ELEMS:
        raise ValueError(f"x: an allgather of {int(counts.sum()) * row} elements exceeds MPI's "
                         f"32-bit counts ({_MAX_ELEMS}): split the batch")
    out = np.empty((int(counts.sum()),) + local.shape[1:], dtype=local.dtype)
    c = (counts * row).astype(np.int32)
    displ = np.concatenate(([0], np.cumsum(c)[:-1])).astype(np.int32)
    t = mpi()._typedict[local.dtype.char]
    comm.Allgatherv([local, t], [out, (c, displ), t])
    return out, counts


def allgather_blocks(comm, local: np.ndarray) -> np.ndarray:
    """Equal-shaped blocks [m, ...] of every rank joined along axis 0 in rank order
    ([P*m, ...]): each rank's slice of the experts back into the whole tensor."""
    local = np.ascontiguousarray(local)
    out = np.empty((comm.Get_size() * local.shape[0],) + local.shape[1:], dtype=local.dtype)
    comm.Allgather(local, out)
    return out


def gather_blocks(comm, local: np.ndarray, root: int = 0) -> Optional[np.ndarray]:
    """allgather_blocks, on `root` only (None elsewhere): for writing a checkpoint."""
    local = np.ascontiguousarray(local)
    out = None
    if comm.Get_rank() == root:
        out = np.empty((comm.Get_size() * local.shape[0],) + local.shape[1:], dtype=local.dtype)
    comm.Gather(local, out, root=root)
    return out


def bcast_text(comm, text: Optional[str], root: int = 0) -> str:
    """A string from `root` to every rank, as bytes (a length, then the UTF-8)."""
    data = (text or "").encode() if comm.Get_rank() == root else b""
    n = np.array([len(data)], np.int64)
    comm.Bcast(n, root=root)
    buf = np.frombuffer(data, np.uint8).copy() if comm.Get_rank() == root else np.empty(int(n[0]), np.uint8)
    comm.Bcast(buf, root=root)
    return buf.tobytes().decode()


def sum_in_rank_order(comm, values: np.ndarray) -> np.ndarray:
    """Sum of a small float64 vector over ranks, added in rank order after one Allgather:
    every rank gets the same bits whatever algorithm MPI picks (statistics, norms)."""
    return rank_order_sum(allgather_blocks(comm, np.ascontiguousarray(values, dtype=np.float64)[None, :]))


def rank_order_sum(rows: np.ndarray) -> np.ndarray:
    """rows[0] + rows[1] + ... in that order (rows: one per rank, from an Allgather)."""
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total
