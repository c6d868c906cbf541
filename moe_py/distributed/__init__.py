"""Expert parallelism and data parallelism over MPI (the `mpi` extra: mpi4py + mpich).

    mpiexec -n P python -m moe_py train --expert-parallel ...

`ExpertParallelMoELayer` is MoELayer with its experts split over the ranks and tokens
travelling by all-to-all; `moe_py.distributed.train` trains the LM with it (data parallel
for the dense parts). Nothing in the core package imports this one, nor mpi4py.
"""
from .layer import ExpertParallelMoELayer

__all__ = ["ExpertParallelMoELayer"]
