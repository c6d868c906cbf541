"""A run folder on disk: config.json, metrics.jsonl (one JSON object per step) and
checkpoint.npz (moe_py/checkpoint.py). The training loop writes through it; analysis,
plots and compare read through it."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import List


class RunFolder:
    def __init__(self, path: str):
        self.path = path
        self.config = os.path.join(path, "config.json")
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.checkpoint = os.path.join(path, "checkpoint.npz")

    def write_config(self, model_cfg, train_cfg, corpus) -> None:
        os.makedirs(self.path, exist_ok=True)
        with open(self.config, "w") as f:
            json.dump({"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg),
                       "corpus": {"name": corpus.name, "label_names": corpus.label_names}}, f, indent=2)

    def read_config(self) -> dict:
        with open(self.config) as f:
            return json.load(f)

    def start_metrics(self) -> None:
        """An empty metrics.jsonl for a new run."""
        os.makedirs(self.path, exist_ok=True)
        with open(self.metrics, "w"):
            pass

    def append_metrics(self, m: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(m) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines past `step` (the checkpoint's), so a resumed run appends cleanly."""
        if not os.path.exists(self.metrics):
            return
        with open(self.metrics) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        with open(self.metrics, "w") as f:
            f.writelines(lines)

    def read_metrics(self) -> List[dict]:
        with open(self.metrics) as f:
            return [json.loads(ln) for ln in f if ln.strip()]
