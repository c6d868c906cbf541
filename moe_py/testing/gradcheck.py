"""Float64 central-difference gradient checks for a MoELayer, a Router, a TransformerLM, or
any function that returns its own gradients."""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np


class GradcheckReport(NamedTuple):
    worst_name: str  # e.g. "x" or "w1"
    worst_index: tuple  # index of the worst entry in that array
    worst_rel_error: float  # |analytic - numeric| / max(1, |numeric|)
    checked: int  # entries compared
    skipped: int  # entries whose perturbation changed a discrete routing choice

    def __str__(self) -> str:
        return (f"worst {self.worst_name}{list(self.worst_index)}: relative error "
                f"{self.worst_rel_error:.3e}; {self.checked} entries checked, {self.skipped} "
                "skipped (their perturbation flipped a routing choice)")


def _routing(out) -> Optional[Tuple[np.ndarray, ...]]:
    """The discrete choices of a forward (None for something without routing)."""
    from ..layer import MoEOutput
    from ..models import ModelOutput
    from ..router import RouterOutput
    if isinstance(out, MoEOutput):
        out = out.router
    if isinstance(out, RouterOutput):
        return (out.topk_indices.copy(), out.dropped.copy())
    if isinstance(out, ModelOutput):
        return tuple(a.copy() for r in out.routers for a in (r.topk_indices, r.dropped))
    return None


def _adapter(obj, inputs: Dict[str, Any], rng) -> Tuple[Callable, Callable, Dict[str, np.ndarray]]:
    """(loss_and_routing(), analytic_grads() -> {name: array}, {name: array to perturb})."""
    from ..layer import MoELayer
    from ..models import TransformerLM
    from ..router import Router
    if isinstance(obj, (MoELayer, Router)):
        if obj.cfg.dtype != "float64":
            raise TypeError("layer: gradcheck needs a float64 layer (MoEConfig(dtype='float64'))")
        x = np.asarray(inputs["x"], np.float64)
        mask = inputs.get("padding_mask")
        training = inputs.get("training", True)
        ids = inputs.get("token_ids")
        router = obj.router if isinstance(obj, MoELayer) else obj
        # every evaluation starts from the same loads (the global balance scope reads them)
        loads = router.step_loads.copy()

        def call():
            router.step_loads[...] = loads
            return obj(x, padding_mask=mask, training=training, token_ids=ids)
        if isinstance(obj, MoELayer):
            dy = rng.standard_normal(x.shape)

            def loss():
                o = call()
                return float((dy * o.y).sum() + o.aux_loss), _routing(o)
        else:
            dy = rng.standard_normal(call().topk_weights.shape)  # expert choice: its own slots

            def loss():
                r = call()
                return float((dy * r.topk_weights).sum() + obj.aux_loss), _routing(r)

        def analytic():
            loss()
            obj.zero_grad()
            dx = obj.backward(dy)
            return {"x": dx.copy(), **{k: g.copy() for k, g in obj.grads.items()}}
        return loss, analytic, {"x": x, **obj.params}
    if isinstance(obj, TransformerLM):
        tokens, targets, mask = inputs["inputs"], inputs["targets"], inputs.get("mask")

        def loss():
            out = obj.forward(tokens, mask, training=True)
            from ..lm_losses import multi_token_cross_entropy
            from ..config import IGNORE_INDEX
            m = mask if mask is not None else np.ones(np.shape(tokens), np.bool_)
            ls, _ = multi_token_cross_entropy(out.head_logits, targets, m, IGNORE_INDEX)
            return float(np.mean(ls) + out.aux_loss), _routing(out)

        def analytic():
            obj.zero_grad()
            m = mask if mask is not None else np.ones(np.shape(tokens), np.bool_)
            obj.loss_and_backward(tokens, targets, m)
            return {n: g.copy() for n, _, g in obj.named_parameters()}
        return loss, analytic, {n: p for n, p, _ in obj.named_parameters()}
    if type(obj).__module__ == "moe_py.torch":  # the torch module (torch imported only here)
        import torch
        if obj.cfg.dtype != "float64":
            raise TypeError("layer: gradcheck needs a float64 module (MoEConfig(dtype='float64'))")
        x = np.array(inputs["x"], np.float64)
        tx = torch.from_numpy(x)  # shares x's memory: perturbing x perturbs tx
        mask = inputs.get("padding_mask")
        ids = inputs.get("token_ids")
        dy = torch.from_numpy(rng.standard_normal(x.shape))
        params = dict(obj.named_parameters())
        loads = obj.layer.router.step_loads.copy()

        def loss():
            obj.layer.router.step_loads[...] = loads
            with torch.no_grad():
                y, aux, router = obj(tx, padding_mask=mask, token_ids=ids)
            return float((dy * y).sum() + aux), (router.topk_indices.copy(), router.dropped.copy())

        def analytic():
            obj.layer.router.step_loads[...] = loads
            xg = tx.clone().requires_grad_(True)
            y, aux, _ = obj(xg, padding_mask=mask, token_ids=ids)
            grads = torch.autograd.grad((dy * y).sum() + aux, [xg, *params.values()])
            return {"x": grads[0].numpy(), **{n: g.numpy() for n, g in zip(params, grads[1:])}}
        # the parameters' numpy views share memory with the nn.Parameters (and the C++ layer)
        return loss, analytic, {"x": x, **{n: p.detach().numpy() for n, p in params.items()}}
    if callable(obj):
        arrays = {k: np.asarray(v, np.float64) for k, v in inputs.items()}

        def loss():
            value, _ = obj(**arrays)
            return float(value), None

        def analytic():
            return {k: np.asarray(v, np.float64) for k, v in obj(**arrays)[1].items()}
        return loss, analytic, arrays
    raise TypeError(f"layer_or_fn: expected a MoELayer, Router, TransformerLM or a function "
                    f"returning (loss, grads), got {type(obj).__name__}")


