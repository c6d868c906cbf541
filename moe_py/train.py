"""Training: `train_step` (one optimiser step, no I/O) and `train`, the loop around it
(schedule, validation, metrics and checkpoints in a RunFolder, exact resume).

The logged `loss` is the true per-token mean of the next-token cross-entropy
over every real token of the step (all micro-batches), not a sum of
micro-batch means. Aux losses are averaged over micro-batches.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union, cast

import numpy as np

from .config import check_seed, config_from_dict, finite_number, plain_scalars, positive_int
from ._checks import NonFiniteError
from .checkpoint import load_model
from .data import Batch, BatchSampler, Corpus, corpus_summary, load_corpus
from .config import IGNORE_INDEX
from .interrupts import TrainingInterrupted
from .lm_losses import cross_entropy
from .machine import rss_mib
from .memory_estimate import check_memory
from .models import ModelConfig, TransformerLM
from .collapse import CollapseWatch, summary_lines, worst_max_over_mean
from .optim import AdamW, lr_at
from .parallel import Parallel, SingleProcess
from .progress import LOG_EVERY, progress_bar
from .router import balance_distribution, row_entropy, unrouted_tokens
from .routing_trace import FILE as TRACE_FILE, TraceWriter, records_of
from .run_folder import RunFolder
from .telemetry import load_metrics


@dataclass
class TrainConfig:
    corpus: str = "python"  # python | synthetic | a text file or folder
    steps: int = 400  # optimiser steps
    batch_size: int = 16  # windows per micro-batch
    seq_len: int = 128  # bytes per window
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-3  # peak learning rate
    warmup: int = 30  # linear warm-up steps, then cosine decay
    lr_decay_steps: int = 0  # step where the cosine reaches min_lr_ratio (0: steps; kept on resume)
    min_lr_ratio: float = 0.1  # final learning rate as a share of lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    eval_every: int = 50  # steps between validation losses
    eval_batches: int = 8  # validation batches per evaluation
    checkpoint_every: int = 100  # steps between checkpoints
    keep_checkpoints: int = 5  # step checkpoints kept in checkpoints/ (0: only the latest)
    noise_std: float = 0.0  # NoisyTop-k start std (0: off)
    noise_anneal_steps: int = 0  # steps to anneal the noise to 0 (0: steps; kept on resume)
    seed: int = 0  # seed of the weights and the batch order; never moves the validation split
    split_seed: int = 0  # seed of the train/validation split and held-out sample (and of the synthetic corpus)
    collapse_low_share: float = 0.1  # warn when an expert's share stays below this x uniform
    collapse_max_over_mean: float = 3.0  # warn when the largest share stays above this x uniform
    collapse_steps: int = 20  # steps in a row before a collapse warning (once per layer)
    corpus_bytes: int = 2_000_000  # bytes read of the python corpus

    def __post_init__(self) -> None:
        plain_scalars(self)
        check_seed(self.seed)
        check_seed(self.split_seed, "split_seed")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every", "collapse_steps"):
            positive_int(name, getattr(self, name))
        for name in ("lr", "weight_decay", "grad_clip", "noise_std", "min_lr_ratio",
                     "collapse_low_share", "collapse_max_over_mean"):
            finite_number(name, getattr(self, name))
        for name in ("warmup", "noise_anneal_steps", "lr_decay_steps", "keep_checkpoints"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict, what: str = "train config") -> "TrainConfig":
        """From a config.json's "train" (ValueError naming `what` when it is not a valid one).
        Runs made before split_seed existed split the data by their seed: they keep that
        split, so that they resume and analyse as they were."""
        if isinstance(d, dict):
            d = dict(d)
            d.setdefault("split_seed", d.get("seed", 0))
        return config_from_dict(cls, d, what)


def corpus_of(train_cfg: TrainConfig) -> Corpus:
    """The corpus a run trains on: its name or path, its size and its split seed."""
    return load_corpus(train_cfg.corpus, split_seed=train_cfg.split_seed, max_bytes=train_cfg.corpus_bytes)


def train_sampler_of(corpus: Corpus, train_cfg: TrainConfig) -> BatchSampler:
    """Training batches: their order is the run's seed."""
    return BatchSampler(corpus.train, train_cfg.batch_size, train_cfg.seq_len, train_cfg.seed)


