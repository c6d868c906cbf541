"""Write docs/results.md from the run folders `scripts/results.sh` makes: every number there
comes from the tournaments' tournament.json files and the runs' own metrics, on this machine.

    .venv/bin/python scripts/results.py RESULTS_DIR [--out docs/results.md]

RESULTS_DIR holds python/ and synthetic/ (tournament folders), machine.txt (`moe_py info`)
and <corpus>.txt: the "runs: N trained, ...; S s" line of every tournament call; the cost
reported is that of the call that trained the most runs."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

import bf16_results  # scripts/, beside this file
from moe_py.collapse import CollapseWatch
from moe_py.stats import t_ppf

CORPORA = ("synthetic", "python")
# The gap (nats/byte) a seed budget should resolve: a tenth of the spread between the
# tournament's entries, the size of the differences the README used to claim.
TARGET_GAP = 0.02


def load(results: str, corpus: str) -> dict:
    with open(os.path.join(results, corpus, "tournament.json")) as f:
        return json.load(f)


def rows_by_entry(table: dict) -> dict:
    return {r["entry"]: r for r in table["rows"]}


def fmt_ci(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['half_width']:.{digits}f}"


def test_of(table: dict, metric: str, a: str, b: str) -> dict:
    for t in table["comparisons"]:
        if t["metric"] == metric and {t["a"], t["b"]} == {a, b}:
            if t["a"] == a:
                return t
            flipped = dict(t, a=a, b=b, mean=-t["mean"], low=-t["high"], high=-t["low"],
                           gaps=[-g for g in t["gaps"]])
            return flipped
    raise KeyError(f"no comparison {metric} {a} {b}")


def describe_test(t: dict) -> str:
    """A planned comparison (what `compare` computes: its own interval decides) and the same
    pair inside the table's scan (Holm over every comparison it makes)."""
    planned = "excludes 0" if t["low"] > 0 or t["high"] < 0 else "includes 0"
    scanned = "separable" if t["separable"] else "not separable"
    return (f"{t['mean']:+.3f} (95 % CI [{t['low']:+.3f}, {t['high']:+.3f}]; per seed "
            f"{', '.join(f'{g:+.3f}' for g in t['gaps'])}; paired p {t['p']:.2g}). As one planned "
            f"comparison its interval {planned}; among the table's comparisons (Holm p "
            f"{t['p_holm']:.2g}) it is {scanned}")


def loss_table(table: dict) -> list:
    lines = ["| entry | lr (tuned) | val loss, mean ± 95 % CI | per seed |", "|---|---|---|---|"]
    for r in sorted(table["rows"], key=lambda r: r["val_loss"]["mean"]):
        lines.append(f"| `{r['entry']}` | {r['lr']:g} | {fmt_ci(r['val_loss'])} | "
                     f"{' / '.join(f'{v:.3f}' for v in r['val_loss']['per_seed'])} |")
    return lines


