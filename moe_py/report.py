"""`python -m moe_py analyze RUN_DIR`: route a run's validation set through its
checkpoint and write analysis.json and plots of what the experts learned."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import analysis
from .checkpoint import load_model
from .data import BatchSampler, Corpus, corpus_summary
from .models import ModelConfig, TransformerLM
from .router import RouterOutput, concat_router_outputs
from .run_folder import RunFolder, atomic_write, resolve_checkpoint, run_dir_of
from .train import TrainConfig, corpus_of, val_sampler_of


# The per-layer specialisation numbers analysis.json also lists at its top level
# (specialisation.py defines them).
SPECIALISATION_KEYS = ("mi", "mi_first_choice", "mi_byte_null", "mi_given_byte", "mi_given_byte_floor",
                       "beyond_byte", "mi_at_init", "mi_given_byte_at_init", "label_given_byte")


def collect_routing(model: TransformerLM, sampler: BatchSampler, max_batches: Optional[int]
                    ) -> Tuple[List[RouterOutput], np.ndarray, np.ndarray, np.ndarray]:
    """Route every eval batch (eval mode, no noise); return per-layer RouterOutputs
    concatenated over the batches, and the matching labels, bytes and mask [T]."""
    per_layer: List[List[RouterOutput]] = []
    labels, tokens, mask = [], [], []
    for batch in sampler.iter_eval(max_batches):
        out = model.forward(batch.inputs, batch.mask, training=False)
        for i, r in enumerate(out.routers):
            if len(per_layer) <= i:
                per_layer.append([])
            per_layer[i].append(r)
        labels.append(batch.labels.reshape(-1))
        tokens.append(batch.inputs.reshape(-1))
        mask.append(batch.mask.reshape(-1))
    routers = [concat_router_outputs(rs) for rs in per_layer]
    return routers, np.concatenate(labels), np.concatenate(tokens), np.concatenate(mask)


def held_out_of(raw: dict, max_batches: Optional[int], corpus: Optional[Corpus] = None):
    """The run's training config, corpus, and held-out sampler: the very windows behind its
    val_loss."""
    train_cfg = TrainConfig.from_dict(json.loads(str(raw["train_config"])))
    if corpus is None:
        corpus = corpus_of(train_cfg)
    sampler = val_sampler_of(corpus, train_cfg)
    return train_cfg, corpus, sampler, (train_cfg.eval_batches if max_batches is None else max_batches)


def analyze_over_training(path: str, max_batches: Optional[int] = None,
                          corpus: Optional[Corpus] = None) -> List[dict]:
    """The held-out sample routed through every kept checkpoint of a run: normalised MI per
    layer, and the share of real tokens whose top-k set (and whose top-1 expert) changed
    since the previous one. Written to analysis_over_training.json. `corpus`: the run's
    corpus, when the caller has already loaded it (it is loaded from the run's config
    otherwise)."""
    run = RunFolder(run_dir_of(path))
    paths = run.kept_checkpoints()
    if not paths:
        raise FileNotFoundError(f"run folder: no kept checkpoints in {run.checkpoints}")
    _, raw = load_model(paths[-1])
    _, corpus, sampler, max_batches = held_out_of(raw, max_batches, corpus)
    rows, previous = [], None
    for p in paths:
        model, raw = load_model(p)
        routers, labels, _, mask = collect_routing(model, sampler, max_batches)
        n = len(corpus.label_names)
        pairs = list(zip(previous or routers, routers))  # (previous, this) per layer
        first = previous is None
        rows.append({"step": int(raw["step"]), "checkpoint": p,
                     "mi": [analysis.specialisation(r, labels, n, mask)["normalized_mi"] for r in routers],
                     "changed_since_previous": [0.0 if first else analysis.routing_stability(a, b, mask)["changed"]
                                                for a, b in pairs],
                     "top1_changed_since_previous": [0.0 if first else analysis.first_choice_changed(a, b, mask)
                                                     for a, b in pairs]})
        previous = routers
    atomic_write(os.path.join(run.path, "analysis_over_training.json"),
                 json.dumps(rows, indent=1).encode())
    return rows


def analyze_run(path: str, max_batches: Optional[int] = None, plots: bool = True,
                corpus: Optional[Corpus] = None) -> dict:
    """`path`: a run folder (its latest checkpoint) or one of its checkpoints. max_batches
    None: the run's own eval_batches, i.e. the very sample behind its val_loss. `corpus`:
    as in analyze_over_training."""
    ckpt = resolve_checkpoint(path)
    run_dir = run_dir_of(path)
    model, raw = load_model(ckpt)
    if not model.moe_layers:
        raise ValueError(f"run folder: {run_dir} holds a dense model; there is no routing to analyse")
    train_cfg, corpus, sampler, max_batches = held_out_of(raw, max_batches, corpus)
    routers, labels, tokens, mask = collect_routing(model, sampler, max_batches)
    # the model frozen at initialisation, on the same tokens: the floor of every measure
    init = TransformerLM(ModelConfig.from_dict(model.cfg.to_dict()))
    init_routers, *_ = collect_routing(init, sampler, max_batches)
    result: Dict[str, Any] = {"run": run_dir, "step": int(raw["step"]), "corpus": corpus.name,
                              "corpus_summary": corpus_summary(corpus, sampler, max_batches)}
    result.update(routing_report(routers, labels, tokens, mask, corpus.label_names, train_cfg.seq_len,
                                 init_routers))
    if plots:
        from .plots import plot_run
        plot_run(run_dir)
    return write_report(run_dir, result, routers, labels, mask, plots)


def routing_report(routers: List[RouterOutput], labels: np.ndarray, tokens: np.ndarray, mask: np.ndarray,
                   label_names: List[str], row_len: int, init_routers: Optional[List[RouterOutput]] = None,
                   spell: Callable[[Sequence[int]], Any] = bytes) -> Dict[str, Any]:
    """The analysis.json keys that come from routing records alone (every analysis writes
    them: `analyze` of a run, `analyze-hf` of a transformers checkpoint): per-layer
    summaries with the specialisation nulls, their per-layer lists at the top level, the
    cross-layer co-occurrence, and the stability against the model at initialisation
    (init_routers: the same tokens routed by it; None: the *_at_init keys are None).
    routers, labels, tokens, mask [T]: per token, rows of row_len tokens; spell: how a
    token n-gram is shown (analysis.top_ngrams)."""
    n_labels = len(label_names)
    result: Dict[str, Any] = {"label_names": list(label_names), "tokens": int(mask.sum()),
                              "layers": analysis.summarize(routers, labels=labels, label_names=label_names,
                                                           mask=mask, tokens=tokens, row_len=row_len,
                                                           spell=spell)}
    inits: List[Optional[RouterOutput]] = list(init_routers) if init_routers is not None else [None] * len(routers)
    for layer, r, r0 in zip(result["layers"], routers, inits):
        layer.update(analysis.specialisation_with_nulls(r, labels, tokens, n_labels, mask, r0))
        if r0 is None:
            layer.update({"mi_at_init": None, "mi_given_byte_at_init": None})
    # per-layer lists of the specialisation keys, for tables and plots
    for key in SPECIALISATION_KEYS:
        result[key] = [layer[key] for layer in result["layers"]]
    result["cross_layer_mi"] = [layer["cooccurrence_to_next"]["mi"] for layer in result["layers"][:-1]]
    result["routing_stability_vs_init"] = (None if init_routers is None else
                                           [analysis.routing_stability(a, b, mask)
                                            for a, b in zip(init_routers, routers)])
    return result


def write_report(out_dir: str, result: Dict[str, Any], routers: List[RouterOutput], labels: np.ndarray,
                 mask: np.ndarray, plots: bool = True) -> Dict[str, Any]:
    """Write result (routing_report's keys and the caller's) to out_dir/analysis.json and, with
    plots, the routing plots (expert_label, coactivation, specialisation, entropy_margin,
    transitions); returns result with the plots' paths under "plots"."""
    atomic_write(os.path.join(out_dir, "analysis.json"),
                 json.dumps(result, indent=1, default=_jsonable).encode())
    if plots:
        from .plots import plot_analysis, plot_routing
        n_labels = len(result["label_names"])
        tables = [analysis.expert_label_table(r, labels, n_labels, mask) for r in routers]
        co = [analysis.coactivation(r, mask) for r in routers]
        result["plots"] = plot_analysis(out_dir, tables, result["label_names"], co, result)
        result["plots"] += plot_routing(out_dir, routers, mask)
    return result


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
