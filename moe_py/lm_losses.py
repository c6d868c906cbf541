"""Language-model losses (the kernels are in cpp/lm_losses.cpp; the router's
losses are in cpp/losses.cpp and reach Python through the Router)."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from . import _kernels
from ._kernels import all_finite, kernel
from .config import IGNORE_INDEX


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX) -> Tuple[float, np.ndarray]:
    """Mean cross-entropy over the labels that are not `ignore_index`, and its
    gradient w.r.t. logits. logits [..., V] float32/float64; labels [...] ints.
    With every label ignored: loss 0.0 and an all-zero gradient (no NaN)."""
    logits = np.asarray(logits)
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(f"logits: expected float32 or float64, got {logits.dtype}")
    if logits.ndim < 1:
        raise ValueError("logits: expected shape [..., V]")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels: expected integers, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: expected shape {list(logits.shape[:-1])}, got {list(labels.shape)}")
    if not all_finite(logits):
        raise ValueError("logits: contains NaN or Inf")
    V = logits.shape[-1]
    flat = np.ascontiguousarray(logits.reshape(-1, V))
    lab = np.ascontiguousarray(labels.reshape(-1).astype(np.int64))
    loss, d = kernel("cross_entropy", logits.dtype)(logits=flat, labels=lab,
                                                    ignore_index=int(ignore_index))
    return float(loss), d.reshape(logits.shape)


def multi_token_labels(targets, mask, n_predict: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Labels [n_predict, B, S] for heads predicting t+1 ... t+n_predict.

    targets [B, S] are the next-token labels (head 0), already `ignore_index` where
    there is no real next token; head i reads targets[:, t + i], and is ignored where
    t + i runs past the window or input t or t + i is padding (the mask shifts with
    the labels), so no head learns from padding."""
    targets = np.ascontiguousarray(np.asarray(targets, dtype=np.int64))
    mask = np.ascontiguousarray(np.asarray(mask).astype(np.uint8))
    return _kernels.multi_token_labels(targets=targets, mask=mask, n_predict=int(n_predict),
                                       ignore_index=int(ignore_index))


def multi_token_cross_entropy(head_logits: List[np.ndarray], targets, mask,
                              ignore_index: int = IGNORE_INDEX) -> Tuple[List[float], List[np.ndarray]]:
    """One cross_entropy per head i (predicting t+1+i) on multi_token_labels.
    Returns the per-head losses and per-head gradients."""
    labels = multi_token_labels(targets, mask, len(head_logits), ignore_index)
    losses, grads = [], []
    for i, logits in enumerate(head_logits):
        loss, d = cross_entropy(logits, labels[i], ignore_index)
        losses.append(loss)
        grads.append(d)
    return losses, grads
