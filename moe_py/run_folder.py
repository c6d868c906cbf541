"""A run folder on disk: config.json, metrics.jsonl (one JSON object per step) and
checkpoint.npz (moe_py/checkpoint.py). The training loop writes through it; analysis,
plots and compare read through it.

Every file is replaced atomically (a temporary file, fsync, rename), and metrics.jsonl is
only ever appended to: a process killed at any instant leaves each file whole, old or new,
except possibly a torn last metrics line, which readers drop with a warning."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import warnings
from typing import List, Tuple

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


def temporary_of(path: str) -> str:
    """The name a file is written under before it is renamed over `path`."""
    return f"{path}.tmp.{os.getpid()}"


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str, data: bytes, fault_point: str = "") -> None:
    """Replace path by data: written beside it, flushed to disk, then renamed over it. A
    failed write (a full disk) removes its temporary and leaves path as it was."""
    tmp = temporary_of(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            if fault_point:
                f.flush()
                _maybe_die(fault_point)
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
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
    """checkpoint.npz is the latest checkpoint; checkpoints/step-NNNNNN.npz keep the last
    few (TrainConfig.keep_checkpoints) for studying routing across training."""

    # everything a run writes (removed by --overwrite, and nothing else is): its files, and
    # the plots of plots.py (tests/test_plots.py holds that list to what the plots write)
    OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint.npz", "checkpoints", "analysis.json",
               "analysis_over_training.json", "routing_trace.jsonl", "ablation.json", "upcycle.json",
               "tensorboard")
    PLOTS = ("loss.png", "utilisation.png", "utilisation_heatmap.png", "entropy.png",
             "training_signals.png", "expert_label.png", "specialisation.png", "coactivation.png",
             "entropy_margin.png", "transitions.png", "compare.png", "ablation.png", "pruning.png")
    LOCK = ".lock"  # held (flock) by the process training into the folder
    _STEP_FILE = re.compile(r"^step-\d{6}\.npz$")  # the kept checkpoints' names
    # the temporaries of a killed writer: an output (or a step checkpoint) + ".tmp.<pid>"
    _TEMPORARY = re.compile(r"^(config\.json|metrics\.jsonl|routing_trace\.jsonl|checkpoint\.npz|analysis\.json|"
                            r"analysis_over_training\.json|ablation\.json|upcycle\.json|step-\d{6}\.npz|[a-z_]+\.png)\.tmp\.\d+$")

    def __init__(self, path: str):
        self.path = path
        self.config = os.path.join(path, "config.json")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.checkpoint = os.path.join(path, "checkpoint.npz")
        self.checkpoints = os.path.join(path, "checkpoints")

    def holds_run(self) -> bool:
        return any(os.path.exists(os.path.join(self.path, f))
                   for f in ("config.json", "metrics.jsonl", "checkpoint.npz"))

    def clear(self) -> None:
        """Remove a previous run's files and plots (for --overwrite): only the names a run
        writes; a user's own files in the folder stay."""
        for name in self.OUTPUTS + self.PLOTS:
            p = os.path.join(self.path, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's exclusive lock (fcntl.flock on .lock) while training into it; a
        second process gets "in use by process N" instead of two writers in one folder. The
        lock goes with the process, however it ends."""
        created = not os.path.isdir(self.path)
        os.makedirs(self.path, exist_ok=True)
        lock = os.path.join(self.path, self.LOCK)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise RuntimeError(f"run folder: {self.path} is in use by process {owner} "
                                   "(another train is writing it); wait for it or choose another "
                                   "--out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            if created and os.listdir(self.path) == [self.LOCK]:
                # a run refused before it wrote anything leaves no folder behind
                os.remove(lock)
                os.rmdir(self.path)
            os.close(fd)  # releases the lock

    def step_checkpoint(self, step: int) -> str:
        os.makedirs(self.checkpoints, exist_ok=True)
        return os.path.join(self.checkpoints, f"step-{step:06d}.npz")

    def kept_checkpoints(self) -> List[str]:
        """The kept step checkpoints, oldest first."""
        if not os.path.isdir(self.checkpoints):
            return []
        # only names this moe_py writes (step-NNNNNN.npz): a stray step-xyz.npz is not one
        return [os.path.join(self.checkpoints, f) for f in sorted(os.listdir(self.checkpoints))
                if self._STEP_FILE.match(f)]

    def publish(self, step_path: str, keep: int) -> None:
        """Make step_path the latest checkpoint.npz (atomically: a hard link renamed over
        it, or a copy where links are not possible) and keep only the `keep` newest."""
        tmp = temporary_of(self.checkpoint)
        try:
            try:
                os.link(step_path, tmp)
            except OSError:
                shutil.copyfile(step_path, tmp)
            os.replace(tmp, self.checkpoint)
        except BaseException:
            _remove_quietly(tmp)
            raise
        fsync_dir(self.path)
        for old in self.kept_checkpoints()[:-keep]:
            os.remove(old)

    def steps_after(self, step: int) -> None:
        """Remove step checkpoints past `step` (left by a run resumed from an earlier one)."""
        for p in self.kept_checkpoints():
            if int(os.path.basename(p)[5:11]) > step:
                os.remove(p)

    def remove_stale_temporaries(self) -> None:
        """Temporary files a killed run left behind (their targets are whole): only names of
        the form <output>.tmp.<pid>; call it holding the lock, so no live writer owns them."""
        for folder in (self.path, self.checkpoints):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if self._TEMPORARY.match(name):
                        os.remove(os.path.join(folder, name))

    def write_config(self, model_cfg, train_cfg, corpus) -> None:
        os.makedirs(self.path, exist_ok=True)
        text = json.dumps({"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                           "corpus": {"name": corpus.name, "label_names": corpus.label_names}},
                          indent=2)
        atomic_write(self.config, text.encode(), fault_point="config")

    def read_config(self) -> dict:
        """config.json: a JSON object whose "model" and "train" are objects (their fields are
        checked by ModelConfig.from_dict and TrainConfig.from_dict)."""
        try:
            with open(self.config) as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"run folder: no config.json in {self.path}: "
                                    "not a moe_py run folder") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"run folder: {self.config} is not valid JSON ({e})") from None
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("model", "train")):
            raise ValueError(f"run folder: {self.config}: expected a JSON object with \"model\" and "
                             "\"train\" objects (not a moe_py config.json, or edited by hand)")
        return saved

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
        truncate_steps(self.metrics, step, fault_point="truncate")

    def read_metrics(self) -> List[dict]:
        """Every whole line; a torn last line (a kill while it was written) is dropped."""
        return [row for _, row in step_lines(self.metrics)]


def step_lines(path: str) -> List[Tuple[str, dict]]:
    """(line, its JSON) of every whole line of an append-only JSONL file of a run (metrics,
    the routing trace); a torn last line (a kill while it was written) is dropped."""
    with open(path) as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append((ln + "\n", json.loads(ln)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped a torn last line (the run was interrupted while "
                              "writing it)", RuntimeWarning, stacklevel=3)
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def truncate_steps(path: str, step: int, fault_point: str = "") -> None:
    """Keep the lines of a step-keyed JSONL file up to `step` (a resumed run's checkpoint),
    rewritten atomically; nothing when there is no file."""
    if os.path.exists(path):
        kept = [line for line, row in step_lines(path) if row["step"] <= step]
        atomic_write(path, "".join(kept).encode(), fault_point=fault_point)


def resolve_checkpoint(path: str) -> str:
    """A run folder (its latest checkpoint) or a checkpoint file, as the user gave it."""
    if os.path.isdir(path):
        run = RunFolder(path)
        if not os.path.exists(run.checkpoint):
            raise FileNotFoundError(f"run folder: no checkpoint.npz in {path}: not a moe_py run "
                                    "folder, or its run has not reached a checkpoint")
        return run.checkpoint
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: no such file or run folder: {path}")
    return path


def run_dir_of(path: str) -> str:
    """The run folder a run folder or checkpoint path belongs to."""
    if os.path.isdir(path):
        return path
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
