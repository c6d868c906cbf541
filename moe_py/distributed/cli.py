"""`python -m moe_py train --expert-parallel ...` under `mpiexec -n P`: the train command of
moe_py/cli.py run by every rank, rank 0 alone printing, plotting and writing the run folder."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from . import comm as C


def mpi_ranks_from_launcher() -> int:
    """The job size mpiexec announced in the environment (MPICH's hydra: PMI_SIZE; Open
    MPI: OMPI_COMM_WORLD_SIZE), 1 outside MPI; read without importing mpi4py."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def train_command(args: argparse.Namespace) -> int:
    from .. import cli
    from ..train import TrainingDiverged
    comm = C.world()
    root = comm.Get_rank() == 0
    try:
        return _train(args, comm, root, cli)
    except Exception as e:  # noqa: BLE001 - every failure must end every rank
        if isinstance(e, TrainingDiverged):
            msg, code = f"moe_py: {e}", 1
        elif isinstance(e, (ValueError, TypeError, OSError, KeyError, RuntimeError)):
            msg, code = f"moe_py: error: {e}", 2
        else:
            raise
        if root or comm.Get_size() == 1:
            print(msg, file=sys.stderr)
        else:
            print(f"[rank {comm.Get_rank()}] {msg}", file=sys.stderr)
        if comm.Get_size() > 1:
            # the other ranks may be waiting in a collective this one will never join; mpiexec
            # forwards each rank's stderr asynchronously and an abort can drop what is still in
            # flight (seen under load), so the message gets a moment to arrive first
            sys.stderr.flush()
            time.sleep(1.0)
            comm.Abort(code)
        return code


def _train(args, comm, root: bool, cli) -> int:
    from ..models import ModelConfig
    from ..run_folder import RunFolder
    from ..train import TrainConfig
    from .train import train
    if args.out is None:
        if args.resume:
            raise ValueError("out: --resume needs the run folder to continue (--out)")
        # one name for all ranks: rank 0's clock decides
        args.out = C.bcast_text(comm, cli._new_run_dir("dense" if args.dense else args.router) if root else None)
        if root:
            print(f"run folder: {args.out}", file=sys.stderr)
    if args.resume:
        saved = RunFolder(args.out).read_config()
        cli._check_resume_flags(args, saved)
        model_cfg = ModelConfig.from_dict(saved["model"])
        train_cfg = TrainConfig.from_dict(saved["train"])
        if "steps" in args.explicit:
            train_cfg = dataclasses.replace(train_cfg, steps=args.steps)
        last = train(model_cfg, train_cfg, args.out, comm, resume=True)
    else:
        model_cfg, train_cfg = cli._configs(args, dense=args.dense)
        last = train(model_cfg, train_cfg, args.out, comm, overwrite=args.overwrite, quiet=not root)
    if not root:
        return 0
    cli._plot(args.out)
    if not last:
        print(f"nothing to do: the run in {args.out} is already at step {train_cfg.steps} "
              "(--steps extends it)")
        return 0
    print(f"done: step {last['step']} loss {last['loss']:.4f} "
          f"val_loss {last.get('val_loss', float('nan')):.4f}; run folder {args.out} "
          f"({comm.Get_size()} MPI rank{'s' if comm.Get_size() > 1 else ''}, expert parallel)")
    return 0