def spec_table(table: dict) -> list:
    lines = ["| entry | k | mi (mean of layers) | byte null | mi, first choice | its byte null | "
             "mi given byte | its floor | layers x seeds beyond the byte |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        if "mi" not in r:
            continue
        n = len(r["seeds"]) * len(r["beyond_byte"])
        mean = lambda key: sum(r[key]["per_layer"]) / len(r[key]["per_layer"])  # noqa: E731
        lines.append(f"| `{r['entry']}` | {r['top_k']} | {fmt_ci(r['mi'])} | {mean('mi_byte_null'):.3f} | "
                     f"{mean('mi_first_choice'):.3f} | {mean('mi_first_choice_byte_null'):.3f} | "
                     f"{fmt_ci(r['mi_given_byte'], 4)} | {mean('mi_given_byte_floor'):.4f} | "
                     f"{sum(r['beyond_byte'])} of {n} |")
    return lines


def separable_lines(table: dict) -> list:
    found = [t for t in table["comparisons"] if t["separable"]]
    scanned = sum(1 for t in table["comparisons"] if t["p"] is not None)
    out = [f"{len(found)} of {scanned} comparisons survive Holm at 0.05:"]
    for t in sorted(found, key=lambda t: (t["metric"], t["p_holm"])):
        lo, hi = (t["a"], t["b"]) if t["mean"] < 0 else (t["b"], t["a"])
        out.append(f"- {t['metric']}: `{lo}` < `{hi}` by {abs(t['mean']):.4f} "
                   f"(95 % CI of {t['a']} - {t['b']}: [{t['low']:+.4f}, {t['high']:+.4f}], Holm p {t['p_holm']:.2g})")
    return out


def seeds_needed(sd: float, gap: float, most: int = 200) -> int:
    """The fewest seeds whose 95 % t half-width on a paired gap of spread sd is below gap."""
    for n in range(2, most + 1):
        if t_ppf(0.975, n - 1) * sd / n ** 0.5 < gap:
            return n
    return most


def gap_sds(table: dict) -> list:
    """The seed-to-seed standard deviation of every paired val-loss gap, sorted."""
    return sorted(float((sum((g - t["mean"]) ** 2 for g in t["gaps"]) / (len(t["gaps"]) - 1)) ** 0.5)
                  for t in table["comparisons"] if t["metric"] == "val_loss" and len(t["gaps"]) > 1)


def budget_sd(table: dict) -> float:
    sds = gap_sds(table)
    return sds[len(sds) // 2]


def budget_lines(table: dict) -> list:
    """The seed count the measured spread of paired gaps asks for (a projection)."""
    sds = gap_sds(table)
    median = budget_sd(table)
    return [f"Paired val-loss gaps between entries vary over seeds with a standard deviation of "
            f"{sds[0]:.3f} to {sds[-1]:.3f} (median {median:.3f}) nats/byte. At the median, a 95 % "
            f"interval narrower than ±{TARGET_GAP} needs {seeds_needed(median, TARGET_GAP)} seeds; "
            f"±0.05 needs {seeds_needed(median, 0.05)}. (A projection from this spread, before any "
            f"multiple-comparison correction, which asks for more.)"]


def collapse_lines(results: str, corpus: str, entry: str, seeds) -> list:
    """Each seed's collapse episodes, replayed from its metrics.jsonl through CollapseWatch
    with the run's own thresholds (the summary train writes at its last step)."""
    out = []
    for s in seeds:
        run = os.path.join(results, corpus, entry, f"seed-{s}")
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(run, "config.json")) as f:
            t = json.load(f)["train"]
        watch = CollapseWatch(t["collapse_low_share"], t["collapse_max_over_mean"], t["collapse_steps"])
        for r in rows:
            watch.update(r["step"], r["expert_share"])
        c = watch.summary(rows[-1]["expert_share"])
        eps = "; ".join(f"layer {e['layer']} steps {e['start']}-{e['end']}" for e in c["episodes"]) or "none"
        dead = sum(len(d) for d in c["dead_experts"])
        out.append(f"- seed {s}: episodes {eps}; all layers within thresholds since step "
                   f"{c['stable_since']}; {dead} dead expert(s) at step {rows[-1]['step']}")
    return out


def status(t: dict) -> str:
    """A claim scanned among many: it holds only when it survives Holm."""
    gap = (f"{t['a']} - {t['b']} = {t['mean']:+.3f}, 95 % CI [{t['low']:+.3f}, {t['high']:+.3f}], "
           f"Holm p {t['p_holm']:.2g}")
    if t["separable"]:
        return f"holds: {t['a'] if t['mean'] < 0 else t['b']} lower ({gap})"
    return f"not separable at this budget ({gap})"


def claims(tables: dict, results: str) -> list:
    py = tables["python"]
    rows = rows_by_entry(py)
    out = [f"- \"MoE beats a dense FFN of the same active size\" (`compare`, one seed: 2.591 against "
           f"2.629). MoE - dense on `python`: {describe_test(test_of(py, 'val_loss', 'softmax_lb', 'dense'))}; "
           f"on `synthetic`: {describe_test(test_of(tables['synthetic'], 'val_loss', 'softmax_lb', 'dense'))}."]
    for a, b, said in (("hash", "dense", "`hash` has the lowest validation loss"),
                       ("softmax_noise", "softmax_lb", "`softmax_noise` is behind `softmax_lb`"),
                       ("softmax_noise", "sigmoid_bias", "`softmax_noise` is behind `sigmoid_bias`"),
                       ("expert_choice", "sigmoid_bias", "`expert_choice` is ahead of `sigmoid_bias`")):
        if a in rows and b in rows:
            out.append(f"- \"{said}\" (said from 2 seeds): at 3 seeds, {status(test_of(py, 'val_loss', a, b))}.")
    learned = [r for r in py["rows"] if "mi" in r and r["entry"] != "hash"]
    above = [r["entry"] for r in learned
             if all(m > n for m, n in zip(r["mi"]["per_layer"], r["mi_byte_null_p95"]["per_layer"]))]
    out.append(f"- \"Every learned router's experts carry more information about the token category than "
               f"the model at initialisation\": true of the init floor, but the null that matters is a "
               f"random byte table; on `python` the entries whose mi is above the byte null's 95th "
               f"percentile in every layer (mean over seeds): {', '.join(f'`{e}`' for e in above) or 'none'}.")
    if "sigmoid_shared" in rows:
        t = [x for x in py["comparisons"] if x["metric"] == "mi_given_byte" and "sigmoid_shared" in (x["a"], x["b"])
             and x["separable"]]
        out.append(f"- \"`sigmoid_shared` (top-1) is the most specialised\": its mi is over one routed slot "
                   f"against two for the others, so it is compared on `mi_first_choice` and `mi_given_byte`; "
                   f"on `mi_given_byte` it is separable from {len(t)} of the other MoE entries "
                   f"({', '.join(sorted({x['a'] if x['b'] == 'sigmoid_shared' else x['b'] for x in t})) or 'none'}).")
    col = collapse_lines(results, "python", "softmax_lb", py["settings"]["seeds"])
    out.append("- \"Routing collapsed early and recovered\": now reported as episodes; `softmax_lb` on "
               "`python`:" + ("" if col else " (no collapse summary in these runs)"))
    out += ["  " + c for c in col]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--out", default="docs/results.md")
    args = p.parse_args()
    with open(os.path.join(args.results, "machine.txt")) as f:
        machine = f.read().strip()
    times = {}  # corpus: (runs trained, wall seconds) of the call that trained the most
    for c in CORPORA + ("python6",):
        path = os.path.join(args.results, f"{c}.txt")
        if os.path.exists(path):
            with open(path) as f:
                calls = [tuple(int(v) for v in m.groups())
                         for m in re.finditer(r"runs: (\d+) trained.*?; (\d+) s", f.read())]
            if calls and max(calls)[0] > 0:
                times[c] = max(calls)
    tables = {c: load(args.results, c) for c in CORPORA}
    settings = tables["python"]["settings"]
    today = datetime.date.today().isoformat()
    L = ["# Results", "",
         f"Made by `bash scripts/results.sh` on {today}. Every number below comes from the run folders "
         "it writes (`runs/results/`), through `scripts/results.py`; rerun it to check them. Machine "
         "(`python -m moe_py info`):", "", "```", machine, "```", "",
         "Budget of each tournament (the same on both corpora but for the corpus): "
         + settings["description"].replace("on the `python` corpus", "on the corpus named in its section"), ""]
    for c, (trained, seconds) in times.items():
        if c not in CORPORA:
            continue
        L.append(f"- `{c}` tournament: {trained} runs of {settings['steps']} steps (tuning and seeds) "
                 f"in {seconds / 60:.0f} min of wall time on 2 threads (see the notes below).")
    notes = os.path.join(args.results, "notes.md")
    if os.path.exists(notes):  # what the person who ran it saw and the files cannot say
        with open(notes) as f:
            L += ["", f.read().strip()]
    L += ["", "## MoE against a dense FFN of the same active width", "",
          "`softmax_lb` (the default `train` model) against `dense` (FFN width top_k x d_ff), each at "
          "its own tuned learning rate, paired over seeds (gap = MoE - dense, validation loss in "
          "nats/byte):", ""]
    for c in CORPORA:
        L.append(f"- `{c}`: " + describe_test(test_of(tables[c], "val_loss", "softmax_lb", "dense")))
    for c in CORPORA:
        t = tables[c]
        L += ["", f"## The tournament on `{c}`", "", *loss_table(t), "", *separable_lines(t), "",
              "Specialisation against its nulls (means over MoE layers and seeds; per-layer values in "
              f"`runs/results/{c}/tournament.md`):", "", *spec_table(t), "",
              "How many seeds the spread asks for:", "", *budget_lines(t)]
        col = collapse_lines(args.results, c, "softmax_lb", t["settings"]["seeds"])
        if col:
            L += ["", "Collapse episodes of `softmax_lb` (each run's metrics.jsonl replayed through "
                  "CollapseWatch with its thresholds, as `train` reports them at its end):", "", *col]
    six = os.path.join(args.results, "python6", "tournament.json")
    if os.path.exists(six):
        with open(six) as f:
            t6 = json.load(f)
        L += ["", "## Six seeds for `dense`, `softmax_lb` and `hash` on `python`", "",
              "Seeds 0-2 are the tournament's runs above; seeds 3-5 are new (same tuned rates). The Holm "
              "correction here is over this table's own comparisons (3 entries).", "", *loss_table(t6), ""]
        for a, b in (("softmax_lb", "dense"), ("hash", "dense"), ("hash", "softmax_lb")):
            L.append(f"- `{a}` - `{b}`: " + describe_test(test_of(t6, "val_loss", a, b)))
    if os.path.exists(six) and "python6" in times:
        trained, seconds = times["python6"]
        per_run = seconds / trained  # its table's analysis included: a slight over-estimate
        sds = budget_sd(tables["python"])
        n = max(6, seeds_needed(sds, 0.05))
        runs = len(tables["python"]["rows"]) * (n + len(next(iter(settings["lr_choice"].values()))["val_loss"]))
        sep = [t["separable"] for t in t6["comparisons"] if t["metric"] == "val_loss"]
        L += ["", "## A budget that separates", "",
              f"On `python` the median spread of paired gaps asks for {seeds_needed(sds, 0.05)} seeds for a "
              f"±0.05 interval; at 6 seeds {sum(sep)} of the {len(sep)} val-loss gaps between `dense`, "
              f"`softmax_lb` and `hash` separate (above). So the documented budget of the tournament on the built-in corpus is 400 steps "
              f"x {n} seeds with a 3-rate grid: {runs} runs. The six-seed call trained {trained} runs in "
              f"{seconds} s with nothing else running ({per_run:.0f} s a run with its analysis), so that "
              f"budget costs about {runs * per_run / 60:.0f} min on 2 threads of this machine. The "
              f"default (3 seeds) costs {len(tables['python']['rows']) * 6 * per_run / 60:.0f} min; the "
              f"val-loss gaps it separated after Holm are listed per corpus above."]
    L += ["", "## What the nulls say", ""]
    spec = {c: rows_by_entry(tables[c]) for c in CORPORA}
    for c in CORPORA:
        r = spec[c]["softmax_lb"]
        with open(os.path.join(args.results, c, "softmax_lb", "seed-0", "analysis.json")) as f:
            lab = json.load(f)["label_given_byte"][0]
        L.append(f"- `{c}`: the byte fixes {100 * lab['byte_label_mi']:.0f} % of the label's entropy on "
                 f"the analysed tokens. `softmax_lb`: mi {fmt_ci(r['mi'])} against random byte tables "
                 f"{sum(r['mi_byte_null']['per_layer']) / len(r['mi_byte_null']['per_layer']):.3f} "
                 f"(95th percentile {sum(r['mi_byte_null_p95']['per_layer']) / len(r['mi_byte_null_p95']['per_layer']):.3f}); "
                 f"mi given byte {fmt_ci(r['mi_given_byte'], 4)} against its shuffle floor "
                 f"{sum(r['mi_given_byte_floor']['per_layer']) / len(r['mi_given_byte_floor']['per_layer']):.4f}; "
                 f"beyond the byte in {sum(r['beyond_byte'])} of {len(r['beyond_byte']) * len(r['seeds'])} "
                 "layer-seeds.")
    L += ["", "## Figures", "",
          "The default model (`softmax_lb`, seed 0) on `synthetic` against its nulls "
          "(`analyze`'s specialisation.png), and which experts take which domain (its expert_label.png):",
          "", "![](specialisation.png)", "", "![](expert_label.png)", "",
          "Every entry on `synthetic` (the tournament's specialisation.png):", "",
          "![](tournament_specialisation.png)", "",
          "Validation loss of every entry on `python` (the tournament's val_loss.png):", "",
          "![](tournament_val_loss.png)"]
    L += ["", "## The earlier claims, restated", "",
          "What the README and notebooks said before this budget existed (one seed, or two, a split that "
          "moved with the seed, one learning rate, MI against the model at init only), and what the "
          "numbers above say of each:", ""]
    L += claims(tables, args.results)
    text = "\n".join(L) + "\n"
    if os.path.exists(args.out):  # scripts/bf16_results.py's section, kept
        with open(args.out) as f:
            old = f.read()
        if bf16_results.BEGIN in old:
            text = bf16_results.splice(text, bf16_results.BEGIN + old.split(bf16_results.BEGIN, 1)[1].split(
                bf16_results.END, 1)[0] + bf16_results.END)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