def val_sampler_of(corpus: Corpus, train_cfg: TrainConfig) -> BatchSampler:
    """The held-out sample: fixed by the split seed, so that every seed and every arm of a
    comparison reads the same validation windows."""
    return BatchSampler(corpus.val, train_cfg.batch_size, train_cfg.seq_len, train_cfg.split_seed)


class TrainingDiverged(RuntimeError):
    pass


def diverged(cause: Exception, step: int, run: RunFolder) -> TrainingDiverged:
    """The one message of a run that met NaN/Inf: the step, the cause, and what is kept."""
    kept = (f"the last good checkpoint is untouched: {run.checkpoint}" if os.path.exists(run.checkpoint)
            else "no checkpoint had been written yet")
    return TrainingDiverged(f"training diverged at step {step}: {cause}; training stopped, {kept}")


def evaluate(model: TransformerLM, sampler: BatchSampler, max_batches: Optional[int],
             parallel: Optional[Parallel] = None, routing: Optional[list] = None) -> float:
    """Per-token mean next-token loss over the validation batches (eval mode, no noise);
    each process routes its rows of every batch. routing: one intervention per MoE layer
    (moe_py/interventions.py) applied to every batch (ablation, pruning, a top-k override)."""
    parallel = parallel or SingleProcess()
    total, count = 0.0, 0
    for whole in sampler.iter_eval(max_batches):
        batch = parallel.rows(whole)
        out = model.forward(batch.inputs, batch.mask, training=False, routing=routing)
        n = int((batch.targets != IGNORE_INDEX).sum())
        if n:
            loss, _ = cross_entropy(out.head_logits[0], batch.targets, IGNORE_INDEX)
            total += loss * n
            count += n
    total, count = parallel.sum(np.array([total, count], np.float64))
    return float(total / count) if count else float("nan")


class _StepStats:
    """Accumulates one step's numbers over its micro-batches."""

    def __init__(self, routers: List[str]):
        n_layers = len(routers)
        self.routers = routers
        self.nll = 0.0
        self.n_targets = 0
        self.aux = 0.0
        self.layer_losses: List[Dict[str, float]] = [dict(load_balance=0.0, z_loss=0.0, entropy=0.0)
                                                     for _ in range(n_layers)]
        self.tokens_per_expert: List[Optional[np.ndarray]] = [None] * n_layers  # None until add()
        self.entropy_sum = [0.0] * n_layers
        self.noisy_entropy_sum = [0.0] * n_layers
        self.real = [0] * n_layers
        self.dropped = [0] * n_layers
        self.slots = [0] * n_layers
        self.unrouted = [0] * n_layers

    def add(self, result: dict, n_targets: int, head0_loss: float, mask: np.ndarray) -> None:
        self.nll += head0_loss * n_targets
        self.n_targets += n_targets
        self.aux += result["aux_loss"]
        real = mask.reshape(-1)
        for i, (r, ll) in enumerate(zip(result["routers"], result["layer_losses"])):
            for k, v in ll.items():
                self.layer_losses[i][k] += v
            tpe = r.tokens_per_expert
            self.tokens_per_expert[i] = tpe if self.tokens_per_expert[i] is None else self.tokens_per_expert[i] + tpe
            self.entropy_sum[i] += float(r.entropy[real].sum())
            # sigmoid scores: the entropy of each token's scores normalised, as "entropy"
            p = balance_distribution(r.router_probs, real, self.routers[i])[real].astype(np.float64)
            self.noisy_entropy_sum[i] += float(row_entropy(p).sum())
            self.real[i] += int(real.sum())
            self.dropped[i] += int(r.dropped.sum())
            self.slots[i] += int(real.sum()) * r.topk_indices.shape[1]
            self.unrouted[i] += int(unrouted_tokens(r, real).sum())

    def reduce(self, parallel: Parallel) -> None:
        """The per-token sums each process gathered over its own tokens, summed over
        processes (the layer losses, aux loss and tokens_per_expert are already global)."""
        n = len(self.real)
        mine = np.concatenate(([self.nll, self.n_targets], self.entropy_sum, self.noisy_entropy_sum,
                               self.real, self.dropped, self.slots, self.unrouted)).astype(np.float64)
        tot = parallel.sum(mine)
        if tot is mine:  # one process: the sums are already the totals
            return
        self.nll, self.n_targets = float(tot[0]), int(tot[1])
        parts = [tot[2 + i * n:2 + (i + 1) * n] for i in range(6)]
        self.entropy_sum = [float(v) for v in parts[0]]
        self.noisy_entropy_sum = [float(v) for v in parts[1]]
        self.real, self.dropped, self.slots, self.unrouted = ([int(v) for v in p] for p in parts[2:])

    def metrics(self, micro: int) -> dict:
        out: Dict[str, Union[float, List[float], List[List[float]]]] = {
            "loss": self.nll / self.n_targets if self.n_targets else 0.0,
            "aux_loss": self.aux / micro}
        if self.tokens_per_expert and self.tokens_per_expert[0] is not None:
            out["load_balance"] = [ll["load_balance"] / micro for ll in self.layer_losses]
            out["z_loss"] = [ll["z_loss"] / micro for ll in self.layer_losses]
            out["entropy"] = [e / max(1, r) for e, r in zip(self.entropy_sum, self.real)]
            # of the probabilities after noise: equal to "entropy" when noise is off
            out["entropy_noisy"] = [e / max(1, r) for e, r in zip(self.noisy_entropy_sum, self.real)]
            # add() sets every layer's at once: [0] is not None, so none is
            loads = cast(List[np.ndarray], self.tokens_per_expert)
            out["expert_share"] = [(t / max(1, t.sum())).round(6).tolist() for t in loads]
            out["drop_rate"] = [d / max(1, s) for d, s in zip(self.dropped, self.slots)]
            # real tokens no expert processes (expert choice leaves some; capacity drops too)
            out["unrouted"] = [u / max(1, r) for u, r in zip(self.unrouted, self.real)]
            # load_min .. load_p95 (shares of the uniform load), assignments before and after
            # capacity, dead_share: from the global loads and the reduced drops
            out.update(load_metrics(loads, self.dropped))
        return out


