"""Byte-level generation from a trained model (eval mode: no router noise)."""
from __future__ import annotations

import math

import numpy as np

from .models import TransformerLM

# One forward per byte: a million bytes is hours on a laptop core, more is a typo.
MAX_SAMPLE_LENGTH = 1_000_000


def generate(model: TransformerLM, prompt: bytes, length: int, temperature: float = 0.8,
             seed: int = 0) -> bytes:
    """Sample `length` bytes after `prompt` (temperature 0: greedy)."""
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= MAX_SAMPLE_LENGTH:
        raise ValueError(f"length: expected an integer in [0, {MAX_SAMPLE_LENGTH:,}] (one forward per "
                         f"byte), got {length!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature}")
    rng = np.random.default_rng(seed)
    out = list(prompt) or [10]
    S = model.cfg.max_seq_len
    for _ in range(length):
        window = np.array([out[-S:]], dtype=np.int64)
        logits = model.forward(window, training=False).head_logits[0][0, -1].astype(np.float64)
        if temperature == 0:
            nxt = int(np.argmax(logits))
        else:
            z = logits / temperature
            p = np.exp(z - z.max())
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
    return bytes(out)
