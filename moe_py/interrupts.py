"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, then stop."""
from __future__ import annotations

import signal
import threading
from typing import Optional


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped a run after a whole step and its checkpoint."""


class StopRequests:
    """While it is open (in the main thread), SIGINT and SIGTERM only set `requested`: the
    loop finishes its step, writes a checkpoint and stops, instead of dying mid-step and
    losing every step since the last checkpoint. A second signal stops at once
    (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: Optional[str] = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def close(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
