"""OpenMP thread count of the C++ kernels. Results are bitwise identical at any count."""
import numpy as np

from . import _kernels
from ._omp_env import MAX_THREADS  # noqa: F401  (the limit set_num_threads checks)


def set_num_threads(n: int) -> None:
    """Threads of every later kernel call, from whichever Python thread makes it."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n: expected an integer number of threads in [1, {MAX_THREADS}], got {n!r}")
    _kernels.set_num_threads(int(n))


def get_num_threads() -> int:
    return _kernels.get_num_threads()
