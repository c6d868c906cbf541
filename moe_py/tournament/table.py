"""The tournament table: one row per entry from its runs' summaries (summary.py), the
differences that exceed the seed-to-seed spread, and its Markdown and JSON forms. Every
number is computed from the summaries; the same run folders give the same bytes."""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence

import numpy as np

from .entries import Entry

# The per-seed numbers whose differences between entries are tested against the seed spread:
# (key in a row, what it is, format)
SPREAD_METRICS = (("val_loss", "validation loss", "{:.4f}"),
                  ("max_over_mean", "worst max/mean expert load", "{:.3f}"),
                  ("entropy", "mean routing entropy", "{:.3f}"),
                  ("normalized_mi", "mean normalised MI", "{:.4f}"),
                  ("top1_changed", "top-1 changed between the last two checkpoints", "{:.3f}"))


def _stat(per_seed: Sequence[float]) -> dict:
    """Mean, sample standard deviation (None with one seed) and the per-seed values."""
    v = np.asarray(per_seed, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "per_seed": [float(x) for x in v]}


def _layer_stat(per_seed_layers: Sequence[Sequence[float]]) -> dict:
    """Per-layer means over seeds, and per seed the mean over layers (the seed-spread value)."""
    v = np.asarray(per_seed_layers, dtype=np.float64)  # [seeds, layers]
    return {"per_layer": [float(x) for x in v.mean(axis=0)], **_stat(v.mean(axis=1)),
            "per_seed_per_layer": v.tolist()}


def _routing_row(runs: List[dict]) -> dict:
    r = [s["routing"] for s in runs]
    load = np.asarray([x["max_over_mean"] for x in r], dtype=np.float64)  # [seeds, layers]
    per_layer = load.mean(axis=0)
    row = {"max_over_mean": {"per_layer": [float(x) for x in per_layer],
                             "worst_layer": int(np.argmax(per_layer)),
                             # the seed-spread value: each seed's worst layer
                             **_stat(load.max(axis=1)), "per_seed_per_layer": load.tolist()},
           "drop_rate": _layer_stat([x["drop_rate"] for x in r]),
           "unrouted": _layer_stat([x["unrouted"] for x in r]),
           "entropy": _layer_stat([x["entropy"] for x in r]),
           "normalized_mi": _layer_stat([x["normalized_mi"] for x in r]),
           "normalized_mi_at_init": _layer_stat([x["normalized_mi_at_init"] for x in r]),
           "top1_changed": None}
    if all(x["top1_changed"] is not None for x in r):
        row["top1_changed"] = {**_layer_stat([x["top1_changed"] for x in r]),
                               "between_steps": r[0]["checkpoint_steps"]}
    return row


def entry_row(entry: Entry, seeds: Sequence[int], runs: List[dict], paths: List[str]) -> dict:
    """The table row of one entry from the summaries of its runs (one per seed)."""
    row = {"entry": entry.name, "summary": entry.summary, "seeds": list(seeds), "runs": paths,
           "val_loss": _stat([s["val_loss"] for s in runs]),
           "tokens_per_s": _stat([s["tokens_per_s"] for s in runs]),
           "params_total": runs[0]["params_total"], "params_active": runs[0]["params_active"]}
    if runs[0]["routing"] is not None:
        row.update(_routing_row(runs))
    return row


def gaps_beyond_spread(low: Sequence[float], high: Sequence[float]) -> bool:
    """Whether `low` is below `high` beyond the seed-to-seed spread. Seed s gives both
    entries the same data, batches and held-out sample, so the entries are compared seed by
    seed: the gaps high[s] - low[s] must all be positive and the smallest must exceed their
    spread over seeds (max - min), i.e. the gap is larger than its own seed-to-seed
    variation. Never with fewer than two seeds."""
    gaps = np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)
    return gaps.size > 1 and bool(gaps.min() > gaps.max() - gaps.min())


def beyond_seed_spread(rows: List[dict]) -> Dict[str, List[str]]:
    """Per metric, the pairs of entries whose difference exceeds the seed-to-seed spread
    (gaps_beyond_spread), as "a < b (gap per seed: ...)"."""
    out = {}
    for key, _, fmt in SPREAD_METRICS:
        have = [r for r in rows if r.get(key)]
        found = []
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                va, vb = a[key]["per_seed"], b[key]["per_seed"]
                lo, hi = (a, b) if gaps_beyond_spread(va, vb) else (b, a) if gaps_beyond_spread(vb, va) \
                    else (None, None)
                if lo is not None:
                    gaps = " / ".join(fmt.format(h - g) for g, h in zip(lo[key]["per_seed"], hi[key]["per_seed"]))
                    found.append(f"{lo['entry']} < {hi['entry']} (gap per seed: {gaps})")
        out[key] = found
    return out


def build_table(settings: dict, rows: List[dict]) -> dict:
    return {"settings": settings, "rows": rows, "beyond_seed_spread": beyond_seed_spread(rows)}


def table_json(table: dict) -> str:
    return json.dumps(table, indent=1) + "\n"


# ---- Markdown ----------------------------------------------------------------------------

def _pm(stat: dict, fmt: str) -> str:
    std = "n/a" if stat["std"] is None else fmt.format(stat["std"])
    return f"{fmt.format(stat['mean'])} ± {std}"


