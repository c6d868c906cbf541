"""`python -m moe_py compare`: the MoE of the given flags against a dense FFN of the same
active width, over several seeds on one validation split, with a paired interval.

Each seed s trains both arms with the same weights' seed, the same batches and the same
held-out windows (the split comes from --split-seed, never from the seed), so the per-seed
gaps MoE - dense are paired. The verdict is given only when the 95 % t-interval of the mean
gap excludes 0; otherwise "no difference at this budget". With an lr grid, each arm first
picks its learning rate at the tuning seed. Runs go to OUT/<arm>/seed-<s>/ (and
OUT/<arm>/tune-lr-<lr>/) through the tournament's runner, so an interrupted compare resumes
and a complete one retrains nothing."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from .models import ModelConfig, TransformerLM
from .progress import LOG_EVERY
from .run_folder import atomic_write
from .stats import paired_test, verdict
from .train import TrainConfig
from .tournament.entries import Entry
from .tournament.run import DEFAULT_SEEDS, TUNE_SEED, check_lr_grid, check_seeds, train_entries
from .tournament.runner import final_val_loss, run_path


def _arms(moe_model: ModelConfig) -> List[Entry]:
    moe = moe_model.moe
    assert moe is not None  # run_compare checks it
    # the MoE exactly as the flags give it (normalize_topk already resolved for its top_k)
    return [Entry("moe", f"{moe.router}, {moe.num_experts} experts of width {moe.d_ff}, top-{moe.top_k}",
                  {"normalize_topk": moe.normalize_topk}),
            Entry("dense", f"dense FFN of width {moe.active_ffn_width} (the MoE's active width)", None)]


def _finished_loss(run) -> float:
    """The final validation loss of a compared run (trained without may_diverge: it got there)."""
    loss = final_val_loss(run)
    if loss is None:
        raise RuntimeError(f"{run.path}: no final validation loss (the run did not finish)")
    return loss


def run_compare(out: str, base_model: ModelConfig, base_train: TrainConfig, seeds: int = DEFAULT_SEEDS,
                lr_grid: Optional[Sequence[float]] = None, tune_seed: int = TUNE_SEED,
                overwrite: bool = False, progress: bool = True, log_every: int = LOG_EVERY) -> Dict[str, Any]:
    """Train both arms at seeds 0 .. seeds-1 (after tuning their rates when lr_grid is
    given), write OUT/compare.json and compare.png, and return the result: per seed the two
    validation losses and the gap, the paired test over seeds and its verdict."""
    if base_model.moe is None:
        raise ValueError("base_model: expected the MoE arm's config (the dense arm is derived from it)")
    seed_list = check_seeds(seeds)
    arms = _arms(base_model)
    actions, lr_choice, runs = train_entries(out, arms, base_model, base_train, seed_list,
                                             check_lr_grid(lr_grid), tune_seed, overwrite, progress,
                                             log_every=log_every)
    lrs = {a.name: next(r.train.lr for r in runs if r.entry is a) for a in arms}
    losses = {a.name: [_finished_loss(r) for r in runs if r.entry is a] for a in arms}
    test = paired_test(losses["moe"], losses["dense"])
    params = {a.name: TransformerLM(r.model).num_parameters()
              for a in arms for r in runs if r.entry is a and r.seed == seed_list[0]}
    result = {"seeds": seed_list, "split_seed": base_train.split_seed, "lr": lrs, "lr_choice": lr_choice,
              "val_loss": losses, "gap_moe_minus_dense": test,
              "verdict": verdict(test, "MoE", "dense"), "params": params, "actions": actions,
              "arms": {a.name: a.summary for a in arms}}
    atomic_write(os.path.join(out, "compare.json"), (json.dumps(result, indent=1) + "\n").encode())
    from .plots import plot_compare
    plot_compare(out, {f"{a.name} seed {s}": run_path(out, a.name, s) for a in arms for s in seed_list})
    return result


def format_compare(result: Dict[str, Any]) -> str:
    """The printed table: a row per seed, the mean gap with its interval, and the verdict."""
    losses, test = result["val_loss"], result["gap_moe_minus_dense"]
    lines = [f"validation split seed {result['split_seed']}; learning rate MoE {result['lr']['moe']:g}, "
             f"dense {result['lr']['dense']:g}"
             + ("" if not result["lr_choice"] else " (each the best of its grid at the tuning seed)"),
             f"{'seed':>6} {'MoE val loss':>13} {'dense val loss':>15} {'MoE - dense':>12}"]
    for s, m, d, g in zip(result["seeds"], losses["moe"], losses["dense"], test["gaps"]):
        lines.append(f"{s:>6} {m:>13.4f} {d:>15.4f} {g:>+12.4f}")
    lines.append(f"{'mean':>6} {sum(losses['moe']) / len(losses['moe']):>13.4f} "
                 f"{sum(losses['dense']) / len(losses['dense']):>15.4f} {test['mean']:>+12.4f}")
    p = result["params"]
    lines.append(f"params total / active: MoE {p['moe']['total']:,} / {p['moe']['active']:,}; "
                 f"dense {p['dense']['total']:,} / {p['dense']['active']:,}")
    lines.append(f"MoE val loss minus dense val loss over {len(result['seeds'])} seed(s): {result['verdict']}")
    return "\n".join(lines)
