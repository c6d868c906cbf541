"""A small decoder-only byte-level transformer LM whose FFN blocks are MoE
layers (or dense SwiGLU FFNs for the baseline).

    x = tok_emb[ids] + pos_emb
    n_layers x [ x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)) ]     FFN = MoELayer | DenseFFN
    (block i has an MoE FFN when moe is set, i >= first_dense and (i - first_dense) % moe_every == 0)
    logits_i = RMSNorm(x) @ W_head_i,  i = 0 .. n_predict-1 (head i predicts t+1+i)
"""
from __future__ import annotations

import dataclasses
import warnings
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ._checks import NonFiniteError, as_mask
from ._kernels import all_finite
from .config import (DTYPES, IGNORE_INDEX, MoEConfig, check_compute_dtype, check_seed, config_from_dict, one_of,
                     plain_scalars, positive_int)
from .ffn import FFN, build_ffn
from .layer import MoELayer
from .lm_losses import multi_token_cross_entropy
from .nn import Block, Embedding, Linear, Module, RMSNorm
from .router import RouterOutput


# docs/design.md, "Routers": why a causal LM should not be trained with expert choice.
EXPERT_CHOICE_IN_LM = (
    "router='expert_choice' in a causal LM: each expert picks its tokens by comparing them with "
    "every other token of the batch, later positions of the same sequence included, so a token's "
    "routing (and output) depends on future tokens. Its training loss is not comparable with a "
    "causal model's, and it cannot generate one token at a time as trained.")


@dataclass
class ModelConfig:
    """The whole model. `moe` None makes the dense baseline with FFN width d_ff;
    otherwise `moe` configures every FFN block (its d_model must equal d_model)."""

    vocab_size: int = 256  # token ids (bytes)
    max_seq_len: int = 128  # longest window; the position table's length
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads per block
    d_ff: int = 256  # width of the dense FFN blocks (every block of the dense model)
    activation: str = "swiglu"  # FFN activation: swiglu, gelu or clamped_swiglu (dense blocks: default alpha, limit)
    moe: Optional[MoEConfig] = None  # the MoE FFN of the MoE blocks; None: a dense model
    first_dense: int = 0  # the first K blocks keep a dense FFN (DeepSeek's first_k_dense_replace)
    moe_every: int = 1  # after those, an MoE FFN every N blocks (Megatron's moe_layer_freq)
    n_predict: int = 1  # multi-token prediction heads (head i predicts t+1+i)
    dtype: str = "float32"  # float32 or float64
    compute_dtype: Optional[str] = None  # the GEMMs of the FFNs (dense and expert), the attention projections and the heads: None (dtype) or "bfloat16" (see MoEConfig); routers, attention scores and norms stay in dtype
    seed: int = 0  # seed of the initial weights

    def __post_init__(self) -> None:
        plain_scalars(self)
        if isinstance(self.moe, dict):
            self.moe = config_from_dict(MoEConfig, self.moe, "moe")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise TypeError(f"moe: expected a MoEConfig, a dict of its fields or None, "
                            f"got {type(self.moe).__name__}")
        check_seed(self.seed)
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff", "n_predict",
                     "moe_every"):
            positive_int(name, getattr(self, name))
        if isinstance(self.first_dense, bool) or not isinstance(self.first_dense, int) or self.first_dense < 0:
            raise ValueError(f"first_dense: expected an integer >= 0, got {self.first_dense!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model ({self.d_model}), got {self.n_heads}")
        one_of("dtype", self.dtype, tuple(DTYPES))
        check_compute_dtype(self.compute_dtype, self.dtype)
        if self.moe is not None:
            if self.moe.d_model != self.d_model:
                raise ValueError(f"moe.d_model: expected d_model ({self.d_model}), got {self.moe.d_model}")
            if self.moe.dtype != self.dtype:
                raise ValueError(f"moe.dtype: expected dtype ({self.dtype}), got {self.moe.dtype}")
            if self.moe.compute_dtype != self.compute_dtype:
                raise ValueError(f"moe.compute_dtype: expected compute_dtype ({self.compute_dtype}), "
                                 f"got {self.moe.compute_dtype}")

    def is_moe_block(self, i: int) -> bool:
        """Whether block i has an MoE FFN (see first_dense and moe_every)."""
        return self.moe is not None and i >= self.first_dense and (i - self.first_dense) % self.moe_every == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, what: str = "model config") -> "ModelConfig":
        """From a config.json's "model" (or a checkpoint's); ValueError naming `what` when it
        is not a valid one."""
        return config_from_dict(cls, d, what)


