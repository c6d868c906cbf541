"""Fault injection: a training run SIGKILLed at start-up, while a metrics line is written,
while a checkpoint is written, and at random moments, then resumed, ends with the same
weights and metrics as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moe_py.checkpoint import load_model

FLAGS = ["--corpus", "synthetic", "--steps", "12", "--d-model", "16", "--layers", "1",
         "--heads", "2", "--experts", "3", "--d-ff", "8", "--seq-len", "16", "--batch-size", "4",
         "--eval-every", "4", "--eval-batches", "1", "--checkpoint-every", "3", "--noise-std", "0.3"]
TIMING = {"tokens_per_s", "rss_mib"}


def start(out, kill_at=None):
    # no checkpoint yet: the killed run is started again from scratch
    resume = ["--resume"] if os.path.exists(os.path.join(out, "checkpoint.npz")) else ["--overwrite"]
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("MOE_PY_KILL_AT", None)
    if kill_at:
        env["MOE_PY_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "moe_py", "train", *FLAGS, "--out", out, *resume],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f if ln.strip()]


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    ref = str(tmp_path / "ref")
    assert start(ref).wait(timeout=300) == 0

    out = str(tmp_path / "run")
    # the first is a fresh run killed writing config.json (a resumed run does not rewrite it);
    # the rest interrupt resumed runs: torn metrics lines (the first a resumed run writes, or
    # a later one), the rewrite of metrics.jsonl that drops the steps after the checkpoint,
    # and torn checkpoints
    for kill_at in ["config:1", "metrics:2", "checkpoint:1", "metrics:3", "metrics:1", "checkpoint:2",
                    "truncate:1", "metrics:2", "truncate:1", "checkpoint:1"]:
        p = start(out, kill_at)
        _, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL, (kill_at, p.returncode, err)
    for delay in (0.9, 1.6):  # and at moments nobody chose
        p = start(out)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    p = start(out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err

    assert metrics(out) == metrics(ref)
    a, _ = load_model(os.path.join(ref, "checkpoint.npz"))
    b, _ = load_model(os.path.join(out, "checkpoint.npz"))
    for (n, p1, _), (_, p2, _) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(p1, p2), n
    assert not [f for f in os.listdir(out) if ".tmp." in f]