def _layers(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _cells(row: dict) -> List[str]:
    cells = [f"`{row['entry']}`", _pm(row["val_loss"], "{:.4f}"), f"{row['tokens_per_s']['mean']:,.0f}"]
    if "max_over_mean" not in row:
        cells += ["—"] * 7
    else:
        load = row["max_over_mean"]
        top1 = row["top1_changed"]
        cells += [f"{max(load['per_layer']):.3f} (layer {load['worst_layer']})",
                  f"{100 * row['drop_rate']['mean']:.2f} %", f"{100 * row['unrouted']['mean']:.2f} %",
                  f"{row['entropy']['mean']:.3f}", _layers(row["normalized_mi"]["per_layer"]),
                  _layers(row["normalized_mi_at_init"]["per_layer"]),
                  "—" if top1 is None else f"{top1['mean']:.3f}"]
    cells.append(f"{row['params_total']:,} / {row['params_active']:,}")
    return cells


HEADER = ("entry", "val loss (nats/byte), mean ± std", "tokens/s", "max/mean load (worst MoE layer)",
          "slots dropped", "tokens reaching no expert", "routing entropy (nats)",
          "normalised MI per MoE layer", "MI at init (floor)", "top-1 changed, last 2 checkpoints",
          "params total / active")


def _notes(settings: dict, rows: List[dict]) -> List[str]:
    seeds = len(rows[0]["seeds"])
    top1 = next((r["top1_changed"] for r in rows if r.get("top1_changed")), None)
    between = f"steps {top1['between_steps'][0]} and {top1['between_steps'][1]}" if top1 else \
        "the last two kept checkpoints (— when a run kept only one)"
    return [
        f"- **val loss**: the validation loss at the last step (metrics.jsonl), mean ± sample "
        f"standard deviation over the {seeds} seed(s).",
        "- **tokens/s**: the median over the training steps of each run's tokens/s "
        "(metrics.jsonl), mean over seeds; runs on a shared machine, so a guide, not a benchmark.",
        "- Routing columns route the run's held-out sample (the windows behind its val loss) "
        "through its last checkpoint, as `analyze` does, and are means over seeds; layers are "
        "the MoE layers in order.",
        "- **max/mean load**: the largest expert's share of the top-k assignments over the mean "
        "share (1 = balanced), of the worst MoE layer.",
        "- **slots dropped**: dropped slots over all real tokens' slots; **tokens reaching no "
        "expert**: real tokens all of whose slots were dropped or left without an expert; both "
        "means over MoE layers.",
        "- **routing entropy**: mean over tokens and MoE layers of the entropy of the clean "
        "router probabilities.",
        "- **normalised MI**: mutual information between the chosen expert and the token's "
        "category over the category entropy; the floor is the same model frozen at its "
        "initialisation, on the same tokens.",
        f"- **top-1 changed**: share of the held-out tokens whose first-choice expert differs "
        f"between {between}, mean over MoE layers.",
        "- **params**: of the whole model; active = used for one token (router + top_k experts "
        "in each MoE layer).",
    ]


def table_markdown(table: dict) -> str:
    s, rows = table["settings"], table["rows"]
    lines = ["# Router tournament", "", s["description"], "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    lines += ["", "## Differences beyond the seed-to-seed spread", ""]
    if len(rows[0]["seeds"]) < 2:
        lines.append("One seed per entry: there is no seed-to-seed spread to compare with.")
    else:
        lines.append("Each seed gives every entry the same data, batches and held-out sample, so "
                     "entries are compared seed by seed: a difference counts when one entry is "
                     "below the other at every seed, by a gap whose smallest value exceeds its "
                     "spread over seeds (max - min). Every pair not listed is within the seed "
                     "spread.")
        lines.append("")
        for key, what, _ in SPREAD_METRICS:
            found = table["beyond_seed_spread"][key]
            lines.append(f"- {what}: {'; '.join(found) if found else 'none'}.")
    lines += ["", "## Entries", ""]
    lines += [f"- `{r['entry']}`: {r['summary']}." for r in rows]
    lines += ["", "## Columns", ""] + _notes(s, rows)
    return "\n".join(lines) + "\n"


def settings_of(config: dict, n_entries: int, seeds: Sequence[int], budget: str,
                reference_moe: Optional[dict]) -> dict:
    """The table's settings, from a run's config.json (so they come from the runs too)."""
    m, t = config["model"], config["train"]
    experts = "" if reference_moe is None else (
        f", {reference_moe['num_experts']} experts of width {reference_moe['d_ff']}, "
        f"top-{reference_moe['top_k']}")
    desc = (f"{n_entries} entries x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}; each seed "
            f"sets the weights and the data order), {t['steps']} steps of {t['batch_size']} x "
            f"{t['seq_len']} bytes each on the `{t['corpus']}` corpus; model: {m['n_layers']} "
            f"layers, d_model {m['d_model']}{experts}. {budget}")
    return {"description": desc, "steps": t["steps"], "seeds": list(seeds), "corpus": t["corpus"],
            "batch_size": t["batch_size"], "seq_len": t["seq_len"], "n_layers": m["n_layers"],
            "d_model": m["d_model"], "experts": reference_moe and {
                k: reference_moe[k] for k in ("num_experts", "d_ff", "top_k")}}
