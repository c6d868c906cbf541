"""A workload for an outside profiler: one MoELayer's forward + backward at a bench_layer
shape, run --calls times after two untimed ones, e.g.

    perf record .venv/bin/python benchmarks/layer_loop.py --shape 4096,512,1024,8,2 \
        --compute-dtype bfloat16 --calls 40
    perf report --no-children --sort symbol

(symbols of the kernels need a RelWithDebInfo build: `.venv/bin/pip install
--no-build-isolation -e ".[test]" --config-settings=cmake.build-type=RelWithDebInfo`).
It prints the mean seconds per call; it compares nothing (bench_layer.py and bench_bf16.py do).
"""
from __future__ import annotations

import argparse
import time

import moe_py
from bench_layer import inputs, parse_shape
from common import machine_line, set_threads


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=parse_shape, default=(4096, 512, 1024, 8, 2), metavar="T,D,F,E,k")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    T, D, F, E, k = args.shape
    set_threads(args.threads)
    compute = None if args.compute_dtype == "float32" else args.compute_dtype
    layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=k, seed=0,
                                             compute_dtype=compute))
    x, dy, _ = inputs(args.shape)

    def call():
        layer.zero_grad()
        layer(x)
        layer.backward(dy)
    for _ in range(2):
        call()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    print(machine_line())
    print(f"{args.shape} {args.compute_dtype} threads={args.threads}: "
          f"{(time.perf_counter() - t0) / args.calls * 1e3:.1f} ms per forward + backward")


if __name__ == "__main__":
    main()