def gradcheck(layer_or_fn, inputs: Dict[str, Any], eps: float = 1e-6, tol: float = 1e-6,
              max_entries: int = 40, seed: int = 0) -> GradcheckReport:
    """Compare the analytic gradient of a scalar loss with float64 central differences.

    - MoELayer: loss = sum(dy * y) + aux_loss with a fixed random dy; inputs {"x", and
      optionally "padding_mask", "training", "token_ids" (hash routing)}; checks x and every
      parameter. Every evaluation starts from the router's loads as they were (the global
      balance scope reads them).
    - Router: loss = sum(g * topk_weights) + aux_loss; the same inputs.
    - TransformerLM: the LM loss + aux_loss; inputs {"inputs", "targets", "mask"}; checks
      every parameter.
    - moe_py.torch.MoE: the same loss through torch autograd; inputs {"x", "padding_mask",
      "token_ids"}.
    - a function f(**inputs) -> (loss, {name: gradient}); checks every input.
    At most max_entries entries per array (a random subset of bigger ones). An entry whose
    +-eps perturbation changes a discrete routing choice (top-k or a capacity drop) has no
    derivative there and is skipped and counted. Raises AssertionError naming the worst entry
    when its error |analytic - numeric| / max(1, |numeric|) exceeds tol."""
    rng = np.random.default_rng(seed)
    loss, analytic, arrays = _adapter(layer_or_fn, inputs, rng)
    grads = analytic()
    _, base_routing = loss()
    worst: Tuple[float, str, tuple] = (0.0, "", ())
    checked = skipped = 0
    for name, arr in arrays.items():
        if arr.size == 0:
            continue
        flat_idx = np.arange(arr.size)
        if arr.size > max_entries:
            flat_idx = rng.choice(arr.size, max_entries, replace=False)
        for fi in flat_idx:
            i = np.unravel_index(int(fi), arr.shape)
            old = arr[i]
            arr[i] = old + eps
            fp, rp = loss()
            arr[i] = old - eps
            fm, rm = loss()
            arr[i] = old
            if base_routing is not None and not all(
                    np.array_equal(a, b) and np.array_equal(a, c)
                    for a, b, c in zip(base_routing, rp, rm)):
                skipped += 1
                continue
            num = (fp - fm) / (2 * eps)
            err = abs(float(grads[name][i]) - num) / max(1.0, abs(num))
            checked += 1
            if err >= worst[0]:
                worst = (err, name, tuple(int(v) for v in i))
    loss()  # leave the object's saved state at the unperturbed point
    report = GradcheckReport(worst[1], worst[2], worst[0], checked, skipped)
    if worst[0] > tol:
        raise AssertionError(f"gradcheck failed: {report} (tolerance {tol})")
    return report
