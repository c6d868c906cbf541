"""Run under mpiexec: one forward and backward of ExpertParallelMoELayer per case; each
rank writes what it computed for its own tokens to OUT/<case>.rank<r>.npz.
tests/test_distributed.py compares them with a single-process MoELayer on the global batch.
Usage: layer_cases.py CASES.json OUT_DIR"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from moe_py.distributed import ExpertParallelMoELayer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import layer_setup  # noqa: E402


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    cases = json.load(open(sys.argv[1]))
    for name, case in cases.items():
        cfg, params, x, mask, dy, splits = layer_setup(case)
        bounds = list(splits) + [len(x)]
        sl = slice(bounds[rank], bounds[rank + 1])
        layer = ExpertParallelMoELayer(cfg, comm, full_params=params)
        out = layer(x[sl], padding_mask=mask[sl], training=case.get("training", True))
        dx = layer.backward(dy[sl], aux_weight=case.get("aux_weight", 1.0))
        r = out.router
        np.savez(os.path.join(sys.argv[2], f"{name}.rank{rank}.npz"), y=out.y, dx=dx,
                 lo=layer.expert_range[0], hi=layer.expert_range[1],
                 losses=np.array([out.losses[k] for k in ("load_balance", "z_loss", "entropy")]),
                 aux_loss=out.aux_loss, bytes_sent=layer.bytes_sent,
                 **{f"router.{f}": getattr(r, f) for f in r._fields},
                 **{f"grad.{k}": g for k, g in layer.grads.items()})


if __name__ == "__main__":
    main()
