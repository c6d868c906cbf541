"""A run folder on disk: config.json, metrics.jsonl (one JSON object per step) and
checkpoint.npz (moe_py/checkpoint.py). The training loop writes through it; analysis,
plots and compare read through it.

Every file is replaced atomically (a temporary file, fsync, rename), and metrics.jsonl is
only ever appended to: a process killed at any instant leaves each file whole, old or new,
except possibly a torn last metrics line, which readers drop with a warning."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import warnings
from typing import List

# Fault injection for the tests (tests/test_faults.py): MOE_PY_KILL_AT="<point>:<n>" makes the
# process SIGKILL itself half-way through the n-th write at that point ("config", "metrics",
# "truncate" (the rewrite of metrics.jsonl on resume), "checkpoint"), as a power cut or an OOM
# kill would.
_KILL_AT = os.environ.get("MOE_PY_KILL_AT", "")
_writes: dict = {}


def _maybe_die(point: str) -> None:
    if not _KILL_AT:
        return
    name, _, n = _KILL_AT.partition(":")
    if name == point:
        _writes[point] = _writes.get(point, 0) + 1
        if _writes[point] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str, data: bytes, fault_point: str = "") -> None:
    """Replace path by data: written beside it, flushed to disk, then renamed over it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        if fault_point:
            f.flush()
            _maybe_die(fault_point)
        f.write(data[len(data) // 2:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunFolder:
    def __init__(self, path: str):
        self.path = path
        self.config = os.path.join(path, "config.json")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.checkpoint = os.path.join(path, "checkpoint.npz")

    def remove_stale_temporaries(self) -> None:
        """Temporary files a killed run left behind (their targets are whole)."""
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if ".tmp." in name:
                    os.remove(os.path.join(self.path, name))

    def write_config(self, model_cfg, train_cfg, corpus) -> None:
        os.makedirs(self.path, exist_ok=True)
        text = json.dumps({"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                           "corpus": {"name": corpus.name, "label_names": corpus.label_names}},
                          indent=2)
        atomic_write(self.config, text.encode(), fault_point="config")

    def read_config(self) -> dict:
        try:
            with open(self.config) as f:
                return json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"run folder: no config.json in {self.path}: "
                                    "not a moe_py run folder") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"run folder: {self.config} is not valid JSON ({e})") from None

    def start_metrics(self) -> None:
        """An empty metrics.jsonl for a new run."""
        os.makedirs(self.path, exist_ok=True)
        atomic_write(self.metrics, b"")

    def append_metrics(self, m: dict) -> None:
        line = json.dumps(m) + "\n"
        with open(self.metrics, "a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            _maybe_die("metrics")
            f.write(line[len(line) // 2:])
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, step: int) -> None:
        """Keep the metric lines up to `step` (the checkpoint's), so a resumed run appends
        cleanly; rewritten atomically."""
        if not os.path.exists(self.metrics):
            return
        rows = [m for m in self.read_metrics() if m["step"] <= step]
        atomic_write(self.metrics, "".join(json.dumps(m) + "\n" for m in rows).encode(),
                     fault_point="truncate")

    def read_metrics(self) -> List[dict]:
        """Every whole line; a torn last line (a kill while it was written) is dropped."""
        with open(self.metrics) as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip()]
        rows = []
        for i, ln in enumerate(lines):
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    warnings.warn(f"{self.metrics}: dropped a torn last line (the run was "
                                  "interrupted while writing it)", RuntimeWarning, stacklevel=2)
                    break
                raise ValueError(f"{self.metrics}: line {i + 1} is not valid JSON") from None
        return rows
