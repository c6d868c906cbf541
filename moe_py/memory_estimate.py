"""An up-front estimate of a micro-batch's activations, to refuse sizes that cannot fit
before anything is allocated or written."""
from __future__ import annotations

import numpy as np

from .machine import available_bytes
from .models import ModelConfig


def activation_bytes(model_cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """A rough estimate (within a small factor) of the memory one micro-batch's forward and
    backward hold: per token and block the attention's projections and scores and the FFN's
    hidden rows, and the heads' logits, twice (values and their gradients)."""
    d, S = model_cfg.d_model, seq_len
    moe = model_cfg.moe
    ffn = (moe.top_k * (4 * moe.d_ff + 3 * d) if moe is not None else 3 * model_cfg.d_ff)
    per_token = model_cfg.n_layers * (16 * d + 2 * model_cfg.n_heads * S + ffn) \
        + 3 * model_cfg.n_predict * model_cfg.vocab_size
    return 2 * batch_size * seq_len * per_token * np.dtype(model_cfg.dtype).itemsize


def check_memory(model_cfg: ModelConfig, train_cfg) -> None:
    """Refuse a micro-batch whose activations cannot fit in the memory available now,
    before anything is allocated (Linux overcommits: it would run on into swap or the OOM
    killer instead of failing)."""
    need, have = activation_bytes(model_cfg, train_cfg.batch_size, train_cfg.seq_len), available_bytes()
    if have is not None and need > have:
        raise ValueError(f"batch_size: a micro-batch of {train_cfg.batch_size} x {train_cfg.seq_len} "
                         f"bytes needs about {need / 2**30:.1f} GiB of activations, more than the "
                         f"{have / 2**30:.1f} GiB available; try a smaller --batch-size or --seq-len "
                         "(--grad-accum keeps the step's size)")
