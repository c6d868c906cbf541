"""Expert ablation and pruning of a trained run (`python -m moe_py ablate RUN`).

On the run's own held-out windows (the sample behind its val_loss):
- `deltas[l][e]`: the validation loss with expert e of MoE layer l removed (never selected;
  every other layer intact) minus the intact model's;
- `pruning`: the validation loss when every MoE layer keeps only its n most used experts
  (by the intact model's tokens per expert on the same windows), for n = E down to top_k.
Removal is moe_py/interventions.py's `ablate`; `renormalize` as there.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from .checkpoint import load_model
from .interventions import RoutingIntervention
from .report import collect_routing, held_out_of
from .run_folder import atomic_write, resolve_checkpoint, run_dir_of
from .train import evaluate

FILE = "ablation.json"


def loads(model, sampler, max_batches: int) -> List[np.ndarray]:
    """Tokens per expert of each MoE layer over the held-out windows (before capacity)."""
    routers, *_ = collect_routing(model, sampler, max_batches)
    return [r.tokens_per_expert.astype(np.int64) for r in routers]


def ablate_run(path: str, max_batches: Optional[int] = None, renormalize: bool = True) -> Dict[str, Any]:
    """The deltas and the pruning curve of the module docstring for a run folder (or one of
    its checkpoints); written to RUN/ablation.json."""
    model, raw = load_model(resolve_checkpoint(path))
    if not model.moe_layers:
        raise ValueError(f"run folder: {path} holds a dense model; there are no experts to remove")
    cfg = model.moe_layers[0].cfg
    if cfg.traits.experts_choose:
        raise NotImplementedError(f"ablate: {cfg.router} lets experts pick tokens; removing one "
                                  "changes every other expert's picks")
    _, _, sampler, max_batches = held_out_of(raw, max_batches)
    L, E, k = len(model.moe_layers), cfg.num_experts, cfg.top_k
    base = evaluate(model, sampler, max_batches)
    deltas = []
    for layer in range(L):
        row = []
        for e in range(E):
            routing: List[Optional[RoutingIntervention]] = [None] * L
            routing[layer] = RoutingIntervention(ablate=(e,), renormalize=renormalize)
            row.append(evaluate(model, sampler, max_batches, routing=routing) - base)
        deltas.append(row)
    usage = loads(model, sampler, max_batches)
    pruning = []
    for kept in range(E, k - 1, -1):
        routing = [None if kept == E else RoutingIntervention(
            ablate=tuple(int(e) for e in least_used(u, E - kept)), renormalize=renormalize) for u in usage]
        pruning.append({"kept": kept, "val_loss": evaluate(model, sampler, max_batches, routing=routing)})
    result = {"run": run_dir_of(path), "step": int(raw["step"]), "val_loss": base,
              "renormalize": renormalize, "batches": max_batches, "deltas": deltas,
              "tokens_per_expert": [u.tolist() for u in usage], "pruning": pruning}
    atomic_write(os.path.join(run_dir_of(path), FILE), json.dumps(result, indent=1).encode())
    return result


def least_used(load: np.ndarray, n: int) -> np.ndarray:
    """The n experts with the fewest tokens (ties: the higher index goes first)."""
    order = np.lexsort((-np.arange(len(load)), load))
    return np.sort(order[:n])
