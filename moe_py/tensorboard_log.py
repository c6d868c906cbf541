"""`train --tensorboard`: each step's metrics also as TensorBoard scalars and per-layer load
histograms, in RUN/tensorboard/ (the `tensorboard` extra: tensorboardX, which writes event
files without TensorFlow or torch; `tensorboard --logdir RUN/tensorboard` shows them).

Tags: `loss`, `val_loss` (on validation steps), `lr`, `grad_norm`, `aux_loss`, and per MoE
layer i `layer<i>/<key>` for load_balance, entropy, max_over_mean, dead_share and
load_min .. load_p95 (moe_py/telemetry.py), and the histogram `layer<i>/load` of the
experts' loads as shares of the uniform load (1 = uniform). metrics.jsonl stays the record;
this is a view of it."""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from .telemetry import LOAD_KEYS, load_shares

EXTRA = "tensorboard"
FOLDER = "tensorboard"
SCALARS = ("loss", "val_loss", "lr", "grad_norm", "aux_loss")
LAYER_SCALARS = ("load_balance", "entropy", "max_over_mean", "dead_share", *LOAD_KEYS.values())


def summary_writer_class():
    """tensorboardX's SummaryWriter, or a RuntimeError naming the extra to install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise RuntimeError(f"tensorboard: --tensorboard needs the {EXTRA!r} extra (tensorboardX): "
                           f"pip install 'moe_py[{EXTRA}]'") from None
    return SummaryWriter


class TensorBoardLog:
    """on_step(metrics) for moe_py.train.train: writes the step to RUN/tensorboard/. The
    writer opens at the first step it sees, with that step as its purge step, so that a
    resumed run hides what an interrupted attempt had logged after its checkpoint."""

    def __init__(self, run_dir: str):
        self._cls = summary_writer_class()  # fails before training starts, not at step 1
        self.logdir = os.path.join(run_dir, FOLDER)
        self.writer: Optional[Any] = None

    def __call__(self, m: dict) -> None:
        step = int(m["step"])
        if self.writer is None:
            self.writer = self._cls(logdir=self.logdir, purge_step=step)
        w = self.writer
        for key in SCALARS:
            if key in m:
                w.add_scalar(key, float(m[key]), step)
        for key in LAYER_SCALARS:
            for i, v in enumerate(m.get(key, ())):
                w.add_scalar(f"layer{i}/{key}", float(v), step)
        for i, share in enumerate(m.get("expert_share", ())):
            loads = load_shares(share)
            w.add_histogram(f"layer{i}/load", loads, step,
                            bins=np.linspace(0.0, max(2.0, float(loads.max())), 21))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
