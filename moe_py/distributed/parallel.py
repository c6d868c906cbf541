"""ExpertParallel: the Parallel strategy (moe_py/parallel.py) of an MPI job.

Every rank builds (or loads) the whole single-process model, then keeps its own experts:
each MoE FFN becomes an ExpertParallelMoELayer, the rest stays replicated (data parallel).
The same seed or checkpoint gives the same model at any P that divides E.

Each global batch (the single-process run's) is split by rows: rank r takes windows
[r B/P, (r+1) B/P) of every micro-batch, so the global token order is rank order, as the
expert-parallel layer assumes. Each rank weights its tokens' loss by its share of the
global micro-batch's targets (head by head), so the replicated gradients summed over ranks
in one Allreduce are the single-process gradient, also with uneven padding. Rank 0 alone
writes the run folder; its checkpoints hold every expert, so `sample`, `analyze` and a
resume at another P (any P dividing E) read them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple, cast

import numpy as np

from .._kernels import kernel
from ..checkpoint import load_optimizer, save_checkpoint
from ..config import IGNORE_INDEX
from ..data import Batch
from ..layer import MoELayer
from ..lm_losses import multi_token_labels
from . import comm as C
from .layer import EXPERT_KEYS, ExpertParallelMoELayer

if TYPE_CHECKING:  # for the casts in save_checkpoint
    from ..models import TransformerLM
    from ..optim import AdamW


class _NoStopRequests:
    """Under MPI, SIGINT/SIGTERM keep their default action: a rank that stopped alone at a
    step boundary would leave the others waiting in a collective."""

    requested = None

    def close(self) -> None:
        pass


class ExpertParallel:
    """The experts of every MoE layer split over the ranks of `comm` (None: COMM_WORLD)."""

    def __init__(self, comm=None):
        self.comm = C.check_comm(comm)
        self.size, self.rank = self.comm.Get_size(), self.comm.Get_rank()
        self.is_root = self.rank == 0
        self.experts: Dict[str, Tuple[int, int]] = {}  # this rank's expert slices, by parameter name

    # ---- the run -------------------------------------------------------------------
    def check_run(self, model_cfg, train_cfg, out_dir: str, resume: bool) -> None:
        """Every rank must train the same run: rank 0's configs are sent to all, and any rank
        that differs stops every rank naming the field (MPMD launches with different flags
        trained different replicas, or ended in an MPI error stack)."""
        from ..train import first_difference  # the comparison --resume uses too
        mine = json.loads(json.dumps({"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                                      "out": os.path.abspath(out_dir), "resume": resume}))
        first = first_difference(self.comm.bcast(mine if self.is_root else None, root=0), mine)
        found = [(rank, d) for rank, d in enumerate(self.comm.allgather(first)) if d]
        if found:
            rank, (field, theirs, ours) = found[0]
            raise ValueError(f"expert_parallel: rank {rank} was started with {field} = {ours!r}, rank 0 "
                             f"with {theirs!r}; every rank must get the same flags")
        if train_cfg.batch_size < self.size:
            raise ValueError(f"batch_size: expected at least one window per MPI rank ({self.size}), "
                             f"got {train_cfg.batch_size}")

    def prepare(self, model) -> None:
        """Swap each block's MoELayer for its expert-parallel twin, in place, and note which
        parameters this rank holds a slice of (every other one is replicated)."""
        for b in model.blocks:
            if isinstance(b.ffn, MoELayer):
                # sync_grads all-reduces every replicated gradient at once, router included
                b.ffn = ExpertParallelMoELayer.from_layer(b.ffn, self.comm, reduce_replicated_grads=False)
        owner = {}
        for layer in model.moe_layers:
            for k, v in layer.params.items():
                if k in EXPERT_KEYS:
                    owner[id(v)] = layer.expert_range
        self.experts = {n: owner[id(p)] for n, p, _ in model.named_parameters() if id(p) in owner}

    def describe(self, model_cfg) -> Optional[str]:
        per_rank = model_cfg.moe.num_experts // self.size if model_cfg.moe else 0
        return f"expert parallel over {self.size} MPI ranks: {per_rank} experts per MoE layer on each rank"

    # ---- batches and statistics ------------------------------------------------------
    def rows(self, batch: Batch) -> Batch:
        """This rank's windows of a global batch (contiguous, in rank order). A rank left with
        none gets one all-padding window: it routes nothing and adds nothing to any loss, but
        keeps the model's shapes non-empty while the rank takes part in every collective."""
        rows = np.array_split(np.arange(batch.inputs.shape[0]), self.size)[self.rank]
        if len(rows) == 0:
            S = batch.inputs.shape[1]
            return Batch(np.zeros((1, S), np.int64), np.full((1, S), IGNORE_INDEX, np.int64),
                         np.zeros((1, S), bool), np.full((1, S), -1, np.int64))
        return Batch(batch.inputs[rows], batch.targets[rows], batch.mask[rows], batch.labels[rows])

    def head_shares(self, mine: Batch, whole: Batch, heads: int) -> Optional[List[float]]:
        """Each head's per-token mean is over the whole micro-batch's targets of that head
        (head i predicts t+1+i): a rank's own mean counts in proportion to its targets.
        Every rank holds the global batch, so it counts them without communicating."""
        def counts(b: Batch) -> np.ndarray:
            labels = multi_token_labels(b.targets, b.mask, heads, IGNORE_INDEX)
            return (labels != IGNORE_INDEX).reshape(heads, -1).sum(axis=1)
        m, total = counts(mine), counts(whole)
        return [float(m[i] / total[i]) if total[i] else 0.0 for i in range(heads)]

    def sum(self, values: np.ndarray) -> np.ndarray:
        return C.sum_in_rank_order(self.comm, values)

    # ---- gradients -----------------------------------------------------------------
    def _replicated(self, model) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        return ((n, p, g) for n, p, g in model.named_parameters() if n not in self.experts)

    def sync_grads(self, model) -> None:
        """Sum the replicated gradients over ranks: one Allreduce of one flat buffer per dtype.
        (A sum: each rank's loss is already weighted by its share of the global batch.)"""
        grads = [g for _, _, g in self._replicated(model)]
        if not grads or self.size == 1:
            return
        for dtype in sorted({g.dtype.str for g in grads}):
            group = [g for g in grads if g.dtype.str == dtype]
            flat = np.concatenate([g.ravel() for g in group])
            C.allreduce_sum_inplace(self.comm, flat)
            at = 0
            for g in group:
                g.ravel()[...] = flat[at:at + g.size]  # grads are C-contiguous: ravel is a view
                at += g.size

    def grad_norm(self, model) -> float:
        """The replicated part (the same on every rank after sync_grads) once, plus every
        rank's experts."""
        replicated = sum(kernel("sum_squares", g.dtype)(g=g) for _, _, g in self._replicated(model))
        mine = sum(kernel("sum_squares", g.dtype)(g=g) for n, _, g in model.named_parameters()
                   if n in self.experts)
        return math.sqrt(float(replicated) + float(self.sum(np.array([mine]))[0]))

    # ---- the run folder ------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, run) -> Iterator[None]:
        """Rank 0 holds the folder's lock for the whole run; every rank stops if it cannot."""
        lock = contextlib.ExitStack()
        refused = None
        if self.is_root:
            try:
                lock.enter_context(run.locked())
            except RuntimeError as e:
                refused = str(e)
        refused = self.comm.bcast(refused, root=0)
        if refused:
            raise RuntimeError(refused)
        with lock:
            yield
            self.comm.Barrier()  # the run folder is complete when any rank returns

    def barrier(self) -> None:
        self.comm.Barrier()

    def broadcast(self, value):
        return self.comm.bcast(value, root=0)

    def stop_requests(self) -> _NoStopRequests:
        return _NoStopRequests()

    def save_checkpoint(self, path: str, model, optim, step: int, train_cfg: dict) -> None:
        """Collective: gather every expert (weights and AdamW moments) on rank 0, which writes
        the single-process checkpoint to `path`."""
        # gather_blocks gives None on the other ranks: their dicts hold None, and are not read
        params: Dict[str, Optional[np.ndarray]] = {}
        state: Dict[str, Optional[np.ndarray]] = {"t": np.array(optim.t)}
        for n, p, _ in model.named_parameters():
            for prefix, a, into in (("", p, params), ("m.", optim.m[n], state), ("v.", optim.v[n], state)):
                into[prefix + n] = C.gather_blocks(self.comm, a, 0) if n in self.experts else a
        if self.is_root:  # which gathered every array: no None in params
            whole = _Whole(model, cast(Dict[str, np.ndarray], params), state)
            # _Whole has what save_checkpoint reads of a TransformerLM (cfg, moe_layers,
            # named_parameters) and of an AdamW (state_dict), with every rank's experts
            save_checkpoint(path, cast("TransformerLM", whole), cast("AdamW", whole), step, train_cfg)

    def load_optimizer(self, model, optim, data) -> None:
        load_optimizer(optim, data, self.experts)

    def model_warnings(self):
        """Warnings every rank would give alike (expert choice in a causal LM): rank 0's only."""
        stack = warnings.catch_warnings()
        if self.is_root:
            return stack
        return _ignoring(stack)

    def failed(self, message: str) -> str:
        return f"{message} on rank {self.rank}"


@contextlib.contextmanager
def _ignoring(stack):
    with stack:
        warnings.simplefilter("ignore", UserWarning)
        yield


class _Whole:
    """What save_checkpoint reads of a model and an optimiser, with the experts of every
    rank gathered: the file is the one a single-process run would write."""

    def __init__(self, model, params: Dict[str, np.ndarray], optim_state: dict):
        self.cfg, self.moe_layers = model.cfg, model.moe_layers
        self._params, self._optim = params, optim_state

    def named_parameters(self):
        return ((n, p, None) for n, p in self._params.items())

    def state_dict(self):
        return self._optim
