"""moe_py and Hugging Face transformers: the one home of the interop (the `hf` extra).

    from moe_py.hf import from_hf, to_hf
    moe = from_hf(block)        # a moe_py.torch.MoE with the block's weights
    to_hf(moe, block)           # trained weights back into the block

    from moe_py.hf import collect_routing
    routing = collect_routing(model, batches)   # any transformers MoE LM's routing as RouterOutputs

Block import/export lives in blocks.py, routing capture in routing.py, `analyze-hf` in
analyze.py. This package imports moe_py.torch; moe_py.torch never imports it, so the torch
module loads without transformers and no import circle forms.
"""
from .blocks import from_hf, to_hf
from .routing import collect_routing

__all__ = ["from_hf", "to_hf", "collect_routing"]
