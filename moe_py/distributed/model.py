"""A TransformerLM made expert-parallel: its MoE FFNs become ExpertParallelMoELayers, the
rest stays replicated (data parallel). Gradient synchronisation, the global gradient norm,
and checkpoints that hold every expert so they load in a single-process run.

Every rank builds (or loads) the whole single-process model, then keeps its own experts:
the same seed or checkpoint gives the same model at any P that divides E.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Tuple

import numpy as np

from .._kernels import kernel
from ..checkpoint import CheckpointError, save_checkpoint
from ..layer import MoELayer
from ..models import TransformerLM
from ..optim import AdamW
from . import comm as C
from .layer import EXPERT_KEYS, ExpertParallelMoELayer


def to_expert_parallel(model: TransformerLM, comm) -> Dict[str, Tuple[int, int]]:
    """Swap each block's MoELayer for its expert-parallel twin, in place. Returns the names
    (as in named_parameters) of the expert weights this rank now holds a slice of, with
    that slice's expert range; every other parameter is replicated."""
    for b in model.blocks:
        if isinstance(b.ffn, MoELayer):
            # the trainer all-reduces every replicated gradient at once, router included
            b.ffn = ExpertParallelMoELayer.from_layer(b.ffn, comm, reduce_replicated_grads=False)
    return expert_slices(model)


def expert_slices(model: TransformerLM) -> Dict[str, Tuple[int, int]]:
    owner = {}
    for layer in model.moe_layers:
        if isinstance(layer, ExpertParallelMoELayer):
            for k, v in layer.params.items():
                if k in EXPERT_KEYS:
                    owner[id(v)] = layer.expert_range
    return {n: owner[id(p)] for n, p, _ in model.named_parameters() if id(p) in owner}


def _replicated(model: TransformerLM, experts) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
    return ((n, p, g) for n, p, g in model.named_parameters() if n not in experts)


def allreduce_replicated_grads(model: TransformerLM, comm, experts) -> None:
    """Sum the replicated gradients over ranks: one Allreduce of one flat buffer. (A sum:
    each rank's loss is already weighted by its share of the global batch.)"""
    grads = [g for _, _, g in _replicated(model, experts)]
    if not grads or comm.Get_size() == 1:
        return
    for dtype in sorted({g.dtype.str for g in grads}):
        group = [g for g in grads if g.dtype.str == dtype]
        flat = np.concatenate([g.ravel() for g in group])
        C.allreduce_sum_inplace(comm, flat)
        at = 0
        for g in group:
            g.ravel()[...] = flat[at:at + g.size]  # grads are C-contiguous: ravel is a view
            at += g.size


def global_grad_norm(model: TransformerLM, comm, experts) -> float:
    """The norm of the whole model's gradient: the replicated part (the same on every rank,
    after allreduce_replicated_grads) once, plus every rank's experts."""
    replicated = sum(kernel("sum_squares", g.dtype)(g=g) for _, _, g in _replicated(model, experts))
    mine = sum(kernel("sum_squares", g.dtype)(g=g) for n, _, g in model.named_parameters() if n in experts)
    return math.sqrt(float(replicated) + float(C.sum_in_rank_order(comm, np.array([mine]))[0]))


class _Whole:
    """What save_checkpoint reads of a model and an optimiser, with the experts of every
    rank gathered: the file is the one a single-process run would write."""

    def __init__(self, model: TransformerLM, params: Dict[str, np.ndarray], optim_state: dict):
        self.cfg, self.moe_layers = model.cfg, model.moe_layers
        self._params, self._optim = params, optim_state

    def named_parameters(self):
        return ((n, p, None) for n, p in self._params.items())

    def state_dict(self):
        return self._optim


def save_gathered_checkpoint(path: str, model: TransformerLM, optim: AdamW, step: int,
                             train_cfg: dict, comm, experts, root: int = 0) -> None:
    """Collective: gather every expert (weights and AdamW moments) on `root`, which writes
    the single-process checkpoint to `path`."""
    params, state = {}, {"t": np.array(optim.t)}
    for n, p, _ in model.named_parameters():
        parts = [("", p, params), ("m.", optim.m[n], state), ("v.", optim.v[n], state)]
        for prefix, a, into in parts:
            into[prefix + n] = C.gather_blocks(comm, a, root) if n in experts else a
    if comm.Get_rank() == root:
        whole = _Whole(model, params, state)
        save_checkpoint(path, whole, whole, step, train_cfg)


def load_expert_slices(model: TransformerLM, optim: AdamW, data: dict, experts) -> None:
    """Fill the AdamW state of an expert-parallel model from a single-process checkpoint's
    arrays (the model's weights were sliced when it was made expert-parallel)."""
    path = data.get("_path", "checkpoint")
    if "optim.t" not in data:
        raise CheckpointError(f"not a valid moe_py checkpoint: {path}: missing 'optim.t'")
    optim.t = int(data["optim.t"])
    for n in optim.m:
        for kind, dst in (("m", optim.m[n]), ("v", optim.v[n])):
            key = f"optim.{kind}.{n}"
            if key not in data:
                raise CheckpointError(f"not a valid moe_py checkpoint: {path}: missing array '{key}'")
            src = data[key]
            if n in experts:
                lo, hi = experts[n]
                src = src[lo:hi]
            if src.shape != dst.shape:
                raise CheckpointError(f"not a valid moe_py checkpoint: {path}: array '{key}' has "
                                      f"shape {list(src.shape)}, expected {list(dst.shape)}")
            dst[...] = src
