"""Progress of `train`, `compare` and `tournament` on stderr: tqdm's bar on a terminal; one
plain line every `log_every` steps when stderr is anything else (a batch job's log, `| tee`,
a notebook's captured stream), where tqdm's carriage-return frames pile up (a default run
piped to a file wrote about 82 KB of them).

LOG_EVERY is 50 steps: the default eval_every, so that with the default schedule each line
falls on a validation step and shows a fresh val loss; a default 400-step run writes 8
lines."""
from __future__ import annotations

import sys
import time
from typing import Dict, Optional

LOG_EVERY = 50


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def progress_bar(total: int, initial: int, desc: str = "train", log_every: int = LOG_EVERY, **tqdm_kw):
    """A tqdm bar on stderr when stderr is a terminal (None without tqdm), else a LineProgress
    printing every log_every steps (0: only when refresh() is called). tqdm_kw are tqdm's
    (ignored by LineProgress)."""
    if not is_terminal(sys.stderr):
        return LineProgress(total, initial, desc, log_every)
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                    **tqdm_kw)
    except ImportError:  # the bar is a nicety; training does not depend on it
        return None


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """What the trainer and the tournament ask of a tqdm bar (update, set_postfix, write,
    refresh, close), as plain lines:

        train: step 50/400 (12%) 0:04 elapsed, 0:28 left | loss=2.104 tok/s=5120 val=2.210

    A line is printed when the step count reaches a multiple of `every` or the total, and on
    refresh() unless that count's line is out already. The postfix keeps each key's latest
    value (the last val loss stays shown)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", every: int = LOG_EVERY,
                 file=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"log_every: expected an integer >= 0, got {every!r}")
        self.total, self.n, self.initial, self.desc, self.every = total, initial, initial, desc, every
        self.file = file
        self.postfix: Dict[str, str] = {}
        self._printed: Optional[int] = None  # the step count of the last line
        self.t0 = time.perf_counter()

    @property
    def _out(self):
        return sys.stderr if self.file is None else self.file

    def set_postfix(self, post: Optional[dict] = None, **kw) -> None:
        self.postfix.update({k: str(v) for k, v in {**(post or {}), **kw}.items()})

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if (self.every and self.n // self.every > before // self.every) or \
                (self.n >= self.total > before):
            self.refresh()

    def line(self) -> str:
        done = self.n - self.initial
        elapsed = time.perf_counter() - self.t0
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        left = (f", {_clock(elapsed / done * (self.total - self.n))} left"
                if 0 < done and self.n < self.total else "")
        post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc}: step {self.n}/{self.total}{pct} {_clock(elapsed)} elapsed{left}"
                + (f" | {post}" if post else ""))

    def refresh(self) -> None:
        if self._printed != self.n:
            self._printed = self.n
            print(self.line(), file=self._out, flush=True)

    def write(self, msg: str) -> None:
        print(msg, file=self._out, flush=True)

    def close(self) -> None:
        pass