def train_step(model: TransformerLM, batches: List[Batch], optim: AdamW, lr: float,
               train_cfg: TrainConfig, parallel: Optional[Parallel] = None,
               on_routing: Optional[Callable[[int, list, tuple], None]] = None) -> dict:
    """One optimiser step over the global micro-batches `batches` (each process takes its
    rows of them): no I/O, no timing.

    The gradient is that of the per-token mean loss over every real target of the step
    plus the aux losses averaged over micro-batches; it is clipped to train_cfg.grad_clip.
    Returns the step's metrics; raises TrainingDiverged (before updating anything) when
    the loss or the gradient is not finite. on_routing(micro_batch, routers, shape) sees each
    micro-batch's RouterOutputs (the routing trace)."""
    parallel = parallel or SingleProcess()
    M = len(batches)
    n_total = sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches)
    model.zero_grad()
    stats = _StepStats([layer.cfg.router for layer in model.moe_layers])
    noise_std = model.moe_layers[0].noise_std if model.moe_layers else 0.0
    for micro, whole in enumerate(batches):
        b = parallel.rows(whole)
        n = int((b.targets != IGNORE_INDEX).sum())
        n_whole = int((whole.targets != IGNORE_INDEX).sum())
        try:
            # weight n_whole/N makes the summed gradient that of the per-token mean over the step
            res = model.loss_and_backward(
                b.inputs, b.targets, b.mask, training=True, loss_weight=n_whole / max(1, n_total),
                aux_weight=1.0 / M, head_shares=parallel.head_shares(b, whole, len(model.heads)))
        except NonFiniteError as e:
            # under MPI, raised on one rank while the others wait in a collective: the job aborts
            raise TrainingDiverged(f"{parallel.failed('non-finite loss or gradient')} ({e})") from None
        stats.add(res, n, res["head_losses"][0] if n else 0.0, b.mask)
        if on_routing is not None:
            on_routing(micro, res["routers"], b.inputs.shape)
    stats.reduce(parallel)
    m = stats.metrics(M)
    parallel.sync_grads(model)
    gnorm = parallel.grad_norm(model)
    if not (math.isfinite(m["loss"]) and math.isfinite(gnorm) and math.isfinite(m["aux_loss"])):
        raise TrainingDiverged(f"non-finite loss or gradient (loss={m['loss']}, grad_norm={gnorm})")
    scale = min(1.0, train_cfg.grad_clip / (gnorm + 1e-12)) if train_cfg.grad_clip > 0 else 1.0
    optim.step(lr, scale)
    model.update_expert_bias()  # from the global loads: the same step in every process
    m.update(grad_norm=gnorm, lr=lr, noise_std=noise_std,
             tokens=sum(int(b.mask.sum()) for b in batches))
    return m


