"""Argument checks at the Python boundary: every message names the argument,
what was expected and what was given. Arrays leave here C-contiguous in the
layer's dtype, so kernels never see strides (any input view is accepted)."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ._kernels import all_finite

# The BLAS takes 32-bit sizes: rows of one product (tokens x top_k) must stay below this.
MAX_ROWS = 2**31 - 1


class NonFiniteError(ValueError):
    """A value the computation made (not one the user passed) is NaN or Inf; the message
    names the input that led there. Training turns it into TrainingDiverged."""


def check_row_count(rows: int, name: str) -> None:
    if rows > MAX_ROWS:
        raise ValueError(f"{name}: {rows} rows (tokens x top_k) exceed the 32-bit BLAS's "
                         f"{MAX_ROWS}: split the batch")


def check_grad_buffer(g, shape: tuple, dtype: type, name: str, per_expert: bool = False) -> None:
    """A gradient buffer the kernels add into: the layer's own writable C-contiguous array;
    per_expert (expert weights [E, rows, cols]): each expert's matrix C-contiguous, the experts
    apart, as the kernels write them in place (cpp/experts.h's Stack)."""
    ok = isinstance(g, np.ndarray) and g.dtype == dtype and g.shape == tuple(shape) and g.flags.writeable
    if ok and not g.flags.c_contiguous:
        ok = per_expert and (g.shape[0] <= 1 or g.strides[0] >= g[0].nbytes) and g[0].flags.c_contiguous
    if not ok:
        got = (f"{g.dtype} {list(g.shape)}" + ("" if g.flags.c_contiguous else " non-contiguous")
               + ("" if g.flags.writeable else " read-only")) if isinstance(g, np.ndarray) \
            else type(g).__name__
        raise ValueError(f"{name}: expected a writable C-contiguous {np.dtype(dtype).name} array "
                         f"of shape {list(shape)}" + (" (or each expert's matrix C-contiguous)" if per_expert else "")
                         + f", got {got}")


def as_tokens(x, d_model: int, dtype: type, name: str = "x", owned: bool = False) -> Tuple[np.ndarray, tuple]:
    """x [..., d_model] -> (C-contiguous [T, d_model] copy-or-view, leading shape). owned: a
    copy whenever the view would share the caller's memory, for a forward whose backward
    reads x later (a caller changing its array in place meanwhile must not change the
    gradient)."""
    x = np.asarray(x)  # also drops a subclass's mask: NaN under a mask is still NaN
    if x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name} (the layer dtype), got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != d_model:
        raise ValueError(f"{name}: expected shape [..., {d_model}], got {list(x.shape)}")
    if not all_finite(x):
        raise ValueError(f"{name}: contains NaN or Inf")
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, d_model))
    return (x2.copy() if owned and np.may_share_memory(x2, x) else x2), lead


def as_mask(padding_mask, lead: tuple, name: str = "padding_mask") -> np.ndarray:
    """padding_mask of shape `lead`, bool or 0/1 ints, True/1 = real -> uint8 [T]."""
    n = int(np.prod(lead, dtype=np.int64))
    if padding_mask is None:
        return np.ones(n, dtype=np.uint8)
    m = np.asarray(padding_mask)
    if m.dtype != np.bool_ and not np.issubdtype(m.dtype, np.integer):
        raise TypeError(f"{name}: expected bool or 0/1 integers, got dtype {m.dtype}")
    if m.shape != tuple(lead):
        raise ValueError(f"{name}: expected shape {list(lead)} (x.shape[:-1]), got {list(m.shape)}")
    if m.dtype != np.bool_ and m.size and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"{name}: expected only 0/1 values, got {np.unique(m)[:5].tolist()}")
    return np.ascontiguousarray(m.reshape(n).astype(np.uint8))


def as_grad(g, shape: tuple, dtype: type, name: str) -> np.ndarray:
    """A gradient argument: exact shape, the layer dtype, finite."""
    g = np.asarray(g)
    if g.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {g.dtype}")
    if g.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(g.shape)}")
    if not all_finite(g):
        raise ValueError(f"{name}: contains NaN or Inf")
    return np.ascontiguousarray(g)


def check_param(value, shape: tuple, dtype: type, name: str) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != dtype:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise TypeError(f"{name}: expected a {np.dtype(dtype).name} array, got {got}")
    if value.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")
    if not all_finite(value):
        raise ValueError(f"{name}: contains NaN or Inf")



def as_token_ids(token_ids, lead: tuple, required: bool, name: str = "token_ids"):
    """token_ids of shape `lead`, non-negative integers -> int64 [T]; None when absent and
    not required (only the hash router reads them)."""
    if token_ids is None:
        if required:
            raise ValueError(f"{name}: the hash router needs the token ids (shape "
                             f"{list(lead)}, x.shape[:-1])")
        return None
    ids = np.asarray(token_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name}: expected integers, got dtype {ids.dtype}")
    if ids.shape != tuple(lead):
        raise ValueError(f"{name}: expected shape {list(lead)} (x.shape[:-1]), got {list(ids.shape)}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name}: expected ids >= 0, got {int(ids.min())}")
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: expected ids < 2**63")
    return np.ascontiguousarray(ids.reshape(-1).astype(np.int64))


def sequence_length(lead: tuple, scope: str) -> int:
    """The rows of one sequence for the sequence-scope balance loss (0: another scope)."""
    if scope != "sequence":
        return 0
    if len(lead) < 2 or lead[-1] == 0:
        raise ValueError(f"x: load_balance_scope='sequence' needs x of shape [..., S, d_model] "
                         f"with S >= 1 (the sequences), got leading shape {list(lead)}")
    return int(lead[-1])
