"""Checkpoints: one .npz with the model, the optimiser, the step, both configs
and the noise-annealing state; written atomically so a crash never leaves a
half-written file in place of the last good one."""
from __future__ import annotations

import json
import os
from typing import Tuple

import numpy as np

from .models import ModelConfig, TransformerLM
from .optim import AdamW


def save_checkpoint(path: str, model: TransformerLM, optim: AdamW, step: int, train_cfg: dict) -> None:
    arrays = {f"model.{n}": p for n, p, _ in model.named_parameters()}
    arrays.update({f"optim.{k}": v for k, v in optim.state_dict().items()})
    for i, layer in enumerate(model.moe_layers):
        arrays[f"noise.{i}"] = np.array(json.dumps(layer.router.noise_state()))
    arrays["step"] = np.array(step)
    arrays["model_config"] = np.array(json.dumps(model.cfg.to_dict()))
    arrays["train_config"] = np.array(json.dumps(train_cfg))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_model(path: str) -> Tuple[TransformerLM, dict]:
    """The model of a checkpoint (with its noise state) and the raw archive."""
    try:
        data = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as e:
        raise OSError(f"checkpoint: cannot read {path}: {e}") from e
    model = TransformerLM(ModelConfig.from_dict(json.loads(str(data["model_config"]))))
    for n, p, _ in model.named_parameters():
        p[...] = data[f"model.{n}"]
    for i, layer in enumerate(model.moe_layers):
        layer.router.load_noise_state(json.loads(str(data[f"noise.{i}"])))
    return model, data


def load_optimizer(optim: AdamW, data: dict) -> None:
    optim.load_state_dict({k[len("optim."):]: v for k, v in data.items() if k.startswith("optim.")})
