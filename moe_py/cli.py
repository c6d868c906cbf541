"""Command line: `python -m moe_py <command>` (also the `moe-py` console script)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np

from .config import MoEConfig
from .layer import MoELayer
from .threads import set_num_threads


def _demo(args: argparse.Namespace) -> int:
    """Route one padded batch through a fresh layer and print what the router did."""
    cfg = MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts,
                    top_k=args.top_k, capacity_factor=args.capacity_factor, seed=args.seed)
    layer = MoELayer(cfg)
    rng = np.random.default_rng(args.seed)
    B, S = 4, 64
    x = rng.standard_normal((B, S, cfg.d_model)).astype(cfg.np_dtype)
    lengths = rng.integers(S // 2, S + 1, size=B)
    mask = np.arange(S)[None, :] < lengths[:, None]
    out = layer(x, padding_mask=mask)
    r = out.router
    real = mask.reshape(-1)
    E = cfg.num_experts
    print(f"MoE layer: d_model={cfg.d_model} d_ff={cfg.d_ff} E={E} k={cfg.top_k} "
          f"capacity_factor={cfg.capacity_factor} activation={cfg.activation}")
    print(f"tokens: {real.size} ({int(real.sum())} real, {int((~real).sum())} padding)")
    share = r.tokens_per_expert / max(1, r.tokens_per_expert.sum())
    print("tokens_per_expert:", r.tokens_per_expert.tolist())
    print("share per expert: ", " ".join(f"{s:.3f}" for s in share), f"(uniform {1 / E:.3f})")
    print(f"mean clean entropy: {r.entropy[real].mean():.4f} nats (max ln E = {np.log(E):.4f})")
    print(f"dropped slots: {int(r.dropped.sum())} of {int(real.sum()) * cfg.top_k}")
    print("losses:", {k: round(v, 6) for k, v in out.losses.items()}, f"aux_loss={out.aux_loss:.6f}")
    print("first real token: experts", r.topk_indices[0].tolist(),
          "weights", np.round(r.topk_weights[0], 4).tolist())
    dx = layer.backward(np.ones_like(out.y))
    print(f"backward: |dx|={np.linalg.norm(dx):.4f} (padding rows zero: "
          f"{bool(np.all(dx.reshape(-1, cfg.d_model)[~real] == 0))}); grad norms",
          {k: round(float(np.linalg.norm(g)), 4) for k, g in layer.grads.items()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe_py", description="A Mixture-of-Experts laboratory for the CPU.")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads for the kernels")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="route one padded batch through a fresh MoE layer")
    d.add_argument("--d-model", type=int, default=64)
    d.add_argument("--d-ff", type=int, default=128)
    d.add_argument("--experts", type=int, default=8)
    d.add_argument("--top-k", type=int, default=2)
    d.add_argument("--capacity-factor", type=float, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            set_num_threads(args.threads)
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"moe_py: error: {e}", file=sys.stderr)
        return 2
