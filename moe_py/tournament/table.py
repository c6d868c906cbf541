"""The tournament table: one row per entry from its runs' summaries (summary.py), the
paired, Holm-corrected comparisons between entries, and its Markdown and JSON forms. Every
number is computed from the summaries; the same run folders give the same bytes."""
from __future__ import annotations

import json
from typing import List, Optional, Sequence

import numpy as np

from ..stats import holm, mean_interval, paired_test
from .entries import Entry

# The per-seed numbers whose differences between entries are tested, every pair of entries
# that has them, with one Holm correction over all of those tests: (key, what it is, format)
SCANNED_METRICS = (("val_loss", "validation loss", "{:.4f}"),
                   ("max_over_mean", "worst max/mean expert load", "{:.3f}"),
                   ("mi", "MI(expert; label) / H(label), mean over layers", "{:.4f}"),
                   ("mi_given_byte", "MI(expert; label | byte) / H(label | byte), mean over layers",
                    "{:.4f}"))
ALPHA = 0.05  # family-wise error rate of the scanned comparisons


def _stat(per_seed: Sequence[float]) -> dict:
    """Mean, sample standard deviation and 95 % t-interval over seeds (None with one seed),
    and the per-seed values."""
    v = [float(x) for x in per_seed]
    ci = mean_interval(v)
    return {"mean": ci["mean"], "std": ci["sd"], "low": ci["low"], "high": ci["high"],
            "half_width": ci["half_width"], "per_seed": v}


def _layer_stat(per_seed_layers: Sequence[Sequence[float]]) -> dict:
    """Per-layer means over seeds, and per seed the mean over layers (the compared value)."""
    v = np.asarray(per_seed_layers, dtype=np.float64)  # [seeds, layers]
    return {"per_layer": [float(x) for x in v.mean(axis=0)], **_stat(v.mean(axis=1)),
            "per_seed_per_layer": v.tolist()}


LAYER_KEYS = ("drop_rate", "unrouted", "entropy", "mi", "mi_at_init", "mi_first_choice", "mi_byte_null",
              "mi_byte_null_p95", "mi_first_choice_byte_null", "mi_given_byte", "mi_given_byte_floor")


def _routing_row(runs: List[dict]) -> dict:
    r = [s["routing"] for s in runs]
    load = np.asarray([x["max_over_mean"] for x in r], dtype=np.float64)  # [seeds, layers]
    per_layer = load.mean(axis=0)
    row = {"max_over_mean": {"per_layer": [float(x) for x in per_layer],
                             "worst_layer": int(np.argmax(per_layer)),
                             # the compared value: each seed's worst layer
                             **_stat(load.max(axis=1)), "per_seed_per_layer": load.tolist()},
           **{key: _layer_stat([x[key] for x in r]) for key in LAYER_KEYS},
           # per layer: in how many seeds the layer is specialised beyond the byte
           "beyond_byte": [int(v) for v in np.asarray([x["beyond_byte"] for x in r]).sum(axis=0)],
           "top1_changed": None}
    if all(x["top1_changed"] is not None for x in r):
        row["top1_changed"] = {**_layer_stat([x["top1_changed"] for x in r]),
                               "between_steps": r[0]["checkpoint_steps"]}
    return row


def entry_row(entry: Entry, seeds: Sequence[int], runs: List[dict], paths: List[str],
              lr: float) -> dict:
    """The table row of one entry from the summaries of its runs (one per seed)."""
    row = {"entry": entry.name, "summary": entry.summary, "seeds": list(seeds), "runs": paths, "lr": lr,
           "top_k": runs[0]["top_k"], "val_loss": _stat([s["val_loss"] for s in runs]),
           "params_total": runs[0]["params_total"], "params_active": runs[0]["params_active"]}
    if runs[0]["routing"] is not None:
        row.update(_routing_row(runs))
    return row


def comparisons(rows: List[dict]) -> List[dict]:
    """Every pair of entries on every scanned metric both have: the paired test over seeds
    (gap = first - second, in table order) and its Holm-adjusted p-value over all of them;
    "separable" when that is below ALPHA."""
    tests = []
    for key, what, _ in SCANNED_METRICS:
        have = [r for r in rows if r.get(key)]
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                t = paired_test(a[key]["per_seed"], b[key]["per_seed"])
                tests.append({"metric": key, "a": a["entry"], "b": b["entry"], "gaps": t["gaps"],
                              "mean": t["mean"], "low": t["low"], "high": t["high"], "p": t["p"]})
    for t, adj in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adj
        t["separable"] = adj is not None and adj < ALPHA
    return tests


