"""Write docs/results.md's section "bfloat16 against float32" from the two tournaments
`scripts/bf16_results.sh` makes (RESULTS_DIR/float32 and RESULTS_DIR/bfloat16, the default
model on the built-in corpus, the same seeds, split and learning rate):

    .venv/bin/python scripts/bf16_results.py RESULTS_DIR [--out docs/results.md]

The section sits between two marker lines and replaces an earlier one; scripts/results.py
keeps it when it rewrites the rest of the file."""
from __future__ import annotations

import argparse
import datetime
import json
import os

from moe_py.stats import mean_interval, paired_test

BEGIN, END = "<!-- bf16-vs-fp32 -->", "<!-- /bf16-vs-fp32 -->"


def row(results: str, arm: str) -> dict:
    with open(os.path.join(results, arm, "tournament.json")) as f:
        table = json.load(f)
    (r,) = [r for r in table["rows"] if r["entry"] == "softmax_lb"]
    return {"seeds": r["seeds"], "lr": r["lr"], "losses": r["val_loss"]["per_seed"],
            "description": table["settings"]["description"]}


def section(results: str) -> str:
    fp32, bf16 = row(results, "float32"), row(results, "bfloat16")
    if fp32["seeds"] != bf16["seeds"] or fp32["lr"] != bf16["lr"]:
        raise SystemExit("the two arms must share seeds and learning rate")
    with open(os.path.join(results, "machine.txt")) as f:
        machine = f.read().strip()
    a, b = mean_interval(fp32["losses"]), mean_interval(bf16["losses"])
    gap = paired_test(bf16["losses"], fp32["losses"])
    inside = a["low"] <= b["mean"] <= a["high"] and b["low"] <= a["mean"] <= b["high"]
    per_seed = lambda v: " / ".join(f"{x:.4f}" for x in v)  # noqa: E731
    return "\n".join([
        BEGIN, "## bfloat16 against float32", "",
        f"Made by `bash scripts/bf16_results.sh` on {datetime.date.today().isoformat()} "
        "(runs in `runs/bf16/`). The default `train` model (`softmax_lb`) with "
        "`--compute-dtype bfloat16` against the same model in float32: the float32 arm's learning rate "
        f"was tuned on {{0.001, 0.003, 0.01}} at the tuning seed ({fp32['lr']:g}), and the bfloat16 arm "
        "uses it; same seeds, same validation split. " + fp32["description"].replace("1 entries", "1 entry"),
        "", "```", machine, "```", "",
        "| compute | val loss, mean ± 95 % CI | per seed |", "|---|---|---|",
        f"| float32 | {a['mean']:.4f} ± {a['half_width']:.4f} | {per_seed(fp32['losses'])} |",
        f"| bfloat16 | {b['mean']:.4f} ± {b['half_width']:.4f} | {per_seed(bf16['losses'])} |", "",
        f"Paired gap bfloat16 - float32: {gap['mean']:+.4f} (95 % CI [{gap['low']:+.4f}, {gap['high']:+.4f}]; "
        f"per seed {', '.join(f'{g:+.4f}' for g in gap['gaps'])}; p {gap['p']:.2g}). "
        + ("Each arm's mean lies inside the other's seed interval. " if inside else
           "The means are NOT inside each other's seed intervals. ")
        + (f"Paired by seed, though, the gap's interval excludes 0: bfloat16 compute costs "
           f"{abs(gap['mean']):.3f} nats/byte {'more' if gap['mean'] > 0 else 'less'} loss at this budget, on "
           f"{sum(g > 0 for g in gap['gaps']) if gap['mean'] > 0 else sum(g < 0 for g in gap['gaps'])} of "
           f"{len(gap['gaps'])} seeds." if gap["low"] > 0 or gap["high"] < 0 else
           "Paired by seed, the gap's interval includes 0: not separable at this budget."),
        END])


def splice(text: str, block: str) -> str:
    """text with its marked section replaced by block (appended when it has none)."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("results")
    p.add_argument("--out", default="docs/results.md")
    args = p.parse_args()
    block = section(args.results)
    with open(args.out) as f:
        text = f.read()
    with open(args.out, "w") as f:
        f.write(splice(text, block))
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
