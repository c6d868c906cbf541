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
from moe_py.layer import MoELayer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import as_sequences, layer_setup, prepare, token_ids  # noqa: E402


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    cases = json.load(open(sys.argv[1]))
    for name, case in cases.items():
        cfg, params, x, mask, dy, splits = layer_setup(case)
        bounds = list(splits) + [len(x)]
        sl = slice(bounds[rank], bounds[rank + 1])
        layer = ExpertParallelMoELayer(cfg, comm, full_params=params)
        ids = token_ids(case, len(x))
        ids = None if ids is None else ids[sl]
        prepare(layer, case, x[sl], mask[sl], ids)
        xs, ms, dys = as_sequences(case, x[sl], mask[sl], dy[sl])
        ids = None if ids is None else as_sequences(case, ids)[0]
        sent_before = layer.bytes_sent
        out = layer(xs, padding_mask=ms, training=case.get("training", True), token_ids=ids)
        dx = layer.backward(dys, aux_weight=case.get("aux_weight", 1.0)).reshape(-1, cfg.d_model)
        r = out.router
        np.savez(os.path.join(sys.argv[2], f"{name}.rank{rank}.npz"), y=out.y.reshape(-1, cfg.d_model), dx=dx,
                 lo=layer.expert_range[0], hi=layer.expert_range[1],
                 losses=np.array([out.losses[k] for k in ("load_balance", "z_loss", "entropy")]),
                 aux_loss=out.aux_loss, bytes_sent=layer.bytes_sent - sent_before,
                 **{f"router.{f}": getattr(r, f) for f in r._fields},
                 **{f"grad.{k}": g for k, g in layer.grads.items()})
    bad_inputs(comm, os.path.join(sys.argv[2], f"errors.rank{rank}.json"))
    whole_params(comm, os.path.join(sys.argv[2], f"params.rank{rank}.npz"))


def whole_params(comm, path: str) -> None:
    """gather_params() after construction, and after load_full_params() of other weights."""
    import moe_py
    cfg = moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, num_shared_experts=1, seed=5)
    layer = ExpertParallelMoELayer(cfg, comm)
    first = layer.gather_params()
    other = MoELayer(moe_py.MoEConfig(**{**cfg.__dict__, "seed": 6})).state_dict()
    layer.load_full_params(other)
    second = layer.gather_params()
    np.savez(path, **{f"first.{k}": v for k, v in first.items()},
             **{f"second.{k}": v for k, v in second.items()})


def bad_inputs(comm, path: str) -> None:
    """The exception each bad argument raises (type and message), before any collective."""
    import moe_py
    cfg = moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, dtype="float64")
    layer = ExpertParallelMoELayer(cfg, comm)
    wrong = MoELayer(cfg).state_dict()
    wrong["w1"] = wrong["w1"][:, :4]
    attempts = {
        "comm": lambda: ExpertParallelMoELayer(cfg, comm="world"),
        "cfg": lambda: ExpertParallelMoELayer({"d_model": 8}, comm),
        "full_params": lambda: ExpertParallelMoELayer(cfg, comm, full_params=wrong),
        "x_dtype": lambda: layer(np.zeros((3, 8), np.float32)),
        "x_shape": lambda: layer(np.zeros((3, 7))),
        "mask": lambda: layer(np.zeros((3, 8)), padding_mask=np.ones(4, bool)),
        "token_ids": lambda: ExpertParallelMoELayer(
            moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, router="hash", dtype="float64"), comm)(np.zeros((3, 8))),
        # a collective check: every rank sees the others' sequence length and raises alike
        "seq_len": lambda: ExpertParallelMoELayer(
            moe_py.MoEConfig(d_model=8, d_ff=8, num_experts=4, router="sinkhorn", dtype="float64",
                             load_balance_scope="sequence"), comm)(np.zeros((2, 2 + comm.Get_rank(), 8))),
        "backward_first": lambda: ExpertParallelMoELayer(cfg, comm).backward(np.zeros((3, 8))),
    }
    seen = {}
    for name, fn in attempts.items():
        try:
            fn()
            seen[name] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            seen[name] = [type(e).__name__, str(e)]
    with open(path, "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main()
