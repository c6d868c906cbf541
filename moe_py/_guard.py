"""One caller at a time for objects that keep a forward's state for their backward."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional


class OneCaller:
    """A layer holds the state of its last forward until its backward: two threads using
    one layer would mix their states and silently get each other's gradients. A second
    caller gets a clear RuntimeError instead (give each thread its own layer); a backward
    from another thread than the forward's is refused too."""

    def __init__(self, what: str):
        self._what = what
        self._lock = threading.Lock()
        self._forward_thread: Optional[int] = None

    @contextmanager
    def forward(self):
        with self._held():
            yield
            self._forward_thread = threading.get_ident()

    @contextmanager
    def backward(self, forward_thread=None):
        """forward_thread: the thread that made the forward being differentiated (default:
        the latest forward's)."""
        with self._held():
            made_by = self._forward_thread if forward_thread is None else forward_thread
            if made_by not in (None, threading.get_ident()):
                raise RuntimeError(f"{self._what}: backward called from another thread than its "
                                   "forward; give each thread its own layer")
            yield

    @contextmanager
    def _held(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{self._what} is in use by another thread: a layer keeps one "
                               "forward's state for its backward, so give each thread its own layer")
        try:
            yield
        finally:
            self._lock.release()
