"""PNG plots of a run folder (matplotlib, Agg backend; the `train` extra)."""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

from .run_folder import RunFolder
from .telemetry import load_bands


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pyplot_or_none():
    """matplotlib.pyplot (Agg), or None after saying that no plots will be written."""
    try:
        return _plt()
    except ImportError:
        print("moe_py: matplotlib is not installed; no plots written (pip install 'moe_py[train]')")
        return None


def _save(plt, fig, path: str, written: List[str]) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(path)


def plot_run(run_dir: str) -> List[str]:
    """Writes loss.png, and for MoE runs utilisation.png, utilisation_heatmap.png,
    entropy.png and training_signals.png."""
    plt = pyplot_or_none()
    if plt is None:
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
    bands = load_bands(rows)  # old runs without the load keys: computed from expert_share
    fig, _ = utilisation_figure(plt, steps, bands)
    _save(plt, fig, os.path.join(run_dir, "utilisation.png"), written)

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
    fig, _, _ = heatmap_figure(plt, steps, share, bands["dead_share"] * E)
    _save(plt, fig, os.path.join(run_dir, "utilisation_heatmap.png"), written)
    _training_signals(plt, run_dir, rows, steps, written)
    return written


def utilisation_figure(plt, steps: np.ndarray, bands: dict):
    """utilisation.png: per layer, the spread of the experts' loads over training as shares of
    the uniform load (moe_py/telemetry.py): min-max (light) and 5-95 % (dark) bands, the
    median, and 1 = uniform. Returns (figure, axes)."""
    n_layers = bands["p50"].shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.6 * n_layers + 0.6, 3.4), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.fill_between(steps, bands["min"][:, i], bands["max"][:, i], color="C0", alpha=0.18, lw=0,
                        label="min - max")
        ax.fill_between(steps, bands["p5"][:, i], bands["p95"][:, i], color="C0", alpha=0.45, lw=0,
                        label="5 - 95 %")
        ax.plot(steps, bands["p50"][:, i], color="C0", lw=1.2, label="median")
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="uniform")
        ax.set_title(f"layer {i}")
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("tokens per expert / uniform")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle("Expert load over training (spread over the experts)")
    fig.tight_layout()
    return fig, axes[0]


def heatmap_figure(plt, steps: np.ndarray, share: np.ndarray, dead: np.ndarray):
    """utilisation_heatmap.png: per layer, the expert x step map of share / uniform (diverging
    around 1 = balanced) over the count of dead experts (no assignment in the step, `dead`:
    [steps, layers]). Each map and its dead panel are one grid column (the same width and x
    axis) with integer step ticks; the colorbar has a column of its own, so it narrows no map.
    Returns (figure, map axes, dead-panel axes)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator
    n_layers, E = share.shape[1], share.shape[2]
    rel = share * E
    top_value = max(2.0, float(rel.max()))
    fig = plt.figure(figsize=(3.6 * n_layers + 1.4, 5))
    grid = fig.add_gridspec(2, n_layers + 1, height_ratios=[3, 1], width_ratios=[1.0] * n_layers + [0.05],
                            hspace=0.1, wspace=0.15)
    tops, bottoms = [], []
    for i in range(n_layers):
        ax = fig.add_subplot(grid[0, i])
        low = fig.add_subplot(grid[1, i], sharex=ax)
        im = ax.imshow(rel[:, i, :].T, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                       norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top_value),
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5))
        ax.set_title(f"layer {i}")
        ax.set_ylabel("expert" if i == 0 else "")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.tick_params(axis="x", labelbottom=False)
        low.step(steps, dead[:, i], where="mid", color="k", lw=1)
        low.set_ylim(-0.2, E + 0.2)
        low.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
        low.set_xlabel("step")
        low.set_ylabel("dead experts" if i == 0 else "")
        low.grid(axis="x", lw=0.4, alpha=0.5)
        tops.append(ax)
        bottoms.append(low)
    fig.colorbar(im, cax=fig.add_subplot(grid[0, n_layers]),
                 label="share / uniform (1 = balanced, 0 = dead; at most E / top_k)")
    fig.suptitle("Expert load over training")
    return fig, tops, bottoms


def _training_signals(plt, run_dir, rows, steps, written) -> None:
    """Drop rate, z-loss (the router logits' scale), gradient norm and learning rate."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    panels = [("drop_rate", "share of slots dropped", "Capacity drops (per layer)"),
              ("z_loss", "mean logsumexp(logits)^2", "z-loss: router logit scale (per layer)"),
              ("grad_norm", "global gradient norm (before clipping)", "Gradient norm"),
              ("lr", "learning rate", "Learning rate")]
    for ax, (key, ylabel, title) in zip(axes.reshape(-1), panels):
        v = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
        if v.ndim == 2:
            for i in range(v.shape[1]):
                ax.plot(steps, v[:, i], lw=1, label=f"layer {i}")
            ax.legend(fontsize=7)
        else:
            ax.plot(steps, v, lw=1)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    _save(plt, fig, os.path.join(run_dir, "training_signals.png"), written)


