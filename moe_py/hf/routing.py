"""The routing of any transformers MoE causal LM as moe_py RouterOutputs (docs/design.md,
"Routing analysis of Hugging Face models").

    from moe_py.hf.routing import collect_routing
    routing = collect_routing(model, [ids, (ids2, attention_mask2)])
    moe_py.analysis.summarize(routing.routers, mask=routing.mask)

transformers 5.x MoE blocks call their experts module (a class decorated with
@use_experts_implementation) as `experts(hidden_states, top_k_index, top_k_weights)`: a
forward pre-hook on every such module reads what the model itself dispatched. The scores
over all experts come from the module the model names as the source of its
`router_logits` (`_can_record_outputs["router_logits"]`, an OutputRecorder), hooked the same
way; the i-th router call of a forward is paired with the i-th experts call.

What the router output means differs by family, so the score function is read off the
routing itself: the first of softmax, sigmoid, or "the output already is the scores" whose
values at the chosen experts are proportional to the dispatched weights (the weights are
those scores, maybe renormalised over the k and scaled: DeepSeek-V3's routed_scaling_factor)
on every real token with two or more non-zero weights. Sigmoid routers (DeepSeek-V3, GLM-4
MoE, MiniMax-M2, ...) therefore store the sigmoid scores as router_probs; their entropy and
analysis normalise them per token, as moe_py's sigmoid_topk does. With k = 1, or when no
candidate fits (a router whose output is not a function of its logits alone), the scores
are not known: router_probs holds the dispatched weights scattered into [T, E] and
normalised per token, router_logits is 0, and `score_functions` says "weights only".
"""
from __future__ import annotations

from typing import Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..router import RouterOutput, concat_router_outputs, row_entropy

# candidates tried in this order; the first whose scores at the chosen experts are
# proportional to the dispatched weights is taken
SCORE_FUNCTIONS = ("softmax", "sigmoid", "scores")
WEIGHTS_ONLY = "weights only"
# relative agreement of the weights with candidate scores: loose enough for bf16 weights
# (8 bits of mantissa), far tighter than softmax and sigmoid ever agree by chance
PROPORTIONAL_RTOL = 2e-2


class HFRouting(NamedTuple):
    """What collect_routing returns: per MoE layer (in call order) a RouterOutput over all
    tokens of all batches (row-major [B, S] per batch, batches one after the other), and
    per token its id and whether it is real (attention mask 1)."""
    routers: List[RouterOutput]
    mask: np.ndarray  # bool [T]
    tokens: np.ndarray  # int64 [T]
    score_functions: List[str]  # per layer: one of SCORE_FUNCTIONS, or WEIGHTS_ONLY
    layer_names: List[str]  # the experts modules' names in the model


def _is_experts(module: torch.nn.Module) -> bool:
    # the attributes @use_experts_implementation gives every instance it decorates
    return all(hasattr(module, a) for a in ("has_gate", "is_concatenated", "_is_expert_parallel"))


def _router_recorders(model: torch.nn.Module) -> List[Tuple[Any, int, Optional[str]]]:
    """(module class or class-name suffix, output index, layer name) of every
    `router_logits` recorder the model's classes declare."""
    found = []
    for m in model.modules():
        spec = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")
        if spec is None:
            continue
        target = getattr(spec, "target_class", None) or getattr(spec, "class_name", None) or spec
        found.append((target, int(getattr(spec, "index", 0)), getattr(spec, "layer_name", None)))
    return found


def _matches(name: str, module: torch.nn.Module, target, layer_name: Optional[str]) -> bool:
    if isinstance(target, str):
        hit = type(module).__name__.endswith(target)
    else:
        hit = isinstance(target, type) and isinstance(module, target)
    return hit and (layer_name is None or name.endswith(layer_name))


