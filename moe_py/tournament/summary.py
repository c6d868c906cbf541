"""The numbers of one tournament run, read from its own run folder: metrics.jsonl for the
losses (not speed: runs made at different machine loads are not a benchmark), and its
checkpoints routed through `analyze` (report.analyze_run, which also writes the folder's
analysis.json) and `analyze --over-training`
(report.analyze_over_training) for everything about routing. Nothing here depends on when
or how often it runs: the same folder gives the same numbers, bit for bit."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..data import Corpus
from ..models import ModelConfig, TransformerLM
from ..report import analyze_over_training, analyze_run
from ..run_folder import RunFolder
from ..train import TrainConfig
from .corpora import Corpora


def _metrics_numbers(rows: list, steps: int, path: str) -> dict:
    if not rows or rows[-1]["step"] != steps or "val_loss" not in rows[-1]:
        raise ValueError(f"run folder: {path}/metrics.jsonl does not end with the validation loss "
                         f"of step {steps}: the run is not complete")
    out = {"val_loss": rows[-1]["val_loss"],
           # the validation loss every eval_every steps, for the loss-curve plot
           "val_curve": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r]}
    if "max_over_mean" in rows[0]:
        # the worst MoE layer's max/mean expert load of each training step
        out["imbalance_curve"] = [[r["step"], max(r["max_over_mean"])] for r in rows]
    return out


def _after_parent(out: dict, path: str) -> dict:
    """An upcycled run's curves (its folder has upcycle.json) on the steps of the whole run:
    its dense parent's validation losses first, then its own shifted by the parent's steps."""
    record_path = os.path.join(path, "upcycle.json")
    if not os.path.exists(record_path):
        return out
    with open(record_path) as f:
        record = json.load(f)
    p = int(record["parent_step"])
    parent = RunFolder(os.path.join(path, record["parent_run"]))
    before = [[r["step"], r["val_loss"]] for r in parent.read_metrics() if "val_loss" in r and r["step"] <= p] \
        if os.path.exists(parent.metrics) else []
    out["val_curve"] = before + [[s + p, v] for s, v in out["val_curve"]]
    if "imbalance_curve" in out:
        out["imbalance_curve"] = [[s + p, v] for s, v in out["imbalance_curve"]]
    return out


def _routing_numbers(path: str, corpus: Corpus) -> dict:
    res = analyze_run(path, plots=False, corpus=corpus)
    layers = res["layers"]
    over = analyze_over_training(path, corpus=corpus)
    # None with a single kept checkpoint: there is no pair of checkpoints to compare
    top1 = over[-1]["top1_changed_since_previous"] if len(over) > 1 else None
    return {"max_over_mean": [la["imbalance"]["max_over_mean"] for la in layers],
            "drop_rate": [la["imbalance"]["drop_rate"] for la in layers],
            "unrouted": [la["unrouted"] for la in layers],
            "entropy": [la["entropy"]["mean_token_entropy"] for la in layers],
            "mi": res["mi"],
            "mi_at_init": res["mi_at_init"],
            "mi_first_choice": res["mi_first_choice"],
            "mi_byte_null": [b["mean"] for b in res["mi_byte_null"]],
            "mi_byte_null_p95": [b["p95"] for b in res["mi_byte_null"]],
            "mi_first_choice_byte_null": [b["first_choice"]["mean"] for b in res["mi_byte_null"]],
            "mi_given_byte": res["mi_given_byte"],
            "mi_given_byte_floor": [b["mean"] for b in res["mi_given_byte_floor"]],
            "beyond_byte": res["beyond_byte"],
            # the nulls' 5-95 % bands per layer, for the plot
            "mi_byte_null_band": [{k: b[k] for k in ("mean", "p5", "p95")} for b in res["mi_byte_null"]],
            "mi_given_byte_floor_band": [{k: b[k] for k in ("mean", "p5", "p95")}
                                         for b in res["mi_given_byte_floor"]],
            "top1_changed": top1,
            "checkpoint_steps": [row["step"] for row in over[-2:]],
            "label_names": res["label_names"],
            "expert_label_tables": [la["expert_label_table"] for la in layers]}


def summarise_run(path: str, corpora: Optional[Corpora] = None) -> dict:
    """Every number the tournament reports about the run in `path` (a complete run folder)."""
    folder = RunFolder(path)
    cfg = folder.read_config()
    t = cfg["train"]
    corpus = (Corpora() if corpora is None else corpora).get(TrainConfig.from_dict(t))
    model_cfg = ModelConfig.from_dict(cfg["model"])
    out = _after_parent(_metrics_numbers(folder.read_metrics(), cfg["train"]["steps"], path), path)
    params = TransformerLM(model_cfg).num_parameters()
    out.update(params_total=params["total"], params_active=params["active"],
               top_k=model_cfg.moe.top_k if model_cfg.moe is not None else None, lr=cfg["train"]["lr"])
    out["routing"] = _routing_numbers(path, corpus) if model_cfg.moe is not None else None
    return out