class ModelOutput(NamedTuple):
    head_logits: List[np.ndarray]  # n_predict x [B, S, V]
    routers: List[RouterOutput]  # one per MoE layer (empty for the dense model)
    aux_loss: float  # sum over layers of each layer's weighted aux loss
    layer_losses: List[Dict[str, float]]  # per layer: load_balance, z_loss, entropy
    forward_id: int = -1  # which forward of its model made it (see TransformerLM.backward)


class TransformerLM:
    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        dt = DTYPES[cfg.dtype]
        rng = np.random.default_rng(cfg.seed)
        self.embed = Embedding(cfg.vocab_size, cfg.max_seq_len, cfg.d_model, rng, dt)
        # residual branches start small: output projections scaled by 1/sqrt(2 n_layers)
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)

        def ffn_maker(i: int):
            moe = cfg.moe if cfg.is_moe_block(i) else None
            return lambda r: build_ffn(cfg.d_model, cfg.d_ff, cfg.activation, moe, r, cfg.dtype, out_scale,
                                       cfg.compute_dtype)
        self.blocks = [Block(cfg.d_model, cfg.n_heads, ffn_maker(i), rng, dt, out_std)
                       for i in range(cfg.n_layers)]
        self.norm_f = RMSNorm(cfg.d_model, dt)
        self.heads = [Linear(cfg.d_model, cfg.vocab_size, rng, dt) for _ in range(cfg.n_predict)]
        for lin in [lin for b in self.blocks for lin in (b.attn.qkv, b.attn.proj)] + self.heads:
            lin.compute_dtype = cfg.compute_dtype  # as torch autocast runs nn.Linear
        self._shape: Optional[Tuple[int, int]] = None  # (B, S) of the latest forward
        self._forward_id = 0
        if cfg.moe is not None and cfg.moe.traits.experts_choose:
            warnings.warn(EXPERT_CHOICE_IN_LM, stacklevel=2)

    # ---- parameters ------------------------------------------------------------
    def modules(self) -> Iterator[Tuple[str, Union[Module, FFN]]]:
        yield "embed", self.embed
        for i, b in enumerate(self.blocks):
            for name, m in b.children().items():
                yield f"blocks.{i}.{name}", m
        yield "norm_f", self.norm_f
        for i, h in enumerate(self.heads):
            yield f"heads.{i}", h

    def named_parameters(self) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """(name, parameter, gradient) for every parameter, in a fixed order."""
        for prefix, m in self.modules():
            for k in m.params:
                yield f"{prefix}.{k}", m.params[k], m.grads[k]

    @property
    def moe_layers(self) -> List[MoELayer]:
        """The FFNs that route (every block's, unless the model is dense)."""
        return [b.ffn for b in self.blocks if b.ffn.has_router]

    def zero_grad(self) -> None:
        for _, _, g in self.named_parameters():
            g.fill(0)

    def num_parameters(self) -> Dict[str, int]:
        """Total parameters and those active for one token (k of E experts)."""
        total = sum(p.size for _, p, _ in self.named_parameters())
        inactive = 0
        for b in self.blocks:
            n = b.ffn.num_parameters()
            inactive += n["total"] - n["active"]
        return {"total": int(total), "active": int(total - inactive)}

    def set_noise_annealing(self, start_std: float, anneal_steps: int) -> None:
        for layer in self.moe_layers:
            layer.set_noise_annealing(start_std, anneal_steps)

    def update_expert_bias(self) -> None:
        """Once per optimiser step, after all micro-batches: every MoE layer's expert-bias
        step (bias_update_rate > 0), which also starts the loads of the next step from 0."""
        for layer in self.moe_layers:
            layer.update_expert_bias()

    # ---- forward / backward ------------------------------------------------------
    def forward(self, inputs: np.ndarray, padding_mask: Optional[np.ndarray] = None,
                training: bool = True, routing: Optional[Sequence] = None) -> ModelOutput:
        """routing: one RoutingIntervention (or None) per MoE layer, in order
        (moe_py/interventions.py): replay a recorded routing, remove experts, change k."""
        inputs = np.asarray(inputs)
        if inputs.ndim != 2 or not np.issubdtype(inputs.dtype, np.integer):
            raise ValueError(f"inputs: expected int token ids [B, S], got {inputs.dtype} {list(inputs.shape)}")
        B, S = inputs.shape
        if B == 0 or S == 0:
            raise ValueError(f"inputs: expected at least one sequence of at least one token, got shape "
                             f"{list(inputs.shape)}")
        if S > self.cfg.max_seq_len:
            raise ValueError(f"inputs: expected at most max_seq_len={self.cfg.max_seq_len} positions, got {S}")
        if inputs.size and (inputs.min() < 0 or inputs.max() >= self.cfg.vocab_size):
            raise ValueError(f"inputs: expected ids in [0, {self.cfg.vocab_size})")
        mask = as_mask(padding_mask, (B, S)).reshape(B, S)
        per_layer = self._routing_per_block(routing)
        x = self.embed.forward(inputs)
        routers, layer_losses, aux = [], [], 0.0
        for b, r in zip(self.blocks, per_layer):
            x, ffn_out = b.forward(x, mask, (B, S), training, token_ids=inputs, routing=r)
            if ffn_out.router is not None:
                routers.append(ffn_out.router)
                layer_losses.append(ffn_out.losses)
                aux += ffn_out.aux_loss
        h = self.norm_f.forward(x)
        logits = [head.forward(h).reshape(B, S, -1) for head in self.heads]
        self._shape, self._mask = (B, S), mask
        self._forward_id += 1
        return ModelOutput(logits, routers, aux, layer_losses, self._forward_id)

    __call__ = forward

    def _routing_per_block(self, routing: Optional[Sequence]) -> list:
        """One intervention (or None) per block from one per MoE layer."""
        if routing is None:
            return [None] * len(self.blocks)
        routing = list(routing)
        if len(routing) != len(self.moe_layers):
            raise ValueError(f"routing: expected one intervention (or None) per MoE layer "
                             f"({len(self.moe_layers)}), got {len(routing)}")
        it = iter(routing)
        return [next(it) if b.ffn.has_router else None for b in self.blocks]

    def backward(self, head_dlogits: List[np.ndarray], aux_weight: float = 1.0,
                 out: Optional[ModelOutput] = None) -> None:
        """Gradients of sum_i <head_dlogits[i], logits_i> + aux_weight * aux_loss, added into
        grads, for the latest forward. The model keeps only that forward's state: passing an
        older forward's output as `out` raises instead of returning the wrong gradient."""
        if self._shape is None:
            raise RuntimeError("backward called before forward")
        if out is not None and out.forward_id != self._forward_id:
            raise RuntimeError("out: the model keeps only its latest forward's state, and this "
                               "output is from an earlier forward; call backward before the next "
                               "forward")
        if len(head_dlogits) != len(self.heads):
            raise ValueError(f"head_dlogits: expected one gradient per head ({len(self.heads)}), "
                             f"got {len(head_dlogits)}")
        B, S = self._shape
        dh = None
        for head, d in zip(self.heads, head_dlogits):
            g = head.backward(np.ascontiguousarray(d.reshape(B * S, -1)))
            dh = g if dh is None else dh + g
        assert dh is not None  # at least one head: n_predict is a positive int (ModelConfig)
        dx = self.norm_f.backward(dh)
        for i in reversed(range(len(self.blocks))):
            if not all_finite(dx):  # made here, not passed in: a diverging run, not bad input
                raise NonFiniteError(f"the gradient reaching block {i} is not finite")
            dx = self.blocks[i].backward(dx, aux_weight)
        self.embed.backward(dx)

    def loss_and_backward(self, inputs, targets, mask, training: bool = True,
                          loss_weight: float = 1.0, aux_weight: float = 1.0,
                          head_shares: Optional[List[float]] = None) -> dict:
        """Forward, the multi-token LM loss (mean over heads of each head's per-token
        mean), and backward of loss_weight * that + aux_weight * aux_loss.
        head_shares[i] scales head i's gradient: this batch's share of head i's targets
        when the batch is one process's rows of a larger one (moe_py/parallel.py).
        Returns the unweighted numbers and the RouterOutputs for logging."""
        out = self.forward(inputs, mask, training)
        for i, logits in enumerate(out.head_logits):
            if not all_finite(logits):
                raise NonFiniteError(f"the logits of head {i} are not finite")
        losses, grads = multi_token_cross_entropy(out.head_logits, targets, mask, IGNORE_INDEX)
        for i, g in enumerate(grads):
            # a Python float: a NumPy float64 scalar would make float32 gradients float64
            scale = float(loss_weight / len(losses) * (1.0 if head_shares is None else head_shares[i]))
            if scale != 1.0:  # the gradients are fresh arrays: scale them in place
                g *= scale
        self.backward(grads, aux_weight)
        return {"head_losses": losses, "loss": float(np.mean(losses)), "aux_loss": out.aux_loss,
                "layer_losses": out.layer_losses, "routers": out.routers}
