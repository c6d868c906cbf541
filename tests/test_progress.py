"""Progress that suits a log file (moe_py/progress.py): off a terminal, `train`, `compare` and
`tournament` print one plain line every --log-every steps instead of tqdm's carriage-return
frames; --quiet prints none."""
import io
import os
import re
import subprocess
import sys

import pytest

from moe_py.cli import main
from moe_py.progress import LineProgress, progress_bar

TINY = ["--corpus", "synthetic", "--d-model", "16", "--layers", "1", "--heads", "2", "--experts", "4",
        "--d-ff", "8", "--seq-len", "16", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "1"]
STEP_LINE = re.compile(r"^(\S+(?: seed \d+)?): step (\d+)/(\d+) \(\d+%\) ")


def step_lines(text, desc=None):
    return [m for m in (STEP_LINE.match(line) for line in text.splitlines())
            if m and (desc is None or m.group(1) == desc)]


def test_lines_fall_on_multiples_of_log_every_and_the_last_step():
    out = io.StringIO()
    bar = LineProgress(total=7, initial=0, desc="train", every=3, file=out)
    for step in range(7):
        bar.set_postfix({"loss": f"{1.0 / (step + 1):.3f}"})
        if step == 2:
            bar.set_postfix(val="0.500")
        bar.update(1)
    bar.write("WARNING: a message")
    lines = out.getvalue().splitlines()
    assert [int(m.group(2)) for m in step_lines(out.getvalue())] == [3, 6, 7]
    assert "loss=0.143" in lines[2] and "val=0.500" in lines[2]  # the last val loss stays shown
    assert lines[-1] == "WARNING: a message"
    resumed = io.StringIO()
    bar = LineProgress(total=7, initial=4, every=3, file=resumed)
    for _ in range(3):
        bar.update(1)
    assert [int(m.group(2)) for m in step_lines(resumed.getvalue())] == [6, 7]
    silent = io.StringIO()
    bar = LineProgress(total=5, every=0, file=silent)  # 0: the last step only, and refresh()
    for _ in range(2):
        bar.update(1)
    bar.refresh()
    for _ in range(3):
        bar.update(1)
    bar.refresh()  # step 5's line is out already
    assert [int(m.group(2)) for m in step_lines(silent.getvalue())] == [2, 5]
    with pytest.raises(ValueError, match="log_every"):
        LineProgress(total=5, every=-1)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(10, 0), LineProgress)
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress_bar(10, 0)
    assert not isinstance(bar, LineProgress)
    bar.close()


def _train(tmp_path, name, *extra):
    cmd = [sys.executable, "-m", "moe_py", "train", "--out", str(tmp_path / name), "--steps", "7", *TINY, *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.stderr.decode()


def test_train_piped_prints_plain_lines_and_quiet_none(tmp_path):
    err = _train(tmp_path, "a", "--log-every", "3")
    assert "\r" not in err
    lines = step_lines(err, "train")
    assert [(int(m.group(2)), int(m.group(3))) for m in lines] == [(3, 7), (6, 7), (7, 7)]
    assert len(step_lines(_train(tmp_path, "b"), "train")) == 1  # default 50: the last step only
    quiet = _train(tmp_path, "c", "--quiet")
    assert "\r" not in quiet and step_lines(quiet) == []


def test_compare_and_tournament_print_lines_off_a_terminal(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "c"), "--seeds", "1", "--steps", "4", "--log-every", "2",
                 *TINY]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [int(m.group(2)) for m in step_lines(err, "moe seed 0")] == [2, 4]
    assert [int(m.group(2)) for m in step_lines(err, "dense seed 0")] == [2, 4]
    assert [int(m.group(2)) for m in step_lines(err, "tournament")] == [4, 8]  # as each run ends
    assert main(["tournament", "--out", str(tmp_path / "t"), "--routers", "softmax_lb", "--seeds", "1",
                 "--steps", "2", "--quiet", *TINY]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and step_lines(err) == []
    assert os.path.exists(tmp_path / "t" / "tournament.md")
