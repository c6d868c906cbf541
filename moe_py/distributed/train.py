"""Expert-parallel training: moe_py.train's step and loop, run by every rank of an MPI job.

Each global batch (the single-process run's) is split by rows: rank r takes windows
[r B/P, (r+1) B/P) of every micro-batch, so the global token order is rank order, as the
expert-parallel layer assumes. The dense parts are data parallel (replicated, gradients
summed over ranks in one Allreduce); the MoE layers are expert parallel. Each rank weights
its tokens' loss by n_r / N (N: the step's real targets over all ranks), so the summed
gradient is that of the global per-token mean: the single-process gradient, also with
uneven padding. Rank 0 alone writes the run folder; its checkpoints hold every expert, so
`sample`, `analyze` and a resume at another P (any P dividing E) read them.

Equal to the single-process run up to floating-point reassociation of the cross-rank sums,
multi-token heads included: each head's mean is over the global micro-batch's targets of
that head (every rank holds the global batch, so it counts them without communicating).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import List, Optional

import numpy as np

from .._checks import NonFiniteError
from ..checkpoint import load_model
from ..config import IGNORE_INDEX
from ..data import Batch, BatchSampler, Corpus, corpus_summary
from ..lm_losses import cross_entropy, multi_token_cross_entropy, multi_token_labels
from ..models import ModelConfig, TransformerLM
from ..optim import AdamW, lr_at
from ..run_folder import RunFolder
from ..train import (TrainConfig, TrainingDiverged, _StepStats, add_collapse_watch, add_speed,
                     check_resumable, collapse_watch_of, diverged, first_difference,
                     print_collapse_summary, progress_bar, run_inputs, show_step, train_sampler_of,
                     val_sampler_of)
from . import comm as C
from .model import (allreduce_replicated_grads, global_grad_norm, load_expert_slices,
                    save_gathered_checkpoint, to_expert_parallel)


def local_rows(batch: Batch, comm) -> Batch:
    """This rank's windows of a global batch (contiguous, in rank order). A rank left with
    none gets one all-padding window: it routes nothing and adds nothing to any loss, but
    keeps the model's shapes non-empty while the rank takes part in every collective."""
    rows = np.array_split(np.arange(batch.inputs.shape[0]), comm.Get_size())[comm.Get_rank()]
    if len(rows) == 0:
        S = batch.inputs.shape[1]
        return Batch(np.zeros((1, S), np.int64), np.full((1, S), IGNORE_INDEX, np.int64),
                     np.zeros((1, S), bool), np.full((1, S), -1, np.int64))
    return Batch(batch.inputs[rows], batch.targets[rows], batch.mask[rows], batch.labels[rows])


def _reduce_stats(stats: _StepStats, comm) -> None:
    """The per-token sums each rank gathered over its own tokens, summed over ranks (the
    layer losses, aux loss and tokens_per_expert are already global)."""
    n = len(stats.real)
    mine = np.concatenate(([stats.nll, stats.n_targets], stats.entropy_sum, stats.noisy_entropy_sum,
                           stats.real, stats.dropped, stats.slots, stats.unrouted)).astype(np.float64)
    tot = C.sum_in_rank_order(comm, mine)
    stats.nll, stats.n_targets = float(tot[0]), int(tot[1])
    parts = [tot[2 + i * n:2 + (i + 1) * n] for i in range(6)]
    stats.entropy_sum = [float(v) for v in parts[0]]
    stats.noisy_entropy_sum = [float(v) for v in parts[1]]
    stats.real, stats.dropped, stats.slots, stats.unrouted = ([int(v) for v in p] for p in parts[2:])


def _head_counts(b: Batch, heads: int) -> np.ndarray:
    """Targets of each head (head i predicts t+1+i) in a batch."""
    labels = multi_token_labels(b.targets, b.mask, heads, IGNORE_INDEX)
    return (labels != IGNORE_INDEX).reshape(heads, -1).sum(axis=1)


def loss_and_backward(model: TransformerLM, b: Batch, whole: Batch, loss_weight: float,
                      aux_weight: float) -> dict:
    """TransformerLM.loss_and_backward for this rank's rows `b` of the micro-batch `whole`:
    every head's per-token mean is over the whole micro-batch (a rank's own mean, scaled by
    its share of that head's targets), so the ranks' gradients add up to the single-process
    one. Returns the rank's own per-head means, as loss_and_backward does."""
    out = model.forward(b.inputs, b.mask, training=True)
    for i, logits in enumerate(out.head_logits):
        if not np.isfinite(logits).all():
            raise NonFiniteError(f"the logits of head {i} are not finite")
    losses, grads = multi_token_cross_entropy(out.head_logits, b.targets, b.mask, IGNORE_INDEX)
    H = len(grads)
    mine, total = _head_counts(b, H), _head_counts(whole, H)
    # Python floats: a NumPy float64 scalar would turn float32 gradients into float64
    scales = [float(loss_weight / H * (mine[i] / total[i] if total[i] else 0.0)) for i in range(H)]
    model.backward([g * s for g, s in zip(grads, scales)], aux_weight)
    return {"head_losses": losses, "loss": float(np.mean(losses)), "aux_loss": out.aux_loss,
            "layer_losses": out.layer_losses, "routers": out.routers}


