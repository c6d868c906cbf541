"""Expert parallelism and data parallelism over MPI (the `mpi` extra: mpi4py + mpich).

    mpiexec -n P python -m moe_py train --expert-parallel ...

`ExpertParallel` is the trainer's strategy for an MPI job (moe_py/parallel.py): every MoE
layer's experts split over the ranks, the rest data parallel. `ExpertParallelMoELayer` is
MoELayer with its experts on the ranks and tokens travelling by all-to-all
(moe_py/dispatch.py's AllToAllDispatcher). Nothing in the core package imports this one,
nor mpi4py, unless asked for expert parallelism.
"""
from .layer import ExpertParallelMoELayer
from .parallel import ExpertParallel

__all__ = ["ExpertParallel", "ExpertParallelMoELayer"]
