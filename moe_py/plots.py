"""PNG plots of a run folder (matplotlib, Agg backend; the `train` extra)."""
from __future__ import annotations

import json
import os
from typing import List

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _read(run_dir: str) -> List[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def plot_run(run_dir: str) -> List[str]:
    """Writes loss.png, utilisation.png and entropy.png (the last two for MoE runs)."""
    try:
        plt = _plt()
    except ImportError:
        print("moe_py: matplotlib is not installed; no plots written (pip install 'moe_py[train]')")
        return []
    rows = _read(run_dir)
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
    for i in range(n_layers):
        ax.plot(steps, ent[:, i], lw=1, label=f"layer {i}")
    ax.axhline(np.log(E), color="k", ls="--", lw=0.8, label="ln E (uniform)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean router entropy (nats), clean probabilities")
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
