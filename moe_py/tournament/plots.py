"""The tournament's four plots, from its runs' summaries (summary.py): validation-loss
curves, load imbalance over training, specialisation per MoE layer, and a grid of
expert x token-category heat maps."""
from __future__ import annotations

import math
import os
from typing import Dict, List

import numpy as np

from ..plots import EXPERT_LABEL_COLORBAR, _save, draw_expert_label, expert_label_share, pyplot_or_none


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


def _specialisation(plt, out: str, runs: Dict[str, List[dict]], written: List[str]) -> None:
    moe = {k: [s["routing"] for s in v] for k, v in runs.items() if v[0]["routing"] is not None}
    n_layers = len(next(iter(moe.values()))[0]["normalized_mi"])
    width = 0.8 / len(moe)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 + 0.5 * n_layers * len(moe)), 4.2))
    colours = {name: f"C{i}" for i, name in enumerate(runs)}
    for j, (name, rs) in enumerate(moe.items()):
        mi = np.array([r["normalized_mi"] for r in rs])  # [seeds, layers]
        floor = np.array([r["normalized_mi_at_init"] for r in rs]).mean(axis=0)
        x = np.arange(n_layers) - 0.4 + width * (j + 0.5)
        mean = mi.mean(axis=0)
        ax.bar(x, mean, width=width, color=colours[name], label=name,
               yerr=[mean - mi.min(axis=0), mi.max(axis=0) - mean], capsize=2)
        ax.hlines(floor, x - width / 2, x + width / 2, colors="k", lw=2,
                  label="frozen at init (floor)" if j == 0 else None)
    ax.set_xticks(range(n_layers))
    ax.set_xticklabels([f"MoE layer {i}" for i in range(n_layers)])
    ax.set_ylabel("MI(expert; token category) / H(category)")
    ax.set_title("Specialisation per MoE layer\n(bars: mean over seeds, whiskers: min-max)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