def train_step(model: TransformerLM, batches: List[Batch], optim: AdamW, lr: float,
               train_cfg: TrainConfig, comm, experts) -> dict:
    """One optimiser step over the global micro-batches `batches` (every rank passes the
    same ones and takes its rows); moe_py.train.train_step's contract and metrics."""
    M = len(batches)
    n_total = sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches)
    n_moe = len(model.moe_layers)
    model.zero_grad()
    stats = _StepStats([layer.cfg.router for layer in model.moe_layers])
    noise_std = model.moe_layers[0].noise_std if n_moe else 0.0
    for gb in batches:
        b = local_rows(gb, comm)
        n = int((b.targets != IGNORE_INDEX).sum())
        n_whole = int((gb.targets != IGNORE_INDEX).sum())
        try:
            # the single-process weight of this micro-batch, n_whole / n_total, shared out by
            # loss_and_backward in proportion to each rank's targets
            res = loss_and_backward(model, b, gb, n_whole / max(1, n_total), 1.0 / M)
        except NonFiniteError as e:
            # raised on one rank while the others wait in a collective: abort the job
            raise TrainingDiverged(f"non-finite loss or gradient on rank {comm.Get_rank()} ({e})") from None
        stats.add(res, n, res["head_losses"][0] if n else 0.0, b.mask)
    _reduce_stats(stats, comm)
    m = stats.metrics(M)
    allreduce_replicated_grads(model, comm, experts)
    gnorm = global_grad_norm(model, comm, experts)
    if not (math.isfinite(m["loss"]) and math.isfinite(gnorm) and math.isfinite(m["aux_loss"])):
        raise TrainingDiverged(f"non-finite loss or gradient (loss={m['loss']}, grad_norm={gnorm})")
    scale = min(1.0, train_cfg.grad_clip / (gnorm + 1e-12)) if train_cfg.grad_clip > 0 else 1.0
    optim.step(lr, scale)
    model.update_expert_bias()  # from the global loads: the same step on every rank
    m.update(grad_norm=gnorm, lr=lr, noise_std=noise_std,
             tokens=sum(int(b.mask.sum()) for b in batches))
    return m


def evaluate(model: TransformerLM, sampler: BatchSampler, max_batches: Optional[int], comm) -> float:
    """moe_py.train.evaluate over the ranks: each routes its rows of every held-out batch."""
    total, count = 0.0, 0
    for gb in sampler.iter_eval(max_batches):
        b = local_rows(gb, comm)
        out = model.forward(b.inputs, b.mask, training=False)
        n = int((b.targets != IGNORE_INDEX).sum())
        if n:
            loss, _ = cross_entropy(out.head_logits[0], b.targets, IGNORE_INDEX)
            total += loss * n
            count += n
    total, count = C.sum_in_rank_order(comm, np.array([total, count]))
    return float(total / count) if count else float("nan")


@contextlib.contextmanager
def _root_warns(root: bool):
    """Warnings every rank would give alike (expert choice in a causal LM): rank 0's only."""
    with warnings.catch_warnings():
        if not root:
            warnings.simplefilter("ignore", UserWarning)
        yield


