"""The command line: a tiny train/sample round trip and one-line errors."""
import os

import pytest

from moe_py.cli import main

TINY = ["--corpus", "synthetic", "--steps", "3", "--d-model", "16", "--layers", "1", "--heads", "2",
        "--experts", "3", "--d-ff", "8", "--seq-len", "16", "--batch-size", "2", "--eval-every", "2",
        "--eval-batches", "1"]


def test_train_writes_a_run_folder_and_sample_reads_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", out]) == 0
    for f in ("config.json", "metrics.jsonl", "checkpoint.npz", "loss.png", "utilisation.png", "entropy.png"):
        assert os.path.exists(os.path.join(out, f)), f
    assert main(["train", *TINY, "--out", out, "--resume"]) == 0  # already at the last step
    capsys.readouterr()
    assert main(["sample", os.path.join(out, "checkpoint.npz"), "--prompt", "1+", "--length", "8"]) == 0
    assert capsys.readouterr().out.startswith("1+")


@pytest.mark.parametrize("argv,word", [
    (["train", "--corpus", "/no/such/path", "--steps", "1"], "/no/such/path"),
    (["train", *TINY, "--top-k", "5"], "top_k"),
    (["train", *TINY, "--heads", "3"], "n_heads"),
    (["train", *TINY, "--capacity-factor", "-1"], "capacity_factor"),
    (["sample", "/no/such/checkpoint.npz"], "checkpoint"),
])
def test_bad_arguments_give_one_line_errors(argv, word, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and word in err, err


def test_demo_runs(capsys):
    assert main(["demo"]) == 0
    assert "tokens_per_expert" in capsys.readouterr().out


def test_cli_refuses_absurd_threads_in_one_line(capsys):
    from moe_py.cli import main
    assert main(["--threads", "200000", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "threads" in err


def test_cli_out_of_memory_is_one_line(monkeypatch, capsys):
    from moe_py import cli

    def boom(args):
        raise MemoryError()
    monkeypatch.setattr(cli, "_demo", boom)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err


@pytest.mark.parametrize("flags", [["--activation", "clamped_swiglu", "--swiglu-limit", "5", "--ffn-bias"],
                                   ["--combine", "input", "--router", "sigmoid_topk", "--top-k", "1"]])
def test_train_runs_the_expert_variants(flags, tmp_path, capsys):
    """The Hugging Face families' expert variants reach the CLI through MoEConfig's fields:
    a tiny run trains, and its config.json keeps them."""
    import json
    out = str(tmp_path / "run")
    assert main(["train", *TINY, *flags, "--out", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        moe = json.load(f)["model"]["moe"]
    if "--combine" in flags:
        assert moe["combine"] == "input" and moe["router"] == "sigmoid_topk"
    else:
        assert moe["activation"] == "clamped_swiglu" and moe["swiglu_limit"] == 5.0 and moe["ffn_bias"]
    capsys.readouterr()
