"""Run folders: never silently overwritten, extended by --resume --steps bit for bit, kept
checkpoints with a cap, and sample/analyze reading a folder or a checkpoint alike."""
import json
import os

import numpy as np
import pytest

from moe_py.checkpoint import load_model
from moe_py.cli import main
from moe_py.run_folder import RunFolder

TINY = ["--corpus", "synthetic", "--d-model", "16", "--layers", "1", "--heads", "2",
        "--experts", "3", "--d-ff", "8", "--seq-len", "16", "--batch-size", "4", "--eval-every", "3",
        "--eval-batches", "1", "--checkpoint-every", "3", "--noise-std", "0.3"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in ("tokens_per_s", "rss_mib")}
                for ln in f]


def weights(path):
    model, _ = load_model(path)
    return {n: p.copy() for n, p, _ in model.named_parameters()}


def test_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--steps", "3", "--out", out]) == 0
    before = metrics(out)
    assert main(["train", *TINY, "--steps", "3", "--out", out]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert metrics(out) == before
    assert main(["train", *TINY, "--steps", "3", "--seed", "1", "--out", out, "--overwrite"]) == 0
    assert metrics(out) != before


def test_resume_extends_a_run_bit_for_bit(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["train", *TINY, "--steps", "10", "--lr-decay-steps", "6", "--noise-anneal-steps", "6",
                 "--out", full]) == 0
    assert main(["train", *TINY, "--steps", "6", "--out", part]) == 0
    assert main(["train", "--out", part, "--resume", "--steps", "10"]) == 0
    extended = metrics(part)
    # the first leg ended at step 6, so that row carries its end-of-run collapse summary
    assert "collapse_summary" in extended[5]
    del extended[5]["collapse_summary"]
    assert extended == metrics(full)
    a, b = weights(os.path.join(full, "checkpoint.npz")), weights(os.path.join(part, "checkpoint.npz"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_flags_and_missing_runs(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--steps", "3", "--out", out]) == 0
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--steps", "6", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "not a moe_py run folder" in capsys.readouterr().err


def test_without_out_every_run_gets_a_new_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--steps", "3"]) == 0
    assert main(["train", *TINY, "--steps", "3"]) == 0
    runs = sorted(os.listdir(tmp_path / "runs"))
    assert len(runs) == 2 and all(r.endswith("softmax_topk") or "softmax_topk" in r for r in runs)
    assert "run folder: runs/" in capsys.readouterr().err


def test_checkpoints_are_kept_with_a_cap_and_read_by_sample_and_analyze(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--steps", "12", "--keep-checkpoints", "2", "--out", out]) == 0
    kept = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert kept == ["step-000009.npz", "step-000012.npz"]
    latest = weights(os.path.join(out, "checkpoint.npz"))
    step12 = weights(os.path.join(out, "checkpoints", "step-000012.npz"))
    assert all(np.array_equal(latest[k], step12[k]) for k in latest)
    capsys.readouterr()
    for target in (out, os.path.join(out, "checkpoints", "step-000009.npz")):
        assert main(["sample", target, "--length", "4"]) == 0
    assert main(["analyze", out, "--over-training"]) == 0
    text = capsys.readouterr().out
    assert "step      9" in text and "step     12" in text and "label mix" in text
    assert os.path.exists(os.path.join(out, "analysis_over_training.json"))


def test_prose_gets_byte_class_labels_and_a_nonzero_specialisation(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["the", "router", "sends", "each", "token", "to", "Two", "experts", "of", "8",
             "and", "in", "2024", "we", "measured", "42", "losses", "Paris", "CPU"]
    text = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(3000))
    (tmp_path / "prose.txt").write_text(text)
    out = str(tmp_path / "r")
    flags = ["--corpus", str(tmp_path / "prose.txt"), "--steps", "60", "--d-model", "32",
             "--layers", "1", "--heads", "2", "--experts", "4", "--d-ff", "16", "--seq-len", "32",
             "--batch-size", "8", "--eval-every", "60", "--eval-batches", "4", "--lr", "0.01"]
    assert main(["train", *flags, "--out", out]) == 0
    assert main(["analyze", out]) == 0
    with open(os.path.join(out, "analysis.json")) as f:
        res = json.load(f)
    assert "lower" in res["label_names"] and "digit" in res["label_names"]
    assert res["mi"][0] > 0.01  # before byte classes every byte was "text": MI 0
    assert "expert 0:" in capsys.readouterr().out  # the top trigrams are printed


def test_a_run_touches_only_the_files_it_writes(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    mine = {"notes.tmp.txt": "n", "data.tmp.csv": "d", "my_plot.png": "p", "config.json.tmp.x": "t"}
    for name, text in mine.items():
        (out / name).write_text(text)
    stale = out / "metrics.jsonl.tmp.12345"  # what a killed writer leaves: removed
    stale.write_text("half")
    assert main(["train", *TINY, "--steps", "3", "--out", str(out)]) == 0
    assert main(["train", *TINY, "--steps", "3", "--out", str(out), "--overwrite"]) == 0
    assert {n: (out / n).read_text() for n in mine} == mine
    assert not stale.exists()
    assert (out / "loss.png").exists()  # the run's own plot, rewritten


def test_a_second_trainer_is_refused_while_the_folder_is_locked(tmp_path, capsys):
    from moe_py.run_folder import RunFolder
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--steps", "3", "--out", out]) == 0
    before = metrics(out)
    capsys.readouterr()
    with RunFolder(out).locked():  # as another process training into it would hold it
        assert main(["train", "--out", out, "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert f"is in use by process {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    assert metrics(out) == before
    assert main(["train", "--out", out, "--resume", "--steps", "6"]) == 0  # released with the holder


def test_a_failed_write_leaves_no_temporary_and_the_old_file(tmp_path, monkeypatch):
    import errno
    from moe_py import run_folder
    target = tmp_path / "checkpoint.npz"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_folder.os, "fsync", full_disk)
    try:
        run_folder.atomic_write(str(target), b"new" * 1000)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    else:
        raise AssertionError("the write should have failed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["checkpoint.npz"]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, capsys):
    import shutil
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["train", *TINY, "--steps", "3", "--out", a]) == 0
    assert main(["train", *TINY, "--d-model", "32", "--steps", "3", "--out", b]) == 0
    shutil.copyfile(os.path.join(b, "checkpoint.npz"), os.path.join(a, "checkpoint.npz"))
    with open(os.path.join(a, "config.json")) as f:
        config = f.read()
    before = metrics(a)
    capsys.readouterr()
    assert main(["train", "--out", a, "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model is 32 in its checkpoint but 16 in config.json" in err
    with open(os.path.join(a, "config.json")) as f:
        assert f.read() == config  # never rewritten
    assert metrics(a) == before


@pytest.mark.parametrize("edit, words", [
    (lambda c: {"model": 5, "train": c["train"]}, 'expected a JSON object with "model" and "train" objects'),
    (lambda c: [c], 'expected a JSON object with "model" and "train" objects'),
    (lambda c: {**c, "train": {**c["train"], "no_such_field": 1}}, "train: unknown field(s) ['no_such_field']"),
    (lambda c: {**c, "model": {**c["model"], "d_model": "wide"}}, "model: d_model"),
])
def test_a_tampered_config_json_is_one_line_naming_the_file(tmp_path, capsys, edit, words):
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--steps", "3", "--out", out]) == 0
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(config), f)
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--steps", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and words in err


def test_a_stray_file_among_the_step_checkpoints_is_not_taken_for_one(tmp_path):
    out = str(tmp_path / "r")
    assert main(["train", *TINY, "--steps", "3", "--out", out]) == 0
    with open(os.path.join(out, "checkpoints", "step-xyz.npz"), "w") as f:
        f.write("not mine")
    assert main(["train", "--out", out, "--resume", "--steps", "6"]) == 0
    assert os.path.exists(os.path.join(out, "checkpoints", "step-xyz.npz"))  # and left alone
    assert main(["analyze", out, "--over-training"]) == 0


def test_a_run_on_a_relative_corpus_path_is_analysed_from_anywhere(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    monkeypatch.chdir(data)
    flags = [f for f in TINY if f not in ("--corpus", "synthetic")]
    out = str(tmp_path / "r")
    assert main(["train", "--corpus", "a.txt", *flags, "--steps", "3", "--out", out]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", out]) == 0
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["train"]["corpus"] == str(data / "a.txt")


def test_a_corpus_too_small_to_split_is_one_line_and_no_folder(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("abc")
    out = tmp_path / "r"
    flags = [f for f in TINY if f not in ("--corpus", "synthetic")]
    assert main(["train", "--corpus", str(tmp_path / "tiny.txt"), *flags, "--steps", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "too few for a training and a validation split" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    run = RunFolder(str(tmp_path))
    run.start_metrics()
    run.append_metrics({"step": 1, "loss": 2.0})
    with open(run.metrics, "a") as f:
        f.write('{"step": 2, "lo')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        assert run.read_metrics() == [{"step": 1, "loss": 2.0}]