def _check_same_configs(comm, model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str,
                        resume: bool) -> None:
    """Every rank must train the same run: rank 0's configs are sent to all, and any rank
    that differs stops every rank naming the field (MPMD launches with different flags
    trained different replicas, or ended in an MPI error stack)."""
    mine = json.loads(json.dumps({"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                                  "out": os.path.abspath(out_dir), "resume": resume}))
    first = first_difference(comm.bcast(mine if comm.Get_rank() == 0 else None, root=0), mine)
    found = [(rank, d) for rank, d in enumerate(comm.allgather(first)) if d]
    if found:
        rank, (field, theirs, ours) = found[0]
        raise ValueError(f"expert_parallel: rank {rank} was started with {field} = {ours!r}, rank 0 with "
                         f"{theirs!r}; every rank must get the same flags")


def _check_supported(train_cfg: TrainConfig, comm) -> None:
    if train_cfg.batch_size < comm.Get_size():
        raise ValueError(f"batch_size: expected at least one window per MPI rank "
                         f"({comm.Get_size()}), got {train_cfg.batch_size}")


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str, comm=None,
          corpus: Optional[Corpus] = None, resume: bool = False, quiet: bool = False,
          until: Optional[int] = None, overwrite: bool = False) -> dict:
    """moe_py.train.train, expert-parallel over `comm` (a collective: every rank calls it
    with the same arguments). Returns the last step's metrics on every rank."""
    comm = C.check_comm(comm)
    root = comm.Get_rank() == 0
    _check_same_configs(comm, model_cfg, train_cfg, out_dir, resume)
    _check_supported(train_cfg, comm)
    run = RunFolder(out_dir)
    # rank 0 holds the folder's lock for the whole run; every rank stops if it cannot
    lock = contextlib.ExitStack()
    refused = None
    if root:
        try:
            lock.enter_context(run.locked())
        except RuntimeError as e:
            refused = str(e)
    refused = comm.bcast(refused, root=0)
    if refused:
        raise RuntimeError(refused)
    with lock:
        # every rank decides from the same files before rank 0 changes any of them
        if resume and not os.path.exists(run.checkpoint):
            raise FileNotFoundError(f"resume: no checkpoint.npz in {out_dir} to resume from")
        refuse = not resume and run.holds_run() and not overwrite
        comm.Barrier()
        if refuse:
            raise ValueError(f"out: {out_dir} already holds a run: resume it (--resume), replace "
                             "it (--overwrite), or choose another folder")
        train_cfg, corpus = run_inputs(model_cfg, train_cfg, corpus)  # may refuse: nothing touched yet
        if root:
            if not resume and run.holds_run():
                run.clear()
            run.remove_stale_temporaries()

        start, write_config = 0, not resume
        if resume:
            with _root_warns(root):
                model, data = load_model(run.checkpoint)  # the whole model; each rank keeps its experts
            write_config = check_resumable(run, data, model_cfg, train_cfg)
            experts = to_expert_parallel(model, comm)
            optim = AdamW(model.named_parameters(), weight_decay=train_cfg.weight_decay)
            load_expert_slices(model, optim, data, experts)
            start = int(data["step"])
            if train_cfg.steps < start:
                raise ValueError(f"steps: the run in {out_dir} is at step {start}; expected steps >= "
                                 f"{start}, got {train_cfg.steps}")
            if root:
                run.truncate_metrics(start)
                run.steps_after(start)
        else:
            with _root_warns(root):
                model = TransformerLM(model_cfg)
            experts = to_expert_parallel(model, comm)
            optim = AdamW(model.named_parameters(), weight_decay=train_cfg.weight_decay)
            if train_cfg.noise_std > 0:
                model.set_noise_annealing(train_cfg.noise_std, train_cfg.noise_anneal_steps)
            if root:
                run.start_metrics()
        if root and write_config:  # on resume: only when --steps extends the run
            run.write_config(model.cfg, train_cfg, corpus)

        train_sampler = train_sampler_of(corpus, train_cfg)
        val_sampler = val_sampler_of(corpus, train_cfg)
        if root and not quiet:
            print(corpus_summary(corpus, val_sampler, train_cfg.eval_batches), file=sys.stderr)
            print(f"expert parallel over {comm.Get_size()} MPI ranks: "
                  f"{model_cfg.moe.num_experts // comm.Get_size() if model_cfg.moe else 0} experts "
                  f"per MoE layer on each rank", file=sys.stderr)
        bar = progress_bar(train_cfg.steps, start) if root and not quiet else None
        M = train_cfg.grad_accum
        watch = collapse_watch_of(train_cfg, run)
        last: dict = {}
        end = train_cfg.steps if until is None else min(until, train_cfg.steps)
        try:
            for step in range(start, end):
                t0 = time.perf_counter()
                batches = [train_sampler.batch(step * M + i) for i in range(M)]
                lr = lr_at(step, train_cfg.lr, train_cfg.warmup, train_cfg.lr_decay_steps,
                           train_cfg.min_lr_ratio)
                try:
                    m = {"step": step + 1, **train_step(model, batches, optim, lr, train_cfg, comm, experts)}
                except TrainingDiverged as e:
                    raise diverged(e, step + 1, run) from None
                add_speed(m, t0)  # rank 0's RSS is the one written
                if (step + 1) % train_cfg.eval_every == 0 or step + 1 == train_cfg.steps:
                    m["val_loss"] = evaluate(model, val_sampler, train_cfg.eval_batches, comm)
                add_collapse_watch(m, watch, bar, final=step + 1 == train_cfg.steps, warn=root)
                if root:
                    run.append_metrics(m)
                if (step + 1) % train_cfg.checkpoint_every == 0 or step + 1 == end:
                    path = run.step_checkpoint(step + 1) if root else ""
                    save_gathered_checkpoint(path, model, optim, step + 1, dataclasses.asdict(train_cfg),
                                             comm, experts)
                    if root:
                        run.publish(path, max(1, train_cfg.keep_checkpoints))
                if bar is not None:
                    show_step(bar, m)
                last = m
        finally:
            if bar is not None:
                bar.close()
        if root and not quiet:
            print_collapse_summary(last)
        comm.Barrier()  # the run folder is complete when any rank returns
        return last
