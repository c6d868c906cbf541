"""PNG plots of a run folder (matplotlib, Agg backend; the `train` extra)."""
from __future__ import annotations

import os
from typing import List

import numpy as np

from .run_folder import RunFolder


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(run_dir: str) -> List[str]:
    """Writes loss.png, utilisation.png and entropy.png (the last two for MoE runs)."""
    try:
        plt = _plt()
    except ImportError:
        print("moe_py: matplotlib is not installed; no plots written (pip install 'moe_py[train]')")
        return []
    rows = RunFolder(run_dir).read_metrics()
    if not rows:
        return []
    written = []
    steps = np.array([r["step"] for r in rows])

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("Language-model loss")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(run_dir, "loss.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if "expert_share" not in rows[0]:
        return written
    share = np.array([r["expert_share"] for r in rows])  # [steps, layers, E]
    n_layers, E = share.shape[1], share.shape[2]
    fig, axes = plt.subplots(1, n_layers, figsize=(4 * n_layers, 3.6), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        for e in range(E):
            ax.plot(steps, share[:, i, e], lw=1, label=f"expert {e}")
        ax.axhline(1 / E, color="k", ls="--", lw=0.8, label="uniform 1/E")
        ax.set_title(f"layer {i}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("share of top-k assignments")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Expert utilisation over training")
    fig.tight_layout()
    written.append(os.path.join(run_dir, "utilisation.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    ent = np.array([r["entropy"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    noisy = np.array([r.get("entropy_noisy", r["entropy"]) for r in rows])
    for i in range(n_layers):
        line, = ax.plot(steps, ent[:, i], lw=1, label=f"layer {i} (clean)")
        if not np.allclose(noisy[:, i], ent[:, i]):
            ax.plot(steps, noisy[:, i], lw=0.8, ls="--", color=line.get_color(), label=f"layer {i} (noisy)")
    ax.axhline(np.log(E), color="k", ls="--", lw=0.8, label="ln E (uniform)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean router entropy (nats)")
    ax.set_title("Router entropy over training")
    noise = np.array([r.get("noise_std", 0.0) for r in rows])
    if noise.any():
        ax2 = ax.twinx()
        ax2.plot(steps, noise, color="gray", ls=":", label="noise std")
        ax2.set_ylabel("router noise std")
        ax2.legend(loc="lower left")
    ax.legend(loc="upper right")
    fig.tight_layout()
    written.append(os.path.join(run_dir, "entropy.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def plot_analysis(run_dir: str, tables: List[np.ndarray], label_names: List[str],
                  coactivation: List[np.ndarray], nmi: List[float], nmi_init: List[float]) -> List[str]:
    """expert_label.png (per layer: share of each label's assignments per expert),
    coactivation.png and specialisation.png."""
    plt = _plt()
    written = []
    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(3.2 + 2.6 * n, 4.2), squeeze=False)
    for i, (ax, t) in enumerate(zip(axes[0], tables)):
        share = t / np.maximum(1, t.sum(axis=0, keepdims=True))  # each label's column sums to 1
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.3, float(share.max())))
        ax.set_xticks(range(len(label_names)))
        ax.set_xticklabels(label_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(t.shape[0]))
        if i == 0:
            ax.set_ylabel("expert")
        ax.set_title(f"layer {i}")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of the label's assignments")
    fig.suptitle("Which experts take which token categories")
    written.append(os.path.join(run_dir, "expert_label.png"))
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(3 + 2.6 * n, 3.4), squeeze=False)
    for i, (ax, c) in enumerate(zip(axes[0], coactivation)):
        im = ax.imshow(c, cmap="magma")
        ax.set_title(f"layer {i}")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of tokens routed to both")
    fig.suptitle("Co-activation of expert pairs under top-k")
    written.append(os.path.join(run_dir, "coactivation.png"))
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(n)
    ax.bar(x - 0.2, nmi, width=0.4, label="trained")
    ax.bar(x + 0.2, nmi_init, width=0.4, label="at initialisation (floor)")
    ax.set_xticks(x)
    ax.set_xticklabels([f"layer {i}" for i in x])
    ax.set_ylabel("MI(expert; label) / H(label)")
    ax.set_title("Expert specialisation per layer")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(run_dir, "specialisation.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