def with_fixed_horizons(train_cfg: TrainConfig) -> TrainConfig:
    """train_cfg with lr_decay_steps and noise_anneal_steps of 0 set to its steps: the
    horizons are fixed when a run starts (and saved in its config.json), so that extending
    the run later keeps its past schedule."""
    if not train_cfg.lr_decay_steps:
        train_cfg = dataclasses.replace(train_cfg, lr_decay_steps=train_cfg.steps)
    if not train_cfg.noise_anneal_steps:
        train_cfg = dataclasses.replace(train_cfg, noise_anneal_steps=train_cfg.steps)
    return train_cfg


def first_difference(a, b, prefix: str = ""):
    """The first (sorted) dotted field where two JSON-like dicts differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else (prefix[:-1], a, b)


def check_resumable(run: RunFolder, data: dict, model_cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
    """Refuse to resume when the checkpoint, config.json and the configs asked for are not
    one run (all but train.steps, which --resume may extend), naming the first differing
    field; nothing in the folder has been touched then. Returns whether --steps changed, the
    only reason to rewrite config.json."""
    def norm(d):
        return json.loads(json.dumps(d))

    def train_dict(d):
        return {k: v for k, v in dataclasses.asdict(TrainConfig.from_dict(d)).items() if k != "steps"}
    ckpt_model = norm(json.loads(str(data["model_config"])))
    ckpt_train = train_dict(json.loads(str(data["train_config"])))
    saved = run.read_config()
    pairs = (("config.json", ckpt_model, norm(saved.get("model")), ckpt_train, train_dict(saved.get("train") or {})),
             ("the configs given", ckpt_model, norm(model_cfg.to_dict()), ckpt_train,
              {k: v for k, v in dataclasses.asdict(train_cfg).items() if k != "steps"}))
    for source, m_ckpt, m_other, t_ckpt, t_other in pairs:
        d = first_difference({"model": m_ckpt, "train": t_ckpt}, {"model": m_other, "train": t_other})
        if d:
            raise ValueError(f"resume: {run.path}: {d[0]} is {d[1]!r} in its checkpoint but {d[2]!r} in "
                             f"{source}: not the same run; nothing was changed (start a new run, or "
                             "--overwrite)")
    return saved["train"].get("steps") != train_cfg.steps


def run_inputs(model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Optional[Corpus]):
    """What a run derives before it starts: the schedule's horizons fixed, the corpus, and
    the sizes checked. Returns (train_cfg, corpus)."""
    train_cfg = with_fixed_horizons(train_cfg)
    if corpus is None:
        corpus = corpus_of(train_cfg)
    if model_cfg.max_seq_len < train_cfg.seq_len:
        raise ValueError(f"seq_len: expected at most max_seq_len={model_cfg.max_seq_len}, got {train_cfg.seq_len}")
    check_memory(model_cfg, train_cfg)
    return train_cfg, corpus


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, out_dir: str, corpus: Optional[Corpus] = None,
          resume: bool = False, quiet: bool = False, until: Optional[int] = None,
          overwrite: bool = False, on_step: Optional[Callable[[dict], None]] = None,
          parallel: Optional[Parallel] = None, trace_routing: bool = False,
          log_every: int = LOG_EVERY) -> dict:
    """Train (or resume from out_dir/checkpoint.npz) into out_dir; returns the last
    step's metrics. A folder that already holds a run is refused unless `resume` (continue
    it, to train_cfg.steps) or `overwrite` (replace it). `until` stops after that step, as
    an interruption would (the schedule is unchanged). `on_step(metrics)` is called after
    each step is logged (e.g. to drive a caller's own progress bars when `quiet`). Progress
    goes to stderr: a tqdm bar on a terminal, else a line every `log_every` steps
    (moe_py/progress.py); `quiet` prints nothing. The
    folder is locked for the whole call: a second trainer is refused.

    `parallel` spreads the run over processes (moe_py/parallel.py; default SingleProcess).
    With moe_py.distributed.ExpertParallel every rank of an MPI job calls train with the
    same arguments; rank 0 alone writes the folder and prints, and every rank returns the
    last step's metrics."""
    parallel = parallel or SingleProcess()
    parallel.check_run(model_cfg, train_cfg, out_dir, resume)
    if trace_routing and not isinstance(parallel, SingleProcess):  # refused before anything is touched
        raise NotImplementedError("trace_routing: the routing trace is written by one process; "
                                  "under --expert-parallel it is not supported yet")
    run = RunFolder(out_dir)
    if resume and not os.path.exists(run.checkpoint):
        raise FileNotFoundError(f"resume: no checkpoint.npz in {out_dir} to resume from")
    with parallel.locked(run):
        return _train_locked(run, model_cfg, train_cfg, corpus, resume, quiet, until, overwrite, on_step,
                             parallel, trace_routing, log_every)


def _train_locked(run: RunFolder, model_cfg: ModelConfig, train_cfg: TrainConfig, corpus: Optional[Corpus],
                  resume: bool, quiet: bool, until: Optional[int], overwrite: bool,
                  on_step: Optional[Callable[[dict], None]], parallel: Parallel,
                  trace_routing: bool = False, log_every: int = LOG_EVERY) -> dict:
    out_dir, root = run.path, parallel.is_root
    refuse = not resume and run.holds_run() and not overwrite
    parallel.barrier()  # every process decides from the same files before the root changes any
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
        with parallel.model_warnings():
            model, data = load_model(run.checkpoint)  # the whole model: a process keeps its part
        write_config = check_resumable(run, data, model_cfg, train_cfg)
        parallel.prepare(model)
        optim = AdamW(model.named_parameters(), weight_decay=train_cfg.weight_decay)
        parallel.load_optimizer(model, optim, data)
        start = int(data["step"])
        if train_cfg.steps < start:
            raise ValueError(f"steps: the run in {out_dir} is at step {start}; expected steps >= "
                             f"{start}, got {train_cfg.steps}")
        if root:
            run.truncate_metrics(start)
            run.steps_after(start)
    else:
        with parallel.model_warnings():
            model = TransformerLM(model_cfg)
        parallel.prepare(model)
        optim = AdamW(model.named_parameters(), weight_decay=train_cfg.weight_decay)
        if train_cfg.noise_std > 0:
            model.set_noise_annealing(train_cfg.noise_std, train_cfg.noise_anneal_steps)
        if root:
            run.start_metrics()
    if root and write_config:  # a resumed run's config.json changes only when --steps extends it
        run.write_config(model.cfg, train_cfg, corpus)

    train_sampler = train_sampler_of(corpus, train_cfg)
    val_sampler = val_sampler_of(corpus, train_cfg)
    talk = root and not quiet
    if talk:
        print(corpus_summary(corpus, val_sampler, train_cfg.eval_batches), file=sys.stderr)
        spread = parallel.describe(model_cfg)
        if spread:
            print(spread, file=sys.stderr)
    bar = progress_bar(train_cfg.steps, start, log_every=log_every) if talk else None
    M = train_cfg.grad_accum
    watch = collapse_watch_of(train_cfg, run)
    last: dict = {}
    end = train_cfg.steps if until is None else min(until, train_cfg.steps)
    on_routing = routing_tracer(run, model, start) if trace_routing else None
    stop = parallel.stop_requests()
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            batches = [train_sampler.batch(step * M + i) for i in range(M)]
            lr = lr_at(step, train_cfg.lr, train_cfg.warmup, train_cfg.lr_decay_steps,
                       train_cfg.min_lr_ratio)
            try:
                step_routing = None if on_routing is None else functools.partial(on_routing, step + 1)
                m = {"step": step + 1, **train_step(model, batches, optim, lr, train_cfg, parallel, step_routing)}
            except TrainingDiverged as e:
                raise diverged(e, step + 1, run) from None
            add_speed(m, t0)  # the root's RSS is the one written
            if (step + 1) % train_cfg.eval_every == 0 or step + 1 == train_cfg.steps:
                m["val_loss"] = evaluate(model, val_sampler, train_cfg.eval_batches, parallel)
            add_collapse_watch(m, watch, bar, final=step + 1 == train_cfg.steps, warn=root)
            if root:
                run.append_metrics(m)
            # one reading per step: a signal arriving after it is handled after the next step,
            # never between the checkpoint decision and the stop (a stop with no checkpoint)
            requested = stop.requested
            if (step + 1) % train_cfg.checkpoint_every == 0 or step + 1 == end or requested:
                path = run.step_checkpoint(step + 1) if root else ""
                parallel.save_checkpoint(path, model, optim, step + 1, dataclasses.asdict(train_cfg))
                if root:
                    run.publish(path, max(1, train_cfg.keep_checkpoints))
            if bar is not None:
                show_step(bar, m)
            if on_step is not None:
                on_step(m)
            last = m
            if requested and step + 1 < end:
                raise TrainingInterrupted(f"interrupted at step {step + 1} ({requested}); the "
                                          f"checkpoint is saved; resume with: python -m moe_py train "
                                          f"--out {out_dir} --resume")
    finally:
        stop.close()
        if bar is not None:
            bar.close()
    if talk:
        print_collapse_summary(last)
    return last


def routing_tracer(run: RunFolder, model: TransformerLM, start: int):
    """on_routing(step, micro_batch, routers, shape) appending to RUN/routing_trace.jsonl
    (moe_py/routing_trace.py); a resumed run's later lines are dropped first."""
    writer = TraceWriter(os.path.join(run.path, TRACE_FILE), start)
    blocks = [i for i, b in enumerate(model.blocks) if b.ffn.has_router]

    def on_routing(step: int, micro_batch: int, routers: list, shape: tuple) -> None:
        writer.write(records_of(step, micro_batch, routers, blocks, shape))
    return on_routing


def add_speed(m: dict, t0: float) -> None:
    """A step's tokens/s (since t0) and this process's RSS, added to its metrics."""
    m["tokens_per_s"] = m["tokens"] / (time.perf_counter() - t0)
    rss = rss_mib()  # logged each step, so that memory growth shows
    if rss is not None:
        m["rss_mib"] = round(rss, 1)


def collapse_watch_of(train_cfg: TrainConfig, run: RunFolder) -> CollapseWatch:
    """The run's collapse watch, with the steps already in its metrics.jsonl replayed
    (silently), so that a resumed run reports the same episodes as an uninterrupted one."""
    watch = CollapseWatch(train_cfg.collapse_low_share, train_cfg.collapse_max_over_mean,
                          train_cfg.collapse_steps)
    if os.path.exists(run.metrics):
        for row in run.read_metrics():
            if "expert_share" in row:
                watch.update(row["step"], row["expert_share"])
    return watch


def add_collapse_watch(m: dict, watch: CollapseWatch, bar, final: bool, warn: bool = True) -> None:
    """The step's max/mean expert share per layer, and the collapse messages it raises
    ("collapse_events"; on the progress bar's own line, else as a RuntimeWarning when
    `warn`); on the run's last step, the episodes' summary ("collapse_summary")."""
    if "expert_share" not in m:
        return
    m["max_over_mean"] = [max(sh) * len(sh) for sh in m["expert_share"]]
    for msg in watch.update(m["step"], m["expert_share"]):
        m.setdefault("collapse_events", []).append(msg)
        if bar is not None:  # the progress bar's own line, not a traceback-like warning
            bar.write(f"WARNING: {msg}")
        elif warn:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
    if final:
        m["collapse_summary"] = watch.summary(m["expert_share"])


def print_collapse_summary(last: dict) -> None:
    """The end-of-run collapse report of a run's last metrics row, on stderr."""
    if "collapse_summary" in last:
        for line in summary_lines(last["collapse_summary"], last["step"]):
            print(line, file=sys.stderr)


def show_step(bar, m: dict) -> None:
    """Advance `bar` by one step and show the step's loss, speed and routing numbers."""
    post = {"loss": f"{m['loss']:.3f}", "tok/s": f"{m['tokens_per_s']:.0f}"}
    if "load_balance" in m:
        post["lb"] = f"{np.mean(m['load_balance']):.3f}"
        post["max/mean"] = f"{worst_max_over_mean(m.get('expert_share')):.2f}"
        post["drop"] = f"{100 * max(m.get('drop_rate', [0.0])):.1f}%"
    if "val_loss" in m:
        post["val"] = f"{m['val_loss']:.3f}"
    bar.set_postfix(post)
    bar.update(1)


def read_metrics(run_dir: str) -> List[dict]:
    return RunFolder(run_dir).read_metrics()
