"""moe_py and Hugging Face transformers: the one home of the interop (the `hf` extra).

    import moe_py.hf            # registers experts_implementation="moe_py" in transformers
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_py")

    from moe_py.hf import from_hf, to_hf
    moe = from_hf(block)        # a moe_py.torch.MoE with the block's weights
    to_hf(moe, block)           # trained weights back into the block

    from moe_py.hf import collect_routing
    routing = collect_routing(model, batches)   # any transformers MoE LM's routing as RouterOutputs

The experts backend lives in experts_backend.py, block import/export in blocks.py (the
families in families.py), routing capture in routing.py, `analyze-hf` in analyze.py. This
package imports moe_py.torch; moe_py.torch never imports it, so the torch module loads
without transformers and no import circle forms; nothing outside this package imports
transformers.
"""
from .blocks import from_hf, to_hf
from .experts_backend import moe_py_experts_forward, register
from .routing import collect_routing

register()

__all__ = ["from_hf", "to_hf", "collect_routing", "moe_py_experts_forward", "register"]
