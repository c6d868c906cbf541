"""`python -m moe_py runs DIR...`: many run folders at a glance, one row each.

A row is read from the folder alone: config.json (router, seed, split seed, steps),
metrics.jsonl (steps done, the last validation loss, the last step's dead experts and its
worst max/mean load) and, when `analyze` has run, analysis.json (mi, mi_first_choice,
mi_given_byte: means over the MoE layers, with the layers beyond the byte). The last
columns are the config fields in which the runs differ."""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Dict, List, Sequence

from .run_folder import RunFolder

COLUMNS = ("run", "router", "seed", "split_seed", "steps", "val_loss", "mi", "mi_first_choice",
           "mi_given_byte", "beyond_byte", "max_over_mean", "dead_experts")


def find_runs(paths: Sequence[str]) -> List[str]:
    """The run folders (folders with a config.json) among paths and below them, sorted."""
    found = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"runs: no such folder: {p}")
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames.sort()
            if "config.json" in filenames:
                found.append(os.path.normpath(dirpath))
    if not found:
        raise ValueError(f"runs: no run folder (one with a config.json) in {list(paths)}")
    return sorted(set(found))


def _flatten(d: dict, prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_row(path: str) -> Dict[str, Any]:
    folder = RunFolder(path)
    cfg = folder.read_config()
    moe, train = cfg["model"].get("moe"), cfg["train"]
    rows = folder.read_metrics() if os.path.exists(folder.metrics) else []
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    last = rows[-1] if rows else {}
    share = last.get("expert_share")
    row = {"run": path, "router": moe["router"] if moe else "dense", "seed": train["seed"],
           "split_seed": train.get("split_seed", train["seed"]),
           "steps": f"{last.get('step', 0)}/{train['steps']}", "val_loss": val[-1] if val else None,
           "mi": None, "mi_first_choice": None, "mi_given_byte": None, "beyond_byte": None,
           "max_over_mean": max(last["max_over_mean"]) if "max_over_mean" in last else None,
           "dead_experts": sum(1 for s in share for v in s if v == 0) if share else None}
    analysis = os.path.join(path, "analysis.json")
    if moe and os.path.exists(analysis):
        with open(analysis) as f:
            res = json.load(f)
        if "mi_given_byte" in res:  # analysis.json written before the nulls existed has not
            for key in ("mi", "mi_first_choice", "mi_given_byte"):
                row[key] = _mean(res[key])
            row["beyond_byte"] = f"{sum(res['beyond_byte'])}/{len(res['beyond_byte'])}"
    row["_config"] = _flatten({"model": cfg["model"], "train": train})
    return row


def runs_table(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per run folder found, with the differing config fields added to each."""
    rows = [run_row(p) for p in find_runs(paths)]
    keys = sorted(set().union(*(r["_config"] for r in rows)))
    # a field differs when runs that have it disagree (a dense run has no model.moe.*)
    differing = [k for k in keys if len({json.dumps(r["_config"][k]) for r in rows if k in r["_config"]}) > 1
                 and k not in ("train.seed", "train.split_seed", "model.seed", "model.moe.seed",
                               "model.moe.router")]
    for r in rows:
        cfg = r.pop("_config")
        for k in differing:
            r[k] = cfg.get(k)
    return rows


def _cell(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_runs(rows: List[Dict[str, Any]]) -> str:
    cols = list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    lines.append("mi, mi_first_choice, mi_given_byte: means over MoE layers from analysis.json (— until "
                 "`analyze` runs); beyond_byte: layers specialised beyond the byte; max_over_mean, "
                 "dead_experts: the last training step's")
    return "\n".join(lines)


def runs_csv(rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()
