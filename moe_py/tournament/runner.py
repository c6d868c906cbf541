"""Training every entry x seed of a tournament into DIR/<entry>/seed-<s>/, each a normal run
folder, resumably: a complete run is not retrained, an interrupted one is resumed from its
last checkpoint (bit for bit as if it had not stopped), and a folder holding a run of any
other config is refused."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..models import ModelConfig
from ..run_folder import RunFolder
from ..progress import LOG_EVERY, progress_bar
from ..train import TrainConfig, TrainingDiverged, read_metrics, show_step, train, with_fixed_horizons
from .corpora import Corpora
from .entries import Entry, entry_configs, parent_configs


@dataclass
class PlannedRun:
    entry: Entry
    seed: int
    path: str
    model: ModelConfig
    train: TrainConfig
    parent: Optional["PlannedRun"] = None  # an upcycled entry's dense parent (entries.py)


def _planned(e: Entry, seed: int, path: str, base_model: ModelConfig, base_train: TrainConfig,
             lr: Optional[float]) -> PlannedRun:
    """One run of `e`, and for an upcycled entry its dense parent beside it
    (<entry>/dense-parent-<run folder name>)."""
    run = PlannedRun(e, seed, path, *entry_configs(e, base_model, base_train, seed, lr))
    if e.upcycle:
        parent = dataclasses.replace(e, name=f"{e.name} (dense parent)", moe=None, upcycle=False)
        run.parent = PlannedRun(parent, seed, os.path.join(os.path.dirname(path), "dense-parent-" +
                                                           os.path.basename(path)),
                                *parent_configs(e, base_model, base_train, seed, lr))
    return run


def run_path(out: str, entry_name: str, seed: int) -> str:
    return os.path.join(out, entry_name, f"seed-{seed}")


def tune_path(out: str, entry_name: str, lr: float) -> str:
    return os.path.join(out, entry_name, f"tune-lr-{lr:g}")


def plan_runs(out: str, entries: Sequence[Entry], base_model: ModelConfig, base_train: TrainConfig,
              seeds: Sequence[int], lrs: Optional[Dict[str, float]] = None) -> List[PlannedRun]:
    """Every entry x seed with its configs, built (and so checked) before anything trains;
    lrs: each entry's learning rate (None: base_train's)."""
    lrs = lrs or {}
    return [_planned(e, s, run_path(out, e.name, s), base_model, base_train, lrs.get(e.name))
            for e in entries for s in seeds]


def plan_tuning_runs(out: str, entries: Sequence[Entry], base_model: ModelConfig,
                     base_train: TrainConfig, lr_grid: Sequence[float], tune_seed: int) -> List[PlannedRun]:
    """Every entry x learning rate of the grid at the tuning seed (a seed that no compared
    run uses, so that the rate is not chosen on the runs it is then judged by)."""
    return [_planned(e, tune_seed, tune_path(out, e.name, lr), base_model, base_train, lr)
            for e in entries for lr in lr_grid]


def final_val_loss(run: PlannedRun) -> Optional[float]:
    """The validation loss at the run's last step; None when it did not get there (diverged
    or not trained) or the loss is not finite."""
    rows = read_metrics(run.path) if os.path.exists(RunFolder(run.path).metrics) else []
    done = rows and rows[-1]["step"] == run.train.steps and "val_loss" in rows[-1]
    return float(rows[-1]["val_loss"]) if done and np.isfinite(rows[-1]["val_loss"]) else None


def choose_lrs(tuning: Sequence[PlannedRun]) -> Dict[str, dict]:
    """Per entry, the rate of the grid with the lowest final validation loss of its tuning
    run (a diverged run, loss None, never wins; ties go to the smaller rate): {entry: {"lr":
    chosen, "val_loss": {"<lr>": loss or None, ...}}}."""
    out: Dict[str, dict] = {}
    for r in tuning:
        out.setdefault(r.entry.name, {"val_loss": {}})["val_loss"][f"{r.train.lr:g}"] = final_val_loss(r)
    for name, d in out.items():
        ranked = sorted((float("inf") if loss is None else loss, float(lr)) for lr, loss in d["val_loss"].items())
        d["lr"] = ranked[0][1]
    return out


def _as_saved(run: PlannedRun) -> dict:
    """What config.json holds for this run once it has started (JSON types)."""
    return json.loads(json.dumps({"model": run.model.to_dict(),
                                  "train": dataclasses.asdict(with_fixed_horizons(run.train))}))


def _differences(saved, wanted, prefix: str = "") -> List[str]:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(saved) | set(wanted))
                for d in _differences(saved.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if saved == wanted else [f"{prefix[:-1]} is {saved!r} there, {wanted!r} here"]


def _checkpoint_step(path: str) -> int:
    with np.load(path, allow_pickle=False) as z:
        return int(z["step"])


def run_state(run: PlannedRun) -> str:
    """"new" (nothing there), "partial" (started, not finished) or "complete". A folder
    holding a run of another config raises ValueError naming the entry and the fields."""
    folder = RunFolder(run.path)
    if not folder.holds_run():
        return "new"
    if not os.path.exists(folder.config) and not os.path.exists(folder.checkpoint):
        return "new"  # killed as it started, before writing its config: start it again
    saved = folder.read_config()
    diff = _differences({k: saved.get(k) for k in ("model", "train")}, _as_saved(run))
    if diff:
        raise ValueError(f"tournament entry {run.entry.name!r} seed {run.seed}: {run.path} holds "
                         f"a run of another config ({'; '.join(diff[:3])}); choose another --out, "
                         "or --overwrite to retrain it")
    if os.path.exists(folder.checkpoint) and _checkpoint_step(folder.checkpoint) == run.train.steps:
        return "complete"
    return "partial"


def _steps_done(run: PlannedRun, state: str) -> int:
    if state == "complete":
        return run.train.steps
    if state == "partial" and os.path.exists(RunFolder(run.path).checkpoint):
        return _checkpoint_step(RunFolder(run.path).checkpoint)
    return 0


def train_runs(runs: Sequence[PlannedRun], overwrite: bool = False, progress: bool = True,
               corpora: Optional[Corpora] = None, may_diverge: bool = False,
               log_every: int = LOG_EVERY) -> Dict[str, str]:
    """Train what is not complete; returns {run path: what was done} ("kept", "resumed",
    "trained", and with may_diverge (tuning runs) "diverged" instead of stopping).
    Bars: one overall (all runs' steps) and one per run; when stderr is not a terminal, a
    line every log_every steps of a run and an overall line as each run ends."""
    if not runs:
        return {}
    corpora = Corpora() if corpora is None else corpora
    states = {r.path: "new" if overwrite else run_state(r) for r in runs}
    done = {r.path: _steps_done(r, states[r.path]) for r in runs}
    overall = progress_bar(sum(r.train.steps for r in runs), sum(done.values()), desc="tournament",
                           log_every=0, position=0) if progress else None
    actions = {}
    try:
        for r in runs:
            if states[r.path] == "complete":
                actions[r.path] = "kept"
                continue
            corpus = corpora.get(r.train)
            resume = done[r.path] > 0
            if r.parent is not None:  # an upcycled entry: its parent trained and upcycled first
                if not start_upcycled(r, overwrite, corpora, may_diverge):
                    actions[r.path] = "diverged"
                    continue
                resume = True
            bar = progress_bar(r.train.steps, done[r.path], desc=f"{r.entry.name} seed {r.seed}",
                               log_every=log_every, position=1, leave=False) if progress else None

            def on_step(m, bar=bar):
                if bar is not None:
                    show_step(bar, m)
                if overall is not None:
                    overall.update(1)
            actions[r.path] = "resumed" if done[r.path] > 0 else "trained"
            try:
                train(r.model, r.train, r.path, corpus=corpus, resume=resume, quiet=True,
                      overwrite=not resume, on_step=on_step)
            except TrainingDiverged:
                if not may_diverge:
                    raise
                actions[r.path] = "diverged"
            finally:
                if bar is not None:
                    bar.close()
                if overall is not None:
                    overall.refresh()  # a log file's overall line; a bar's redraw
    finally:
        if overall is not None:
            overall.close()
    return actions



def start_upcycled(run: PlannedRun, overwrite: bool, corpora: Corpora, may_diverge: bool = False) -> bool:
    """An upcycled entry's run folder at step 0 (unless it has a checkpoint already and not
    `overwrite`): its dense parent trained, resumed or kept in run.parent.path (silently), then
    upcycled into run.path as `python -m moe_py upcycle` does. False when the parent diverged
    (may_diverge); a folder that does not end up holding the planned configs raises."""
    from ..upcycle import SET_BY_UPCYCLING, upcycle_run
    parent = run.parent
    assert parent is not None and run.model.moe is not None
    if not overwrite and os.path.exists(RunFolder(run.path).checkpoint):
        return True
    done = train_runs([parent], overwrite=overwrite, progress=False, corpora=corpora, may_diverge=may_diverge)
    if done.get(parent.path) == "diverged":
        return False
    moe = run.model.moe
    fields = {k: v for k, v in dataclasses.asdict(moe).items()
              if k not in SET_BY_UPCYCLING}
    upcycle_run(parent.path, run.path, moe.num_experts, parent.model.d_ff // moe.d_ff, top_k=moe.top_k,
                seed=run.train.seed, steps=run.train.steps, moe=fields, overwrite=True,
                corpus=corpora.get(parent.train))
    run_state(run)  # raises when the folder's configs are not the planned ones
    return True
