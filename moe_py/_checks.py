"""Argument checks at the Python boundary: every message names the argument,
what was expected and what was given. Arrays leave here C-contiguous in the
layer's dtype, so kernels never see strides (any input view is accepted)."""
from __future__ import annotations

from typing import Tuple

import numpy as np


def as_tokens(x, d_model: int, dtype: type, name: str = "x") -> Tuple[np.ndarray, tuple]:
    """x [..., d_model] -> (C-contiguous [T, d_model] copy-or-view, leading shape)."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name} (the layer dtype), got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != d_model:
        raise ValueError(f"{name}: expected shape [..., {d_model}], got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    lead = x.shape[:-1]
    return np.ascontiguousarray(x.reshape(-1, d_model)), lead


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
    if m.dtype != np.bool_ and m.size and not np.isin(m, (0, 1)).all():
        raise ValueError(f"{name}: expected only 0/1 values, got {np.unique(m)[:5].tolist()}")
    return np.ascontiguousarray(m.reshape(n).astype(np.uint8))


def as_grad(g, shape: tuple, dtype: type, name: str) -> np.ndarray:
    """A gradient argument: exact shape, the layer dtype, finite."""
    if not isinstance(g, np.ndarray):
        g = np.asarray(g)
    if g.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {g.dtype}")
    if g.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(g.shape)}")
    if not np.isfinite(g).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return np.ascontiguousarray(g)


def check_param(value, shape: tuple, dtype: type, name: str) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != dtype:
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise TypeError(f"{name}: expected a {np.dtype(dtype).name} array, got {got}")
    if value.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")
    if not np.isfinite(value).all():
        raise ValueError(f"{name}: contains NaN or Inf")