def build_table(settings: dict, rows: List[dict]) -> dict:
    return {"settings": settings, "rows": rows, "comparisons": comparisons(rows)}


def table_json(table: dict) -> str:
    return json.dumps(table, indent=1) + "\n"


# ---- Markdown ----------------------------------------------------------------------------

def _ci(stat: dict, fmt: str) -> str:
    if stat["half_width"] is None:
        return f"{fmt.format(stat['mean'])} (one seed)"
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['half_width'])}"


def _layers(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def _cells(row: dict) -> List[str]:
    cells = [f"`{row['entry']}`", f"{row['lr']:g}", _ci(row["val_loss"], "{:.4f}")]
    if "max_over_mean" not in row:
        cells += ["—"] * 5
    else:
        load = row["max_over_mean"]
        top1 = row["top1_changed"]
        cells += [f"{max(load['per_layer']):.3f} (layer {load['worst_layer']})",
                  f"{100 * row['drop_rate']['mean']:.2f} %", f"{100 * row['unrouted']['mean']:.2f} %",
                  f"{row['entropy']['mean']:.3f}", "—" if top1 is None else f"{top1['mean']:.3f}"]
    cells.append(f"{row['params_total']:,} / {row['params_active']:,}")
    return cells


HEADER = ("entry", "lr", "val loss (nats/byte), mean ± 95 % CI", "max/mean load (worst MoE layer)",
          "slots dropped", "tokens reaching no expert", "routing entropy (nats)",
          "top-1 changed, last 2 checkpoints", "params total / active")

SPEC_HEADER = ("entry", "k", "mi per layer", "byte null (mean)", "mi first choice", "byte null, first choice",
               "mi given byte", "its floor (mean)", "layers beyond the byte (seeds)")


def _spec_cells(row: dict) -> List[str]:
    n = len(row["seeds"])
    return [f"`{row['entry']}`", str(row["top_k"]), _layers(row["mi"]["per_layer"]),
            _layers(row["mi_byte_null"]["per_layer"]), _layers(row["mi_first_choice"]["per_layer"]),
            _layers(row["mi_first_choice_byte_null"]["per_layer"]),
            _layers(row["mi_given_byte"]["per_layer"], "{:.4f}"),
            _layers(row["mi_given_byte_floor"]["per_layer"], "{:.4f}"),
            " / ".join(f"{b}/{n}" for b in row["beyond_byte"])]


def _notes(settings: dict, rows: List[dict]) -> List[str]:
    seeds = len(rows[0]["seeds"])
    top1 = next((r["top1_changed"] for r in rows if r.get("top1_changed")), None)
    between = f"steps {top1['between_steps'][0]} and {top1['between_steps'][1]}" if top1 else \
        "the last two kept checkpoints (— when a run kept only one)"
    return [
        f"- **val loss**: the validation loss at the last step (metrics.jsonl), mean over the "
        f"{seeds} seed(s) ± the half-width of its 95 % t-interval.",
        "- **lr**: the peak learning rate of the entry's runs (chosen per entry when tuned).",
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
        f"- **top-1 changed**: share of the held-out tokens whose first-choice expert differs "
        f"between {between}, mean over MoE layers.",
        "- **params**: of the whole model; active = used for one token (router + top_k experts "
        "in each MoE layer).",
        "- **mi**: MI(expert; token category) / H(category) over all top-k slots; **byte null**: "
        "the same for random byte -> expert tables giving each token as many experts as the "
        "router did (what routing by the byte alone gives); **first choice**: the first slot only, comparable across k; **mi "
        "given byte**: MI(expert; category | byte) / H(category | byte), against its floor "
        "(each token's experts shuffled among tokens of the same byte); a layer is **beyond "
        "the byte** at a seed when mi given byte exceeds the floor's mean by more than the "
        "floor's 5-95 % width. No speed column: runs made at different machine loads are not a "
        "benchmark (benchmarks/ measures speed, interleaved).",
    ]


def _comparison_lines(table: dict) -> List[str]:
    tests = table["comparisons"]
    seeds = len(table["rows"][0]["seeds"])
    if seeds < 2:
        return ["One seed per entry: no interval, so no comparison."]
    scanned = [t for t in tests if t["p"] is not None]
    lines = [f"Paired over the {seeds} seeds (a seed gives every entry the same batches and the same "
             f"held-out windows): per pair and metric, the mean gap with its 95 % t-interval and a "
             f"paired t-test, Holm-corrected over all {len(scanned)} comparisons scanned "
             f"({len(SCANNED_METRICS)} metrics x the pairs that have them). A pair is separable "
             f"when its Holm-adjusted p is below {ALPHA}; every other pair is not separable at "
             "this budget.", ""]
    for key, what, fmt in SCANNED_METRICS:
        found = [t for t in tests if t["metric"] == key and t["separable"]]
        parts = [f"{t['a'] if t['mean'] < 0 else t['b']} < {t['b'] if t['mean'] < 0 else t['a']} "
                 f"(gap {fmt.format(abs(t['mean']))}, 95 % CI [{fmt.format(t['low'])}, {fmt.format(t['high'])}] "
                 f"for {t['a']} - {t['b']}, Holm p {t['p_holm']:.3g})" for t in found]
        lines.append(f"- {what}: {'; '.join(parts) if parts else 'no pair separable'}.")
    return lines


def table_markdown(table: dict) -> str:
    s, rows = table["settings"], table["rows"]
    lines = ["# Router tournament", "", s["description"], "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    moe = [r for r in rows if "mi" in r]
    if moe:
        lines += ["", "## Specialisation against the byte", "", "| " + " | ".join(SPEC_HEADER) + " |",
                  "|" + "---|" * len(SPEC_HEADER)]
        lines += ["| " + " | ".join(_spec_cells(r)) + " |" for r in moe]
    lines += ["", "## Differences that survive the seeds", ""] + _comparison_lines(table)
    if s.get("lr_choice"):
        lines += ["", "## Learning rates", "", "Validation loss of each entry's tuning run per rate "
                  "(the chosen rate in bold):", ""]
        for name, c in s["lr_choice"].items():
            cells = [(f"**{lr}: {'diverged' if v is None else f'{v:.4f}'}**" if float(lr) == c["lr"]
                      else f"{lr}: {'diverged' if v is None else f'{v:.4f}'}")
                     for lr, v in c["val_loss"].items()]
            lines.append(f"- `{name}`: {', '.join(cells)}")
    lines += ["", "## Entries", ""]
    lines += [f"- `{r['entry']}`: {r['summary']}." for r in rows]
    lines += ["", "## Columns", ""] + _notes(s, rows)
    return "\n".join(lines) + "\n"


def settings_of(config: dict, n_entries: int, seeds: Sequence[int], budget: str,
                reference_moe: Optional[dict], lr_choice: Optional[dict] = None) -> dict:
    """The table's settings, from a run's config.json (so they come from the runs too), and
    the learning-rate choice when the rates were tuned."""
    m, t = config["model"], config["train"]
    experts = "" if reference_moe is None else (
        f", {reference_moe['num_experts']} experts of width {reference_moe['d_ff']}, "
        f"top-{reference_moe['top_k']}")
    split = t.get("split_seed", t["seed"])
    lrs = (f"learning rate {t['lr']:g} for every entry" if lr_choice is None else
           "learning rate per entry chosen from {" + ", ".join(next(iter(lr_choice.values()))["val_loss"])
           + "} by its validation loss at a tuning seed no compared run uses (column lr)")
    desc = (f"{n_entries} entries x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}; each seed "
            f"sets the weights and the batch order), {t['steps']} steps of {t['batch_size']} x "
            f"{t['seq_len']} bytes each on the `{t['corpus']}` corpus, one validation split for "
            f"every run (split seed {split}); {lrs}; model: {m['n_layers']} layers, d_model "
            f"{m['d_model']}{experts}. {budget}")
    return {"description": desc, "steps": t["steps"], "seeds": list(seeds), "corpus": t["corpus"],
            "split_seed": split, "lr_choice": lr_choice,
            "batch_size": t["batch_size"], "seq_len": t["seq_len"], "n_layers": m["n_layers"],
            "d_model": m["d_model"], "experts": reference_moe and {
                k: reference_moe[k] for k in ("num_experts", "d_ff", "top_k")}}
