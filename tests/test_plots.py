"""Every plot the run folder promises is written (the pictures are looked at by people; the
test checks they exist and are PNGs)."""
import os

from moe_py.cli import main

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