def plot_routing(run_dir: str, routers, mask) -> List[str]:
    """entropy_margin.png (per-token clean-entropy and top-k margin histograms per layer) and
    transitions.png (first choice in layer i against first choice in layer i + 1)."""
    from . import analysis
    plt = _plt()
    written: List[str] = []
    n = len(routers)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1, 5.5), squeeze=False)
    for i, r in enumerate(routers):
        ent = analysis.entropy_stats(r, mask)["token_entropy"]
        E = r.router_probs.shape[1]
        axes[0][i].hist(ent, bins=40, range=(0, np.log(E)), color="C0")
        axes[0][i].set_xlabel(f"clean routing entropy, nats (max ln E = {np.log(E):.2f})")
        axes[1][i].hist(analysis.topk_margin(r, mask), bins=40, range=(0, 1), color="C1")
        axes[1][i].set_xlabel("top-k margin p_k - p_(k+1) (0 = a coin flip)")
        axes[0][i].set_title(f"layer {i}")
        for ax in (axes[0][i], axes[1][i]):
            ax.set_ylabel("tokens" if i == 0 else "")
    fig.suptitle("How sure the router is, per token")
    fig.tight_layout()
    _save(plt, fig, os.path.join(run_dir, "entropy_margin.png"), written)
    if n > 1:
        fig, axes = plt.subplots(1, n - 1, figsize=(4.2 * (n - 1) + 1, 3.8), squeeze=False)
        for i in range(n - 1):
            t = analysis.layer_transitions(routers[i], routers[i + 1], mask).astype(np.float64)
            rows = t / np.maximum(1, t.sum(axis=1, keepdims=True))
            im = axes[0][i].imshow(rows, cmap="viridis", vmin=0, vmax=1)
            axes[0][i].set_xlabel(f"first choice in layer {i + 1}")
            axes[0][i].set_ylabel(f"first choice in layer {i}")
        fig.colorbar(im, ax=axes[0].tolist(), label="share of the row's tokens (1 = all go there)")
        fig.suptitle("Where each expert's tokens go in the next layer")
        _save(plt, fig, os.path.join(run_dir, "transitions.png"), written)
    return written


def plot_compare(out_dir: str, runs: dict) -> List[str]:
    """compare.png: validation (and train) loss of each run of `compare` on one axis."""
    try:
        plt = _plt()
    except ImportError:
        return []
    written: List[str] = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, path) in enumerate(runs.items()):
        rows = RunFolder(path).read_metrics()
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, alpha=0.5,
                color=f"C{i}", label=f"{name} train")
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", color=f"C{i}", label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("MoE against the dense baseline of the same active size")
    ax.legend()
    _save(plt, fig, os.path.join(out_dir, "compare.png"), written)
    return written


EXPERT_LABEL_COLORBAR = "share of the label's assignments (at most 1/top_k: every byte of it)"


def expert_label_share(table: np.ndarray) -> np.ndarray:
    """An expert x label count table as each label's share per expert (columns sum to 1)."""
    t = np.asarray(table, dtype=np.float64)
    return t / np.maximum(1, t.sum(axis=0, keepdims=True))


def draw_expert_label(ax, table: np.ndarray, label_names: List[str], ylabel: bool = True,
                      vmax=None):
    """One expert x label heat map on ax; returns the image (for a colorbar)."""
    share = expert_label_share(table)
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0,
                   vmax=max(0.3, float(share.max())) if vmax is None else vmax)
    ax.set_xticks(range(len(label_names)))
    ax.set_xticklabels(label_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(share.shape[0]))
    if ylabel:
        ax.set_ylabel("expert")
    return im


def draw_null_bands(ax, x: np.ndarray, width: float, bands: List[dict], label: Optional[str]) -> None:
    """A grey 5-95 % band and a line at the mean of a null, one per x."""
    for j, (xi, b) in enumerate(zip(x, bands)):
        ax.fill_between([xi - width / 2, xi + width / 2], b["p5"], b["p95"], color="0.6", alpha=0.5,
                        lw=0, label=label if j == 0 else None)
        ax.hlines(b["mean"], xi - width / 2, xi + width / 2, colors="k", lw=1.5)


