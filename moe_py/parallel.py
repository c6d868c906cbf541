"""How the processes of one training run share it: the trainer (moe_py/train.py) is one loop
for any number of processes, and a Parallel strategy supplies what differs.

SingleProcess (here) holds the whole model in one process. ExpertParallel
(moe_py/distributed/parallel.py) spreads every MoE layer's experts over the ranks of an MPI
job and keeps the rest replicated. Each strategy supplies:

  rows          which rows of every global batch this process trains and evaluates on
  head_shares   each head's share of the batch's targets that this process holds
  sum           the reduction of per-token statistics over processes (in rank order)
  sync_grads    the gradient sync (replicated weights: summed over processes)
  grad_norm     the norm of the whole model's gradient
  is_root       the one process that writes the run folder and prints
  save_checkpoint / load_optimizer   checkpoint I/O of the whole model

As nanoGPT and llm.c do, the loop never asks how many processes there are: it asks the
strategy.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, List, Optional, Protocol

import numpy as np

from .checkpoint import load_optimizer, save_checkpoint
from .data import Batch
from .interrupts import StopRequests
from .optim import global_grad_norm


class Parallel(Protocol):
    """What the trainer asks of a strategy (SingleProcess documents each method)."""

    is_root: bool

    def check_run(self, model_cfg, train_cfg, out_dir: str, resume: bool) -> None: ...
    def prepare(self, model) -> None: ...
    def describe(self, model_cfg) -> Optional[str]: ...
    def rows(self, batch: Batch) -> Batch: ...
    def head_shares(self, mine: Batch, whole: Batch, heads: int) -> Optional[List[float]]: ...
    def sum(self, values: np.ndarray) -> np.ndarray: ...
    def sync_grads(self, model) -> None: ...
    def grad_norm(self, model) -> float: ...
    def locked(self, run) -> ContextManager[None]: ...
    def barrier(self) -> None: ...
    def broadcast(self, value): ...
    def stop_requests(self): ...
    def save_checkpoint(self, path: str, model, optim, step: int, train_cfg: dict) -> None: ...
    def load_optimizer(self, model, optim, data) -> None: ...
    def model_warnings(self) -> ContextManager: ...
    def failed(self, message: str) -> str: ...


class SingleProcess:
    """The whole model in this process: every method is the identity or a direct call."""

    size = 1
    rank = 0
    is_root = True

    def check_run(self, model_cfg, train_cfg, out_dir: str, resume: bool) -> None:
        """Refuse, before anything is touched, a run this strategy cannot train."""

    def prepare(self, model) -> None:
        """Make a freshly built or loaded model this process's part of the run."""

    def describe(self, model_cfg) -> Optional[str]:
        """One line on how the run is spread over processes (None: nothing to say)."""
        return None

    def rows(self, batch: Batch) -> Batch:
        return batch

    def head_shares(self, mine: Batch, whole: Batch, heads: int) -> Optional[List[float]]:
        """Each head's share of `whole`'s targets that `mine` holds (None: all of them)."""
        return None

    def sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def sync_grads(self, model) -> None:
        pass

    def grad_norm(self, model) -> float:
        return global_grad_norm(g for _, _, g in model.named_parameters())

    @contextlib.contextmanager
    def locked(self, run) -> Iterator[None]:
        """The run folder locked for the whole run (a second trainer is refused)."""
        with run.locked():
            yield

    def barrier(self) -> None:
        pass

    def broadcast(self, value):
        """Root's value on every process (the run folder's name, a decision)."""
        return value

    def stop_requests(self) -> StopRequests:
        return StopRequests()

    def save_checkpoint(self, path: str, model, optim, step: int, train_cfg: dict) -> None:
        save_checkpoint(path, model, optim, step, train_cfg)

    def load_optimizer(self, model, optim, data) -> None:
        load_optimizer(optim, data)

    def model_warnings(self):
        """Around building or loading a model: warnings every process would give alike."""
        return contextlib.nullcontext()

    def failed(self, message: str) -> str:
        """A failure message, naming the process where it matters."""
        return message
