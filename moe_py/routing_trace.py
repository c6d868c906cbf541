"""The routing trace: which experts every token went to, per step, micro-batch and MoE layer,
as JSONL (`train --trace-routing` writes RUN/routing_trace.jsonl; `read_trace` reads it back,
`replay_routing` turns a step's records into the interventions that replay it).

One line per (step, micro_batch, MoE layer):

    {"step": 3, "micro_batch": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1,
     "moe_layer": 1, "rank": 0, "num_tokens": 2048, "topk": 2, "shape": [16, 128],
     "top_indices": [[5, 2], [0, 7], ...]}

How it maps to Megatron-Core's router_trace (router_trace_rank{rank}.jsonl):
- `step`, `stage`, `block`, `layer`, `rank`, `num_tokens`, `topk`, `top_indices` have
  Megatron's names and meaning, with three differences: `step` is moe_py's step number as in
  metrics.jsonl (1 for the first optimiser step; Megatron counts iterations from 0);
  `layer` is the transformer block's index from 0 (Megatron's layer_number counts from 1);
  padded tokens are in `top_indices` with -1 in every slot (Megatron's batches have none).
- moe_py adds `micro_batch` (gradient accumulation), `moe_layer` (the index among the MoE
  layers, what `TransformerLM.forward(routing=...)` takes) and `shape` (the batch's [B, S],
  to restore the token layout for a replay). The indices are the routing before capacity
  dropping (the dropped slots are a function of them and the router's scores).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np

from .interventions import RoutingIntervention
from .run_folder import atomic_write, step_lines, truncate_steps

FILE = "routing_trace.jsonl"


def records_of(step: int, micro_batch: int, routers: Sequence, moe_blocks: Sequence[int], shape) -> List[dict]:
    """The trace lines of one forward: routers are its RouterOutputs (one per MoE layer),
    moe_blocks the block index of each MoE layer."""
    out = []
    for i, (r, block) in enumerate(zip(routers, moe_blocks)):
        idx = np.asarray(r.topk_indices)
        out.append({"step": int(step), "micro_batch": int(micro_batch), "stage": "pre_dispatch",
                    "block": "decoder", "layer": int(block), "moe_layer": i, "rank": 0,
                    "num_tokens": int(idx.shape[0]), "topk": int(idx.shape[1]),
                    "shape": [int(s) for s in shape], "top_indices": idx.tolist()})
    return out


class TraceWriter:
    """Appends a run's trace lines. Opened at `start` (a resumed run's step), it first drops
    the lines of later steps, so a resumed run's trace equals an uninterrupted one's."""

    def __init__(self, path: str, start: int):
        self.path = path
        if os.path.exists(path):
            truncate_steps(path, start)
        else:
            atomic_write(path, b"")

    def write(self, records: List[dict]) -> None:
        with open(self.path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def read_trace(path: str) -> List[dict]:
    """Every record of a trace file (a run folder or the file itself), with top_indices as
    int64 arrays [num_tokens, topk]; ValueError naming the line that is not a trace record."""
    if os.path.isdir(path):
        path = os.path.join(path, FILE)
    out = []
    for n, (_, rec) in enumerate(step_lines(path), 1):
        try:
            rec["top_indices"] = np.asarray(rec["top_indices"], dtype=np.int64).reshape(
                rec["num_tokens"], rec["topk"])
            rec["step"], rec["micro_batch"], rec["moe_layer"]  # noqa: B018 - required keys
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"trace: {path}:{n}: not a routing trace record ({e})") from None
        out.append(rec)
    return out


def replay_routing(records: List[dict], step: int, micro_batch: int = 0) -> List[RoutingIntervention]:
    """One RoutingIntervention per MoE layer that replays the routing recorded at (step,
    micro_batch): pass it as TransformerLM.forward(..., routing=...) on the same batch."""
    found: Dict[int, dict] = {r["moe_layer"]: r for r in records
                              if r["step"] == step and r["micro_batch"] == micro_batch}
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"trace: no complete record of step {step}, micro-batch {micro_batch}")
    return [RoutingIntervention(replay=found[i]["top_indices"].reshape(tuple(found[i]["shape"]) + (-1,)))
            for i in range(len(found))]
