"""The tournament's four plots, from its runs' summaries (summary.py): validation-loss
curves, load imbalance over training, specialisation per MoE layer, and a grid of
expert x token-category heat maps."""
from __future__ import annotations

import math
import os
from typing import Dict, List

import numpy as np

from ..plots import (EXPERT_LABEL_COLORBAR, _save, draw_expert_label, draw_null_bands, expert_label_share,
                     pyplot_or_none)


def _seed_band(curves: List[List[List[float]]]):
    """steps, and the mean, min and max over seeds of [[step, value], ...] curves."""
    steps = np.array([p[0] for p in curves[0]])
    v = np.array([[p[1] for p in c] for c in curves], dtype=np.float64)  # [seeds, points]
    return steps, v.mean(axis=0), v.min(axis=0), v.max(axis=0)


def _val_loss(plt, out: str, runs: Dict[str, List[dict]], written: List[str]) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, summaries) in enumerate(runs.items()):
        steps, mean, lo, hi = _seed_band([s["val_curve"] for s in summaries])
        ax.plot(steps, mean, "o-", ms=3, lw=1.2, color=f"C{i}", label=name)
        ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2, lw=0)
    n = len(next(iter(runs.values())))
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross-entropy (nats / byte)")
    ax.set_title(f"Validation loss per entry (line: mean over {n} seed(s); band: min-max)")
    ax.legend(fontsize=8)
    _save(plt, fig, os.path.join(out, "val_loss.png"), written)


def _running_mean(v: np.ndarray, w: int) -> np.ndarray:
    """Mean of the last w values at each point (fewer at the start)."""
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    return (c[idx] - c[np.maximum(0, idx - w)]) / np.minimum(idx, w)


def _imbalance(plt, out: str, runs: Dict[str, List[dict]], written: List[str]) -> None:
    moe = {k: v for k, v in runs.items() if v[0]["routing"] is not None}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    w = 1
    for i, (name, summaries) in enumerate(runs.items()):
        if name not in moe:
            continue
        steps, mean, _, _ = _seed_band([s["imbalance_curve"] for s in summaries])
        w = max(1, len(steps) // 40)
        ax.plot(steps, _running_mean(mean, w), lw=1.2, color=f"C{i}", label=name)
    ax.axhline(1.0, color="k", ls="--", lw=0.8, label="balanced (1)")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load, worst MoE layer")
    ax.set_title(f"Load imbalance over training\n(training batches; mean over seeds, "
                 f"running mean over {w} step(s))")
    ax.legend(fontsize=8)
    _save(plt, fig, os.path.join(out, "load_imbalance.png"), written)


def _mean_bands(per_seed: List[List[dict]]) -> List[dict]:
    """Per layer, the seeds' mean of each of a null band's mean, p5 and p95."""
    return [{k: float(np.mean([seed[i][k] for seed in per_seed])) for k in ("mean", "p5", "p95")}
            for i in range(len(per_seed[0]))]


def _specialisation(plt, out: str, runs: Dict[str, List[dict]], written: List[str]) -> None:
    moe = {k: [s["routing"] for s in v] for k, v in runs.items() if v[0]["routing"] is not None}
    n_layers = len(next(iter(moe.values()))[0]["mi"])
    width = 0.8 / len(moe)
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.6 + 0.5 * n_layers * len(moe)), 8))
    colours = {name: f"C{i}" for i, name in enumerate(runs)}
    panels = (("mi", "mi_byte_null_band", "MI(expert; category) / H(category)",
               "random byte -> expert tables, same k (5-95 %)"),
              ("mi_given_byte", "mi_given_byte_floor_band", "MI(expert; category | byte) / H(category | byte)",
               "experts shuffled within each byte (5-95 %)"))
    for ax, (key, band_key, ylabel, band_label) in zip(axes, panels):
        for j, (name, rs) in enumerate(moe.items()):
            v = np.array([r[key] for r in rs])  # [seeds, layers]
            x = np.arange(n_layers) - 0.4 + width * (j + 0.5)
            mean = v.mean(axis=0)
            # whiskers from the mean to the seeds' extremes (clipped at 0: rounding of equal values)
            err = np.maximum(0.0, [mean - v.min(axis=0), v.max(axis=0) - mean])
            ax.bar(x, mean, width=width, color=colours[name], label=name, yerr=err, capsize=2)
            draw_null_bands(ax, x, width, _mean_bands([r[band_key] for r in rs]), band_label if j == 0 else None)
        ax.set_xticks(range(n_layers))
        ax.set_xticklabels([f"MoE layer {i}" for i in range(n_layers)])
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_title("Specialisation per MoE layer against its nulls\n(bars: mean over seeds, "
                      "whiskers: min-max; grey: null band, line: its mean, both averaged over seeds)")
    fig.tight_layout()
    _save(plt, fig, os.path.join(out, "specialisation.png"), written)


def _expert_label_grid(plt, out: str, runs: Dict[str, List[dict]], written: List[str]) -> None:
    moe = {k: v[0]["routing"] for k, v in runs.items() if v[0]["routing"] is not None}
    cols = min(4, len(moe))
    rows = math.ceil(len(moe) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1, 4.2 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.55)  # room for the rotated category names above the next title
    tables = {k: np.asarray(r["expert_label_tables"][-1]) for k, r in moe.items()}
    vmax = max(0.3, max(float(expert_label_share(t).max()) for t in tables.values()))
    im = None
    for k, (ax, (name, r)) in enumerate(zip(axes.reshape(-1), moe.items())):
        im = draw_expert_label(ax, tables[name], r["label_names"], ylabel=(k % cols == 0), vmax=vmax)
        ax.set_title(f"{name}", fontsize=10)
    for ax in axes.reshape(-1)[len(moe):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.reshape(-1).tolist(), label=EXPERT_LABEL_COLORBAR.replace(" (", "\n("))
    fig.suptitle("Which experts take which token categories (last MoE layer, first seed)", y=1.03)
    _save(plt, fig, os.path.join(out, "expert_label_grid.png"), written)


def plot_tournament(out: str, runs: Dict[str, List[dict]]) -> List[str]:
    """val_loss.png, load_imbalance.png, specialisation.png and expert_label_grid.png in out;
    runs: {entry name: its runs' summaries, one per seed}, in table order. The last three
    show the MoE entries only (the dense baseline has no router)."""
    plt = pyplot_or_none()
    if plt is None:
        return []
    written: List[str] = []
    _val_loss(plt, out, runs, written)
    if any(v[0]["routing"] is not None for v in runs.values()):
        _imbalance(plt, out, runs, written)
        _specialisation(plt, out, runs, written)
        _expert_label_grid(plt, out, runs, written)
    return written