def plot_specialisation(path: str, res: dict) -> None:
    """Two panels per layer: MI(expert; label) / H(label) against random byte tables with the
    same k (band: 5-95 %, line: mean) and the model at init; and the conditional
    MI(expert; label | byte) / H(label | byte) against its shuffle floor."""
    plt = _plt()
    n = len(res["mi"])
    x = np.arange(n)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.bar(x - 0.2, res["mi"], width=0.4, color="C0", label="trained, all top-k slots")
    a.bar(x + 0.2, res["mi_first_choice"], width=0.4, color="C1", label="trained, first choice")
    draw_null_bands(a, x - 0.2, 0.4, res["mi_byte_null"], "random byte -> expert tables (5-95 %)")
    draw_null_bands(a, x + 0.2, 0.4, [m["first_choice"] for m in res["mi_byte_null"]], None)
    if None not in res["mi_at_init"]:  # analyze-hf --skip-init has no model at init
        a.plot(x - 0.2, res["mi_at_init"], "kx", label="same model at init")
    a.set_ylabel("MI(expert; label) / H(label)")
    a.set_title("Specialisation against routing by the byte alone")
    b.bar(x, res["mi_given_byte"], width=0.5, color="C2", label="trained")
    draw_null_bands(b, x, 0.5, res["mi_given_byte_floor"], "experts shuffled within each byte (5-95 %)")
    if None not in res["mi_given_byte_at_init"]:
        b.plot(x, res["mi_given_byte_at_init"], "kx", label="same model at init")
    b.set_ylabel("MI(expert; label | byte) / H(label | byte)")
    b.set_title("Beyond the byte (* = clears the floor by more than its spread)")
    for i, beyond in enumerate(res["beyond_byte"]):
        if beyond:
            b.annotate("*", (i, res["mi_given_byte"][i]), ha="center", va="bottom", fontsize=14)
    for ax in (a, b):
        ax.set_xticks(x)
        ax.set_xticklabels([f"layer {i}" for i in x])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_analysis(run_dir: str, tables: List[np.ndarray], label_names: List[str],
                  coactivation: List[np.ndarray], res: dict) -> List[str]:
    """expert_label.png (per layer: share of each label's assignments per expert),
    coactivation.png and specialisation.png (res: analyze's result, with the per-layer
    specialisation lists)."""
    plt = _plt()
    written = []
    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(3.2 + 2.6 * n, 4.2), squeeze=False)
    for i, (ax, t) in enumerate(zip(axes[0], tables)):
        im = draw_expert_label(ax, t, label_names, ylabel=(i == 0))
        ax.set_title(f"layer {i}")
    fig.colorbar(im, ax=axes[0].tolist(), label=EXPERT_LABEL_COLORBAR)
    fig.suptitle("Which experts take which token categories")
    written.append(os.path.join(run_dir, "expert_label.png"))
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(3 + 2.6 * n, 3.4), squeeze=False)
    for i, (ax, c) in enumerate(zip(axes[0], coactivation)):
        off = np.ma.masked_array(c, mask=np.eye(c.shape[0], dtype=bool))  # the diagonal is load
        im = ax.imshow(off, cmap="magma", vmin=0)
        ax.set_title(f"layer {i}")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of tokens routed to both (diagonal masked)")
    fig.suptitle("Co-activation of expert pairs under top-k")
    written.append(os.path.join(run_dir, "coactivation.png"))
    fig.savefig(written[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    written.append(os.path.join(run_dir, "specialisation.png"))
    plot_specialisation(written[-1], res)
    return written


def plot_ablation(run_dir: str, res: dict) -> List[str]:
    """ablation.png: the validation-loss change of removing each expert (layer x expert), and
    pruning.png: the validation loss against the experts kept per layer (moe_py/ablation.py)."""
    plt = pyplot_or_none()
    if plt is None:
        return []
    written: List[str] = []
    deltas = np.asarray(res["deltas"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * deltas.shape[1], 1.2 + 0.45 * deltas.shape[0]))
    lim = max(float(np.abs(deltas).max()), 1e-12)
    im = ax.imshow(deltas, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(deltas.shape[1]))
    ax.set_yticks(range(deltas.shape[0]))
    ax.set_xlabel("expert removed")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"val loss change (base {res['val_loss']:.3f})")
    fig.colorbar(im, ax=ax, label="nats/byte")
    _save(plt, fig, os.path.join(run_dir, "ablation.png"), written)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    kept = [p["kept"] for p in res["pruning"]]
    ax.plot(kept, [p["val_loss"] for p in res["pruning"]], marker="o")
    ax.invert_xaxis()
    ax.set_xticks(kept)
    ax.set_xlabel("experts kept per MoE layer (least used pruned)")
    ax.set_ylabel("val loss (nats/byte)")
    _save(plt, fig, os.path.join(run_dir, "pruning.png"), written)
    return written
