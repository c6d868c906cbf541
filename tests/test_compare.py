"""`compare` end to end on a tiny model: seeds, paired gaps, the interval and the verdict
recomputed from the runs' own files, and the learning-rate grid."""
import json
import os

import pytest

from moe_py.cli import main

TINY = ["--corpus", "synthetic", "--d-model", "16", "--layers", "1", "--heads", "2", "--experts", "4",
        "--d-ff", "8", "--seq-len", "16", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "2",
        "--steps", "6"]


def final_val_loss(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["val_loss"]


def config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare") / "c")
    assert main(["compare", "--out", out, "--seeds", "2", "--lr-grid", "0.001,0.01", *TINY]) == 0
    with open(os.path.join(out, "compare.json")) as f:
        return out, json.load(f)


def test_a_row_per_seed_and_the_paired_interval(compared, capsys):
    scipy_stats = pytest.importorskip("scipy.stats")
    out, res = compared
    moe = [final_val_loss(os.path.join(out, "moe", f"seed-{s}")) for s in (0, 1)]
    dense = [final_val_loss(os.path.join(out, "dense", f"seed-{s}")) for s in (0, 1)]
    assert res["val_loss"] == {"moe": moe, "dense": dense}
    gap = res["gap_moe_minus_dense"]
    assert gap["gaps"] == pytest.approx([m - d for m, d in zip(moe, dense)], rel=1e-12)
    ref = scipy_stats.ttest_rel(moe, dense)
    ci = ref.confidence_interval(0.95)
    assert (gap["low"], gap["high"]) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert gap["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    excludes_zero = ci.high < 0 or ci.low > 0
    assert res["verdict"].startswith("no difference at this budget") != excludes_zero
    # every run of both arms reads the same split, whatever its seed
    splits = {config(os.path.join(out, arm, f"seed-{s}"))["train"]["split_seed"]
              for arm in ("moe", "dense") for s in (0, 1)}
    assert splits == {0}
    assert [config(os.path.join(out, "moe", f"seed-{s}"))["train"]["seed"] for s in (0, 1)] == [0, 1]


def test_each_arm_takes_the_best_rate_of_its_tuning_runs(compared):
    out, res = compared
    for arm in ("moe", "dense"):
        tuned = {lr: final_val_loss(os.path.join(out, arm, f"tune-lr-{lr}")) for lr in ("0.001", "0.01")}
        assert res["lr_choice"][arm]["val_loss"] == tuned
        best = float(min(tuned, key=tuned.get))
        assert res["lr"][arm] == best
        assert config(os.path.join(out, arm, "tune-lr-0.01"))["train"]["seed"] == 1000  # the tuning seed
        assert config(os.path.join(out, arm, "seed-1"))["train"]["lr"] == best


def test_a_rerun_trains_nothing_and_prints_the_verdict(compared, capsys):
    out, res = compared
    capsys.readouterr()
    assert main(["compare", "--out", out, "--seeds", "2", "--lr-grid", "0.001,0.01", *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"over 2 seed(s): {res['verdict']}" in printed
    assert printed.count("\n     0 ") == 1 and printed.count("\n     1 ") == 1  # a row per seed


@pytest.mark.parametrize("argv,word", [(["--lr", "0.01", "--lr-grid", "0.001,0.01"], "lr_grid"),
                                       (["--lr-grid", "0.001,0.01", "--tune-seed", "1"], "tune_seed"),
                                       (["--seeds", "0"], "seeds")])
def test_bad_arguments_name_themselves(argv, word, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "c"), *argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert word in err
    assert not os.path.exists(tmp_path / "c" / "moe" / "seed-0")
