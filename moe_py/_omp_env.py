"""OMP_NUM_THREADS checked before the extension (and so libgomp) loads: libgomp reads it
once, at load, and a huge value makes it fail to create threads (40000: "Thread creation
failed", exit 1) or crash (200000: SIGSEGV at the first kernel). Values above MAX_THREADS
are clamped to it, with a warning naming the variable."""
import os
import warnings

# More than this is a typo, not a machine; moe_py.set_num_threads refuses it too.
MAX_THREADS = 1024


def clamp_omp_num_threads(environ=os.environ) -> None:
    """Clamp each entry of OMP_NUM_THREADS (a comma-separated list of positive integers) to
    MAX_THREADS in `environ`. Text that is not such a list is left for libgomp, which ignores
    it with its own message."""
    text = environ.get("OMP_NUM_THREADS")
    if not text:
        return
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        return
    clamped = [str(min(int(p), MAX_THREADS)) for p in parts]
    if clamped != parts:
        environ["OMP_NUM_THREADS"] = ",".join(clamped)
        warnings.warn(f"OMP_NUM_THREADS={text}: more than {MAX_THREADS} threads; moe_py uses "
                      f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}", RuntimeWarning, stacklevel=3)