def _batch(item) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int64 [B, S], mask bool [B, S]) of one batch: ids, (ids, mask), or a dict with
    input_ids and attention_mask."""
    if isinstance(item, dict):
        ids, mask = item.get("input_ids"), item.get("attention_mask")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        ids, mask = item
    else:
        ids, mask = item, None
    if ids is None:
        raise ValueError("batches: a dict batch needs 'input_ids'")
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"batches: expected integer token ids of shape [B, S], got {ids.dtype} {ids.shape}")
    if mask is None:
        m = np.ones(ids.shape, bool)
    else:
        m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        if m.shape != ids.shape:
            raise ValueError(f"batches: attention mask shape {m.shape} differs from the ids' {ids.shape}")
        if not np.isin(m, (0, 1)).all():
            raise ValueError("batches: the attention mask must hold only 0 and 1")
        m = m.astype(bool)
    return ids.astype(np.int64), m


def _candidate_scores(name: str, logits: np.ndarray) -> np.ndarray:
    if name == "softmax":
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


def score_function(logits: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> str:
    """The first of SCORE_FUNCTIONS whose scores of logits [T, E] (float64, real tokens only)
    at the chosen indices [T, k] are proportional to the weights [T, k] on every token with
    two or more non-zero weights; WEIGHTS_ONLY when none fits or no token decides."""
    decide = (weights > 0).sum(axis=1) >= 2
    if not decide.any():
        return WEIGHTS_ONLY
    w = weights[decide] / weights[decide].sum(axis=1, keepdims=True)
    for name in SCORE_FUNCTIONS:
        s = np.take_along_axis(_candidate_scores(name, logits[decide]), indices[decide], axis=1)
        total = s.sum(axis=1, keepdims=True)
        if (s < 0).any() or not (total > 0).all():
            continue
        if np.allclose(s / total, w, rtol=PROPORTIONAL_RTOL, atol=1e-6):
            return name
    return WEIGHTS_ONLY


def router_output(indices: np.ndarray, weights: np.ndarray, logits: Optional[np.ndarray],
                  real: np.ndarray, num_experts: int) -> Tuple[RouterOutput, str]:
    """One layer's RouterOutput from what the model dispatched (indices, weights [T, k]) and
    its router's output over all experts (logits [T, E], or None), with padding (real False)
    cleared as moe_py's routers clear it. Slots are put in descending weight order, ties to
    the lower index (some routers, e.g. DeepSeek-V3's, pick with topk(sorted=False)); HF
    drops no token, so nothing is `dropped`."""
    idx = indices.astype(np.int64)
    w = weights.astype(np.float64)
    order = np.lexsort((idx, -w), axis=1) if idx.size else np.zeros_like(idx)
    idx, w = np.take_along_axis(idx, order, axis=1), np.take_along_axis(w, order, axis=1)
    T = idx.shape[0]
    if (idx < 0).any() or (idx >= num_experts).any():
        raise ValueError(f"experts: top_k_index outside [0, {num_experts})")
    kind = WEIGHTS_ONLY
    if logits is not None:
        logits = logits.astype(np.float64)
        kind = score_function(logits[real], idx[real], w[real])
    if kind == WEIGHTS_ONLY:
        probs = np.zeros((T, num_experts))
        np.put_along_axis(probs, idx, np.abs(w), axis=1)
        probs /= np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
        logits = np.zeros((T, num_experts))
    else:
        assert logits is not None
        probs = _candidate_scores(kind, logits)
    probs[~real], logits[~real], w[~real] = 0.0, 0.0, 0.0
    idx[~real] = -1
    # entropy of the scores as a distribution: sigmoid scores normalised per token
    norm = probs / np.maximum(probs.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    entropy = row_entropy(norm)
    counts = np.bincount(idx[real].reshape(-1), minlength=num_experts).astype(np.int64)
    return RouterOutput(topk_weights=w, topk_indices=idx, router_probs=probs, router_probs_clean=probs,
                        router_logits=logits, entropy=entropy, tokens_per_expert=counts,
                        dropped=np.zeros(idx.shape, bool)), kind


def _num_experts(module: torch.nn.Module, logits: Optional[np.ndarray]) -> int:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        n = getattr(module, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    for attr in ("gate_up_proj", "up_proj"):
        w = getattr(module, attr, None)
        if isinstance(w, torch.Tensor) and w.ndim == 3:
            return int(w.shape[0])
    if logits is not None:
        return int(logits.shape[1])
    raise ValueError(f"model: cannot tell how many experts {type(module).__name__} holds")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64 if t.is_floating_point() else torch.int64).numpy()


def collect_routing(model: torch.nn.Module, batches: Iterable, max_batches: Optional[int] = None
                    ) -> HFRouting:
    """Run the model (eval mode, no gradients) on each batch of token ids [B, S] (an array or
    tensor, (ids, attention_mask), or a dict with input_ids/attention_mask; padding = mask 0)
    and return every MoE layer's routing as RouterOutputs (HFRouting). Padded tokens are
    cleared (indices -1, weights and scores 0), so every moe_py.analysis statistic excludes
    them."""
    experts = [(n, m) for n, m in model.named_modules() if _is_experts(m)]
    if not experts:
        raise ValueError(f"model: {type(model).__name__} has no experts module decorated with "
                         "@use_experts_implementation (not a transformers MoE model?)")
    recorders = _router_recorders(model)
    routers = [m for n, m in model.named_modules()
               if any(_matches(n, m, t, ln) for t, _, ln in recorders)]
    index_of = {id(m): next(i for t, i, ln in recorders if _matches(n, m, t, ln))
                for n, m in model.named_modules() if m in routers}
    dispatched: List[Tuple[torch.Tensor, torch.Tensor, int]] = []
    router_out: List[torch.Tensor] = []

    def on_experts(module, args, kwargs):
        values = list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights")
                               if k in kwargs]
        if len(values) < 3:
            raise ValueError(f"model: {type(module).__name__} was not called as "
                             "experts(hidden_states, top_k_index, top_k_weights)")
        hidden, index, weight = values[:3]
        T = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        dispatched.append((index.reshape(T, -1), weight.reshape(T, -1), experts_pos[id(module)]))

    def on_router(module, args, output):
        out = output[index_of[id(module)]] if isinstance(output, (tuple, list)) else output
        router_out.append(out)

    experts_pos = {id(m): i for i, (_, m) in enumerate(experts)}
    handles = [m.register_forward_pre_hook(on_experts, with_kwargs=True) for _, m in experts]
    handles += [m.register_forward_hook(on_router) for m in routers]
    per_layer: List[List[RouterOutput]] = [[] for _ in experts]
    kinds: List[List[str]] = [[] for _ in experts]
    masks, tokens = [], []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b, item in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            ids, mask = _batch(item)
            dispatched.clear()
            router_out.clear()
            with torch.no_grad():
                model(input_ids=torch.as_tensor(ids, device=device),
                      attention_mask=torch.as_tensor(mask.astype(np.int64), device=device), use_cache=False)
            real = mask.reshape(-1)
            logits_of = router_out if len(router_out) == len(dispatched) else [None] * len(dispatched)
            seen = set()
            for (index, weight, pos), logits in zip(dispatched, logits_of):
                if pos in seen:
                    raise ValueError(f"model: experts module {experts[pos][0]} ran twice in one forward")
                seen.add(pos)
                if index.shape[0] != real.size:
                    raise ValueError(f"model: {experts[pos][0]} saw {index.shape[0]} tokens for a batch of "
                                     f"{ids.shape[0]} x {ids.shape[1]}; only per-token routing is supported")
                lg = None if logits is None else _numpy(logits).reshape(real.size, -1)
                E = _num_experts(experts[pos][1], lg)
                if weight.shape[1] != index.shape[1]:
                    if weight.shape[1] != E:
                        raise ValueError(f"model: {experts[pos][0]} got weights of shape {list(weight.shape)} "
                                         f"for top_k_index of shape {list(index.shape)}")
                    weight = weight.gather(1, index)  # dense [T, E] routing weights
                r, kind = router_output(_numpy(index), _numpy(weight), lg, real, E)
                per_layer[pos].append(r)
                kinds[pos].append(kind)
            masks.append(real)
            tokens.append(ids.reshape(-1))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not masks:
        raise ValueError("batches: expected at least one batch")
    used = [i for i, rs in enumerate(per_layer) if rs]
    # a layer's score function; batches that disagree (a batch of k = 1 weights) are all named
    score_kinds = [", ".join(sorted(set(kinds[i]))) for i in used]
    return HFRouting([concat_router_outputs(per_layer[i]) for i in used], np.concatenate(masks),
                     np.concatenate(tokens), score_kinds, [experts[i][0] for i in used])


__all__: Sequence[str] = ("collect_routing", "HFRouting", "router_output", "score_function",
                          "SCORE_FUNCTIONS", "WEIGHTS_ONLY")
