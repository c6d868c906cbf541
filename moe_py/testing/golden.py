"""Golden files: one .npz with a layer's config, weights, inputs and every output and
gradient, plus the moe_py version and the machine that wrote it. A later run rebuilds the
layer from the file and must reproduce it."""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Dict, Optional

import numpy as np

from ..run_folder import atomic_write


def _run(layer, x, mask, dy, token_ids) -> Dict[str, np.ndarray]:
    layer.zero_grad()
    out = layer(x, padding_mask=mask, token_ids=token_ids)
    dx = layer.backward(dy)
    res = {"out.y": out.y, "out.aux_loss": np.array(out.aux_loss), "out.dx": dx}
    res.update({f"out.router.{f}": np.asarray(getattr(out.router, f)) for f in out.router._fields})
    res.update({f"out.losses.{k}": np.array(v) for k, v in out.losses.items()})
    res.update({f"out.grads.{k}": g.copy() for k, g in layer.grads.items()})
    return res


def save_golden(path: str, layer, inputs: Dict[str, np.ndarray]) -> None:
    """Write `layer` (a MoELayer, with its router state) run on inputs {"x", optional
    "padding_mask", "dy", "token_ids" (hash routing)}."""
    from .. import __version__, build_info
    x = np.asarray(inputs["x"])
    mask = inputs.get("padding_mask")
    dy = inputs.get("dy")
    if dy is None:
        dy = np.random.default_rng(7).standard_normal(x.shape).astype(x.dtype)
    ids = inputs.get("token_ids")
    arrays = {"in.x": x, "in.dy": np.asarray(dy)}
    if mask is not None:
        arrays["in.padding_mask"] = np.asarray(mask)
    if ids is not None:
        arrays["in.token_ids"] = np.asarray(ids)
    arrays.update({f"param.{k}": v for k, v in layer.params.items()})
    router_state = layer.router.state()  # before the run moves it
    arrays.update(_run(layer, x, mask, dy, ids))
    info = build_info()
    arrays["meta"] = np.array(json.dumps({
        "config": dataclasses.asdict(layer.cfg), "router_state": router_state,
        "moe_py": __version__, "cpu": info["cpu"],
        "blas": f"{info['blas']} {info['blas_version']} {info['blas_corename']}"}))
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub lets **arrays reach allow_pickle: bool
    atomic_write(path, buf.getvalue())


def assert_matches_golden(path: str, layer=None, inputs: Optional[Dict[str, np.ndarray]] = None,
                          rtol: Optional[float] = None, atol: Optional[float] = None) -> None:
    """Compare with a golden file every output and gradient of: the layer rebuilt from the
    file (layer None: the code must still compute what it computed), or the given layer on
    the given inputs (the file's inputs when None; its config and weights are compared too).
    Tolerances default to bitwise equality on the machine that wrote the file and to the
    reference tolerances (moe_py.testing.reference.TOLERANCES) on another CPU or BLAS."""
    from .. import build_info
    from ..config import MoEConfig
    from ..layer import MoELayer
    from .reference import TOLERANCES
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"]))
    bad = []
    if layer is None:
        layer = MoELayer(MoEConfig(**meta["config"]))
        layer.load_state_dict({k[6:]: v for k, v in data.items() if k.startswith("param.")})
        if "router_state" in meta:  # files written before the router had state have none
            layer.router.load_state(meta["router_state"])
    else:
        if dataclasses.asdict(layer.cfg) != meta["config"]:
            bad.append("config")
        bad += [f"params['{k[6:]}']" for k, v in data.items() if k.startswith("param.")
                and not np.array_equal(layer.params.get(k[6:]), v)]
    inputs = inputs or {}
    x = np.asarray(inputs["x"]) if "x" in inputs else data["in.x"]
    mask = inputs.get("padding_mask", data.get("in.padding_mask"))
    dy = np.asarray(inputs["dy"]) if "dy" in inputs else data["in.dy"]
    ids = inputs.get("token_ids", data.get("in.token_ids"))
    if x.shape != data["in.x"].shape or not np.array_equal(x, data["in.x"]):
        bad.append("inputs['x']")
    got = _run(layer, x, mask, dy, ids)
    info = build_info()
    same_machine = (meta["cpu"] == info["cpu"] and
                    meta["blas"] == f"{info['blas']} {info['blas_version']} {info['blas_corename']}")
    tol = dict(rtol=0.0, atol=0.0) if same_machine else dict(TOLERANCES[layer.cfg.dtype])
    tol.update({k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None})
    for key, want in data.items():
        if not key.startswith("out."):
            continue
        have = got[key]
        if have.shape != want.shape:
            bad.append(f"{key[4:]} (shape {list(have.shape)}, file {list(want.shape)})")
            continue
        ok = (np.array_equal(have, want) if want.dtype.kind in "biu" or tol["rtol"] == tol["atol"] == 0
              else np.allclose(have, want, rtol=tol["rtol"], atol=tol["atol"]))
        if not ok:
            diff = (float(np.max(np.abs(have.astype(np.float64) - want))) if want.size else 0.0)
            bad.append(f"{key[4:]} (max |diff| {diff:.3e})")
    if bad:
        raise AssertionError(f"{path} differs in {len(bad)} field(s), first: " + ", ".join(bad[:5])
                             + f"; written by moe_py {meta['moe_py']} on {meta['cpu']} with "
                             f"{meta['blas']}")
