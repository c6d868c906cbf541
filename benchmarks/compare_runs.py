"""Two run folders side by side (e.g. the main job trained with and without
--expert-parallel): wall-clock-free numbers from their metrics.jsonl.

    .venv/bin/python benchmarks/compare_runs.py runs/ep runs/single

Prints each run's median tokens/s and last validation loss, and the relative difference of
their training losses at a few steps (equal runs differ only by floating-point rounding,
which training amplifies over the steps in float32).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_py.train import read_metrics  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 10, 50, 100, 200, 400])
    args = p.parse_args()
    runs = [read_metrics(args.run_a), read_metrics(args.run_b)]
    for name, m in zip((args.run_a, args.run_b), runs):
        vals = [r["val_loss"] for r in m if "val_loss" in r]
        print(f"{name}: {len(m)} steps, median {np.median([r['tokens_per_s'] for r in m]):,.0f} "
              f"tokens/s, last val_loss {vals[-1] if vals else float('nan'):.4f}")
    a, b = ({r["step"]: r["loss"] for r in m} for m in runs)
    print(f"{'step':>6} {'loss a':>12} {'loss b':>12} {'|a-b|/a':>10}")
    for s in args.steps:
        if s in a and s in b:
            print(f"{s:>6} {a[s]:>12.6f} {b[s]:>12.6f} {abs(a[s] - b[s]) / abs(a[s]):>10.2e}")
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a if s in b)
    print(f"largest relative difference over the common steps: {worst:.2e}")


if __name__ == "__main__":
    main()
