"""`python -m moe_py tournament --out DIR`: train every entry x seed (runner.py), then build
the table (table.py) and the plots (plots.py) from the run folders alone, so that running
again on a complete DIR trains nothing and writes the same table, byte for byte."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from ..config import MoEConfig
from ..models import ModelConfig
from ..progress import LOG_EVERY
from ..run_folder import RunFolder, atomic_write
from ..train import TrainConfig
from .corpora import Corpora
from .entries import BUDGET, ENTRIES, Entry, select_entries
from .plots import plot_tournament
from .runner import choose_lrs, plan_runs, plan_tuning_runs, run_path, train_runs
from .summary import summarise_run
from .table import build_table, entry_row, settings_of, table_json, table_markdown

# Steps per run: train's own default, so the softmax_lb entry is the default `train` run.
# Measured on this project's 2-core Xeon (family 6, model 207): a default-size softmax_lb run
# trains at 0.081 s a step (median over its steps) on a quiet machine, 400 steps in 36 s with
# their validation passes, and its analysis takes about 4 s; 8 entries x 2 seeds x 400 steps
# are then about 16 x 40 s = 11 min, four times under the 45 minutes. The headroom is for
# routers slower than softmax top-k and for other work on the machine: a 600-step run took
# 293 s instead of about 55 s while compilers and test suites ran on the same two cores.
DEFAULT_STEPS = TrainConfig().steps
# Seeds per entry: the fewest that give a t-interval (two seeds give one with a t quantile of
# 12.7, useless); docs/results.md shows what 3 seeds can and cannot separate.
DEFAULT_SEEDS = 3
# The seed of the learning-rate tuning runs: outside 0 .. seeds-1 for any sensible seeds, so
# that no compared run is the one its rate was chosen on.
TUNE_SEED = 1000


def check_seeds(seeds) -> List[int]:
    """Seeds 0 .. seeds-1."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds: expected a positive integer (runs seeds 0 .. N-1), got {seeds!r}")
    return list(range(seeds))


def _reference_moe(out: str, entries: Sequence[Entry], seed: int) -> Optional[dict]:
    """The experts' shape of the first MoE entry without shared experts (the budget's base)."""
    for e in entries:
        moe = RunFolder(run_path(out, e.name, seed)).read_config()["model"]["moe"]
        if moe and not moe.get("num_shared_experts"):
            return moe
    return None


def check_lr_grid(lr_grid) -> Optional[List[float]]:
    """None, or a list of distinct positive finite learning rates."""
    if lr_grid is None:
        return None
    grid = list(lr_grid)
    if not grid or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")
                       for v in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"lr_grid: expected distinct positive learning rates, got {lr_grid!r}")
    return sorted(float(v) for v in grid)


def train_entries(out: str, entries: Sequence[Entry], base_model: ModelConfig, base_train: TrainConfig,
                  seed_list: List[int], grid: Optional[List[float]], tune_seed: int, overwrite: bool,
                  progress: bool, corpora: Optional[Corpora] = None, log_every: int = LOG_EVERY):
    """The training both `tournament` and `compare` do: with a grid, every entry once per rate
    at tune_seed, then every entry x seed at its chosen rate (without one, at base_train's).
    Every config is checked before anything trains. Returns (actions, lr_choice or None,
    the planned seed runs)."""
    if grid is not None and tune_seed in seed_list:
        raise ValueError(f"tune_seed: {tune_seed} is one of the compared seeds 0 .. {len(seed_list) - 1}")
    tuning = [] if grid is None else plan_tuning_runs(out, entries, base_model, base_train, grid, tune_seed)
    for lr in grid or []:  # every rate's seed configs too, before anything trains
        plan_runs(out, entries, base_model, base_train, seed_list, {e.name: lr for e in entries})
    actions = train_runs(tuning, overwrite=overwrite, progress=progress, corpora=corpora, may_diverge=True,
                         log_every=log_every)
    lr_choice = choose_lrs(tuning) if tuning else None
    runs = plan_runs(out, entries, base_model, base_train, seed_list,
                     None if lr_choice is None else {name: c["lr"] for name, c in lr_choice.items()})
    actions.update(train_runs(runs, overwrite=overwrite, progress=progress, corpora=corpora,
                              log_every=log_every))
    return actions, lr_choice, runs


def write_table(out: str, entries: Sequence[Entry], seeds: Sequence[int],
                corpora: Optional[Corpora] = None, lr_choice: Optional[dict] = None) -> dict:
    """Summarise the complete runs in `out`, write tournament.md, tournament.json and the
    plots there, and return the table. lr_choice: choose_lrs' result when the rates were
    tuned."""
    corpora = Corpora() if corpora is None else corpora
    summaries = {e.name: [summarise_run(run_path(out, e.name, s), corpora) for s in seeds]
                 for e in entries}
    rows = [entry_row(e, seeds, summaries[e.name],
                      [os.path.relpath(run_path(out, e.name, s), out) for s in seeds],
                      summaries[e.name][0]["lr"]) for e in entries]
    first = RunFolder(run_path(out, entries[0].name, seeds[0])).read_config()
    settings = settings_of(first, len(entries), seeds, BUDGET, _reference_moe(out, entries, seeds[0]),
                           lr_choice)
    table = build_table(settings, rows)
    atomic_write(os.path.join(out, "tournament.json"), table_json(table).encode())
    atomic_write(os.path.join(out, "tournament.md"), table_markdown(table).encode())
    table["plots"] = plot_tournament(out, summaries)
    return table


def run_tournament(out: str, routers: Optional[Sequence[str]] = None, seeds: int = DEFAULT_SEEDS,
                   base_model: Optional[ModelConfig] = None, base_train: Optional[TrainConfig] = None,
                   overwrite: bool = False, progress: bool = True,
                   entries: Sequence[Entry] = ENTRIES, lr_grid: Optional[Sequence[float]] = None,
                   tune_seed: int = TUNE_SEED, log_every: int = LOG_EVERY) -> dict:
    """Train the entries named in `routers` (all when None) with seeds 0 .. seeds-1 into
    out/<entry>/seed-<s>/, then write the table and plots. base_model (with its moe: the
    experts' shape) and base_train (the schedule, and the split seed every run shares)
    default to the default model and training with DEFAULT_STEPS steps; each entry
    overrides only its own fields (entries.py). With lr_grid, each entry first trains once
    per rate at tune_seed (out/<entry>/tune-lr-<lr>/) and its seeds then use the rate with
    the lowest validation loss there. Every config is checked before anything trains.
    progress: bars (or, off a terminal, a line every log_every steps; moe_py/progress.py)."""
    if not isinstance(out, str) or not out:
        raise ValueError(f"out: expected a folder path, got {out!r}")
    seed_list = check_seeds(seeds)
    grid = check_lr_grid(lr_grid)
    chosen = select_entries(routers, entries)
    base_model = ModelConfig(moe=MoEConfig()) if base_model is None else base_model
    base_train = TrainConfig(steps=DEFAULT_STEPS) if base_train is None else base_train
    corpora = Corpora()  # loaded once for training and analysis alike
    actions, lr_choice, _ = train_entries(out, chosen, base_model, base_train, seed_list, grid, tune_seed,
                                          overwrite, progress, corpora, log_every)
    table = {"actions": actions}
    table.update(write_table(out, chosen, seed_list, corpora, lr_choice))
    return table
