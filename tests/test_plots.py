"""Every plot the run folder promises is written (the pictures are looked at by people; the
test checks they exist and are PNGs; the utilisation plots are checked for their layout too)."""
import os

import pytest

from moe_py.cli import main
from moe_py.plots import plot_run

TINY = ["--corpus", "synthetic", "--steps", "6", "--d-model", "16", "--layers", "2", "--heads", "2",
        "--experts", "4", "--d-ff", "8", "--seq-len", "16", "--batch-size", "4", "--eval-every", "3",
        "--eval-batches", "2", "--capacity-factor", "1.0"]


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_analyze_and_compare_write_their_plots(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run]) == 0
    assert main(["analyze", run]) == 0
    for name in ("loss", "utilisation", "utilisation_heatmap", "entropy", "training_signals",
                 "expert_label", "coactivation", "specialisation", "entropy_margin", "transitions"):
        assert is_png(os.path.join(run, name + ".png")), name
    cmp = str(tmp_path / "cmp")
    assert main(["compare", *TINY, "--out", cmp]) == 0
    assert is_png(os.path.join(cmp, "compare.png"))


def old_run_rows(steps=12, layers=2, E=4):
    """metrics.jsonl rows as runs wrote them before the load keys (expert_share only), with
    expert 3 of layer 1 dead from step 6 on."""
    import numpy as np
    rng = np.random.default_rng(0)
    rows = []
    for s in range(1, steps + 1):
        share = rng.random((layers, E)) + 0.05
        if s >= 6:
            share[1, 3] = 0.0
        share /= share.sum(axis=1, keepdims=True)
        rows.append({"step": s, "loss": 5.0 - 0.1 * s, "aux_loss": 0.01, "load_balance": [1.0] * layers,
                     "z_loss": [1.0] * layers, "entropy": [1.3] * layers, "expert_share": share.round(6).tolist(),
                     "drop_rate": [0.0] * layers, "grad_norm": 1.0, "lr": 1e-3})
    return rows


def test_a_run_logged_before_the_load_keys_still_plots(tmp_path):
    import json
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in old_run_rows())
    written = plot_run(str(tmp_path))
    for name in ("utilisation", "utilisation_heatmap"):
        assert is_png(os.path.join(tmp_path, name + ".png")), name
    assert len(written) == 5


def test_utilisation_is_one_quantile_band_per_layer():
    import numpy as np
    from moe_py.plots import _plt, utilisation_figure
    from moe_py.telemetry import load_bands
    plt = _plt()
    rows = old_run_rows()
    fig, axes = utilisation_figure(plt, np.array([r["step"] for r in rows]), load_bands(rows))
    assert len(axes) == 2
    for ax in axes:
        assert len(ax.collections) == 2  # min-max and 5-95 % bands, not E lines
        assert [ln.get_label() for ln in ax.lines] == ["median", "uniform"]
    plt.close(fig)


def test_the_heat_map_is_aligned_with_its_dead_expert_panel_and_has_step_ticks():
    import numpy as np
    from moe_py.plots import _plt, heatmap_figure
    from moe_py.telemetry import load_bands
    plt = _plt()
    rows = old_run_rows(steps=40)
    steps = np.array([r["step"] for r in rows])
    share = np.array([r["expert_share"] for r in rows])
    dead = load_bands(rows)["dead_share"] * 4
    assert dead[:, 1].tolist() == [0.0] * 5 + [1.0] * 35
    fig, maps, panels = heatmap_figure(plt, steps, share, dead)
    fig.canvas.draw()
    for top, low in zip(maps, panels):
        a, b = top.get_position(), low.get_position()
        assert (a.x0, a.x1) == pytest.approx((b.x0, b.x1))  # the same width, one over the other
        assert top.get_xlim() == low.get_xlim() == (0.5, 40.5)
        ticks = [t for t in top.get_xticks() if 0.5 <= t <= 40.5]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
        assert list(ticks) == [t for t in low.get_xticks() if 0.5 <= t <= 40.5]
    plt.close(fig)
