"""MoEConfig: the one configuration every MoE part is built from, validated once."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

# The label of positions no loss reads (no next byte, or padding); as PyTorch's default.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class RouterTraits:
    """What the code outside a router's kernel needs to know of it. Every such question is
    asked here (`router_traits(cfg.router).has_weight`), never by comparing router names."""

    has_weight: bool  # a learned w_router [d_model, E] (params["w_router"]) and a router backward
    needs_token_ids: bool  # routes by the token ids (x.shape[:-1] integers), not by x
    picks_by_score: bool  # each token picks its top k by a score: logit noise and expert groups apply
    soft_weights: bool  # combine weights are scores (normalize_topk and straight_through apply)
    normalizes_scores: bool  # per-expert scores (sigmoid, sqrt-softplus), not a distribution: the balance loss and logged entropy normalise them per token
    expert_bias: bool  # a selection-only expert bias (DeepSeek-V3's aux-loss-free one, or loaded: Ernie 4.5) and routed_scaling_factor
    bias_by_default: bool  # the aux-loss-free bias update is on by default (bias_update_rate None: 1e-3)
    experts_choose: bool  # experts pick their tokens: capacity defaults to 1.0, k is per expert on average
    chooses_over_batch: bool  # a token's routing depends on the other tokens of the batch


# The routers, in the order the CLI lists them, with their traits. Adding a router: see
# docs/design.md, "Adding a router".
ROUTER_TRAITS: Dict[str, RouterTraits] = {
    "softmax_topk": RouterTraits(has_weight=True, needs_token_ids=False, picks_by_score=True, soft_weights=True,
                                 normalizes_scores=False, expert_bias=True, bias_by_default=False,
                                 experts_choose=False, chooses_over_batch=False),
    "sigmoid_topk": RouterTraits(has_weight=True, needs_token_ids=False, picks_by_score=True, soft_weights=True,
                                 normalizes_scores=True, expert_bias=True, bias_by_default=True,
                                 experts_choose=False, chooses_over_batch=False),
    "sqrtsoftplus_topk": RouterTraits(has_weight=True, needs_token_ids=False, picks_by_score=True,
                                      soft_weights=True, normalizes_scores=True, expert_bias=True,
                                      bias_by_default=True, experts_choose=False,
                                      chooses_over_batch=False),
    "expert_choice": RouterTraits(has_weight=True, needs_token_ids=False, picks_by_score=False,
                                  soft_weights=False, normalizes_scores=False, expert_bias=False,
                                  bias_by_default=False, experts_choose=True, chooses_over_batch=True),
    "sinkhorn": RouterTraits(has_weight=True, needs_token_ids=False, picks_by_score=False, soft_weights=True,
                             normalizes_scores=False, expert_bias=False, bias_by_default=False,
                             experts_choose=False, chooses_over_batch=True),
    "hash": RouterTraits(has_weight=False, needs_token_ids=True, picks_by_score=False, soft_weights=False,
                         normalizes_scores=False, expert_bias=False, bias_by_default=False,
                         experts_choose=False, chooses_over_batch=False),
}
ROUTERS = tuple(ROUTER_TRAITS)


def router_traits(router: str) -> RouterTraits:
    if router not in ROUTER_TRAITS:
        raise ValueError(f"router: expected one of {ROUTERS}, got {router!r}")
    return ROUTER_TRAITS[router]


def routers_with(trait: str) -> tuple:
    """The routers that have `trait` (for messages: "needs one of ...")."""
    return tuple(r for r, t in ROUTER_TRAITS.items() if getattr(t, trait))


BALANCE_SCOPES = ("batch", "sequence", "global")
GROUP_SCORES = ("top2_sum", "max")
DROP_POLICIES = ("position", "probs")


@dataclass(frozen=True)
class ActivationTraits:
    """What the code outside the activation kernels needs to know of an expert activation,
    asked here (`cfg.activation_traits.gated`) rather than by comparing names."""

    gated: bool  # multiplies by a second projection x W3: the experts have w3 (and b3)
    clamped: bool  # gpt-oss's clamped SwiGLU: swiglu_alpha and swiglu_limit apply


# The expert activations, in the order the CLI lists them (formulas: docs/design.md, "Experts").
ACTIVATION_TRAITS: Dict[str, ActivationTraits] = {
    "swiglu": ActivationTraits(gated=True, clamped=False),
    "gelu": ActivationTraits(gated=False, clamped=False),
    "clamped_swiglu": ActivationTraits(gated=True, clamped=True),
}
ACTIVATIONS = tuple(ACTIVATION_TRAITS)


def activations_with(trait: str) -> tuple:
    """The activations that have `trait` (for messages)."""
    return tuple(a for a, t in ACTIVATION_TRAITS.items() if getattr(t, trait))


DTYPES = {"float32": np.float32, "float64": np.float64}
# the expert GEMMs' arithmetic: None = the parameters' dtype; "bfloat16" = bf16 operands with
# float32 sums (float32 parameters only; moe_py/bf16.py)
COMPUTE_DTYPES = (None, "bfloat16")
# y = sum_j w_j FFN_j(x) ("output"), or sum_j FFN_j(w_j x) ("input", as Llama 4)
COMBINES = ("output", "input")


# Seeds reach the C++ noise as unsigned 64-bit and NumPy's generator; keep them in int64.
MAX_SEED = 2**63 - 1


def plain_scalars(cfg) -> None:
    """NumPy scalars in a config's fields become Python ones: a uint8 width would wrap in
    arithmetic, and JSON cannot write NumPy scalars."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, np.bool_):
            setattr(cfg, f.name, bool(v))
        elif isinstance(v, np.integer):
            setattr(cfg, f.name, int(v))
        elif isinstance(v, np.floating):
            setattr(cfg, f.name, float(v))


# Bounds of options whose absurd values would run for minutes or overflow rather than fail:
# a sigmoid score lies in (0, 1), so an expert-bias step above 1 per optimiser step is a typo
# (and 1e300 drove the bias to +-inf); 10,000 Sinkhorn sweeps take about half a second on
# 8192 x 64 scores, where 1e6 took 47 s that Ctrl-C could not stop.
MAX_BIAS_UPDATE_RATE = 1.0
MAX_SINKHORN_ITERATIONS = 10_000


def check_compute_dtype(compute_dtype, dtype: str) -> None:
    """compute_dtype (MoEConfig's, ModelConfig's) must be None or "bfloat16" over float32."""
    if compute_dtype is not None:
        one_of("compute_dtype", compute_dtype, COMPUTE_DTYPES[1:])
    if compute_dtype == "bfloat16" and dtype != "float32":
        raise ValueError(f"compute_dtype: 'bfloat16' needs dtype 'float32' (float32 master "
                         f"weights), got dtype {dtype!r}")


def one_of(name: str, value, allowed) -> None:
    """value must be one of the allowed strings (a dict or a list is refused, not hashed)."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")


def config_from_dict(cls, d, what: str):
    """cls(**d) for a dict read from a file, with one clear ValueError naming `what` when d is
    not a dict, has fields this moe_py's cls does not know, or has invalid values."""
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a JSON object of {cls.__name__} fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown} (not fields of this moe_py's {cls.__name__})")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None


def check_seed(value, name: str = "seed") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name}: expected an integer in [0, 2**63 - 1], got {value!r}")


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def finite_number(name: str, value, allow_negative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if not allow_negative and value < 0:
        raise ValueError(f"{name}: expected a number >= 0, got {value!r}")


def _default(name: str):
    """A MoEConfig field's default (the one place it is written is the field)."""
    return MoEConfig.__dataclass_fields__[name].default


@dataclass
class MoEConfig:
    """Configuration of one MoE layer (docs/design.md, "The MoE layer").

    normalize_topk=None takes the default: True for top_k > 1, False for top_k = 1
    (with k = 1 normalising makes every weight 1 and the router would get no
    gradient from the task loss; asking for it explicitly warns); expert choice and
    hash never normalise (normalize_topk is set to False). capacity_factor=None is dropless
    (expert choice: 1.0, see `capacity`). bias_update_rate=None: 1e-3 for sigmoid_topk and
    sqrtsoftplus_topk, 0 (a frozen expert bias, 0 unless loaded) for the others (see
    `bias_rate`).
    Experts have no biases unless ffn_bias (routed experts only); "gelu" is the erf form.
    docs/design.md, "Experts", has the expert variants' formulas and "Routers" those of every
    router.
    """

    d_model: int = 128  # width of the tokens the layer reads and writes
    d_ff: int = 128  # hidden width of one expert
    num_experts: int = 8  # experts per MoE layer (E)
    top_k: int = 2  # experts each token is sent to (k)
    router: str = "softmax_topk"  # routing algorithm: softmax_topk, sigmoid_topk, sqrtsoftplus_topk, expert_choice, sinkhorn or hash
    normalize_topk: Optional[bool] = None  # divide the k weights by their sum (auto: k > 1)
    capacity_factor: Optional[float] = None  # expert capacity ceil(c * R * k / E); None: dropless
    drop_policy: str = "position"  # over capacity, drop by position (first choices first) or lowest probs
    activation: str = "swiglu"  # expert activation: swiglu, gelu (erf form) or clamped_swiglu (gpt-oss)
    swiglu_alpha: float = 1.702  # clamped_swiglu: the gate is g * sigmoid(alpha g)
    swiglu_limit: float = 7.0  # clamped_swiglu: the gate is clamped above at limit, the up projection to [-limit, limit]
    ffn_bias: bool = False  # routed experts add biases b1, b3 (gated), b2 after their GEMMs (gpt-oss)
    combine: str = "output"  # the combine weights scale the experts' outputs, or their inputs ("input": Llama 4)
    straight_through: bool = False  # forward weights 1 in training, gradient of the soft weights
    load_balance_coef: float = 0.01  # weight of E * sum_e f_e P_e in aux_loss
    z_loss_coef: float = 0.001  # weight of mean logsumexp(logits)^2 in aux_loss
    entropy_coef: float = 0.0  # weight of the mean clean routing entropy in aux_loss
    load_balance_scope: str = "batch"  # f and P of the balance loss over the batch, each sequence, or the optimiser step (global)
    routed_scaling_factor: float = 1.0  # top-k routers with an expert bias: multiplies the combine weights
    bias_update_rate: Optional[float] = None  # aux-loss-free expert-bias step (auto: 1e-3 for sigmoid/sqrtsoftplus_topk, else 0; 0: frozen)
    n_group: int = 1  # group-limited routing: experts in n_group equal groups (1: off)
    topk_group: int = 1  # group-limited routing: tokens pick experts from their topk_group best groups
    sinkhorn_iterations: int = 100  # sinkhorn: at most this many balancing sweeps
    sinkhorn_tolerance: float = 1e-4  # sinkhorn: stop when the column scales change less than this
    router_bias: bool = False  # a learned bias b_router [E] added to the router logits (gpt-oss); routers with a w_router
    group_score: str = "top2_sum"  # group-limited routing: a group scores the sum of its two best experts (top2_sum, DeepSeek-V3) or its best (max, DeepSeek-V2)
    topk_norm_min: float = 0.0  # normalize_topk: divide the k weights by max(their sum, this) (Ernie 4.5's norm_min)
    num_shared_experts: int = 0  # always-on experts every real token goes through
    shared_d_ff: Optional[int] = None  # hidden width of one shared expert (None: d_ff)
    dtype: str = "float32"  # float32 or float64, for inputs and parameters
    compute_dtype: Optional[str] = None  # expert GEMMs: None (dtype) or "bfloat16" (float32 dtype only; bf16 operands, float32 sums)
    seed: int = 0  # seed of the initial weights and of the router noise

    def __post_init__(self) -> None:
        plain_scalars(self)
        positive_int("d_model", self.d_model)
        positive_int("d_ff", self.d_ff)
        positive_int("num_experts", self.num_experts)
        positive_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k: expected top_k <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        for name, allowed in (("router", ROUTERS), ("load_balance_scope", BALANCE_SCOPES),
                              ("drop_policy", DROP_POLICIES), ("activation", ACTIVATIONS),
                              ("combine", COMBINES), ("dtype", tuple(DTYPES)),
                              ("group_score", GROUP_SCORES)):
            one_of(name, getattr(self, name), allowed)
        if self.capacity_factor is not None:
            finite_number("capacity_factor", self.capacity_factor)
            if self.capacity_factor <= 0:
                raise ValueError(f"capacity_factor: expected a number > 0 (None: dropless), "
                                 f"got {self.capacity_factor!r}; 0 would drop every token")
        for name in ("load_balance_coef", "z_loss_coef", "entropy_coef"):
            # entropy_coef may be negative (to push routing towards confident choices)
            finite_number(name, getattr(self, name), allow_negative=(name == "entropy_coef"))
        if not isinstance(self.straight_through, (bool, np.bool_)):
            raise ValueError(f"straight_through: expected a bool, got {self.straight_through!r}")
        self._check_router_options()
        self._check_expert_options()
        if not self.traits.soft_weights:
            # their weights are the experts' own scores (expert choice) or 1/k (hash)
            self.normalize_topk = False
        elif self.normalize_topk is None:
            self.normalize_topk = self.top_k > 1
        elif not isinstance(self.normalize_topk, (bool, np.bool_)):
            raise ValueError(f"normalize_topk: expected a bool or None, got {self.normalize_topk!r}")
        elif self.normalize_topk and self.top_k == 1:
            warnings.warn(
                "normalize_topk=True with top_k=1 makes every combine weight 1: the router "
                "gets no gradient from the task loss, only from the aux losses",
                stacklevel=3,
            )
        finite_number("topk_norm_min", self.topk_norm_min)
        if self.topk_norm_min > 0 and not self.normalize_topk:
            raise ValueError(f"topk_norm_min: floors the denominator of normalize_topk, which is off "
                             f"here; set normalize_topk=True or topk_norm_min=0, got {self.topk_norm_min!r}")
        check_seed(self.seed)

    def _check_expert_options(self) -> None:
        check_compute_dtype(self.compute_dtype, self.dtype)
        if not isinstance(self.ffn_bias, (bool, np.bool_)):
            raise ValueError(f"ffn_bias: expected a bool, got {self.ffn_bias!r}")
        if self.ffn_bias and self.num_shared_experts:
            raise ValueError(f"ffn_bias: the shared experts have no biases; ffn_bias=True needs "
                             f"num_shared_experts=0 (got {self.num_shared_experts})")
        for name in ("swiglu_alpha", "swiglu_limit"):
            value = getattr(self, name)
            finite_number(name, value, allow_negative=True)  # to say "> 0" below
            if value <= 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
            if not self.activation_traits.clamped and value != _default(name):
                raise ValueError(f"{name}: only activation {activations_with('clamped')} reads it "
                                 f"(activation is {self.activation!r}); leave it at {_default(name)}")

    def _check_router_options(self) -> None:
        router, traits = self.router, self.traits
        finite_number("routed_scaling_factor", self.routed_scaling_factor)
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor: expected a number > 0, got "
                             f"{self.routed_scaling_factor!r}")
        if self.routed_scaling_factor != 1.0 and not traits.expert_bias:
            raise ValueError(f"routed_scaling_factor: only {routers_with('expert_bias')} scale their weights")
        if not isinstance(self.router_bias, (bool, np.bool_)):
            raise ValueError(f"router_bias: expected a bool, got {self.router_bias!r}")
        if self.router_bias and not traits.has_weight:
            raise ValueError(f"router_bias: a logit bias needs a learned w_router, one of "
                             f"{routers_with('has_weight')}; {router} has none")
        finite_number("bias_update_rate", self.bias_rate)
        if not 0 <= self.bias_rate <= MAX_BIAS_UPDATE_RATE:
            raise ValueError(f"bias_update_rate: expected a step in [0, {MAX_BIAS_UPDATE_RATE}] "
                             f"(DeepSeek-V3 uses 1e-3), got {self.bias_rate!r}")
        if self.bias_rate > 0 and not traits.expert_bias:
            raise ValueError(f"bias_update_rate: the aux-loss-free expert bias belongs to "
                             f"{routers_with('expert_bias')}; set it to 0 or None for other routers")
        positive_int("n_group", self.n_group)
        positive_int("topk_group", self.topk_group)
        if self.n_group > 1:
            if not traits.picks_by_score:
                raise ValueError(f"n_group: group-limited routing needs one of {routers_with('picks_by_score')}")
            if self.num_experts % self.n_group:
                raise ValueError(f"n_group: expected a divisor of num_experts "
                                 f"({self.num_experts}), got {self.n_group}")
            if self.topk_group > self.n_group or \
                    self.top_k > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(f"topk_group: expected topk_group <= n_group ({self.n_group}) "
                                 f"and top_k <= topk_group * num_experts / n_group")
        elif self.group_score != GROUP_SCORES[0]:
            raise ValueError(f"group_score: scores the groups of group-limited routing, which is off "
                             f"(n_group=1); set n_group > 1 or group_score={GROUP_SCORES[0]!r}")
        positive_int("sinkhorn_iterations", self.sinkhorn_iterations)
        if self.sinkhorn_iterations > MAX_SINKHORN_ITERATIONS:
            raise ValueError(f"sinkhorn_iterations: expected at most {MAX_SINKHORN_ITERATIONS} (a "
                             f"forward's sweeps run in C++, uninterruptible), got {self.sinkhorn_iterations}")
        finite_number("sinkhorn_tolerance", self.sinkhorn_tolerance)
        if isinstance(self.num_shared_experts, bool) or \
                not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts: expected an integer >= 0, got "
                             f"{self.num_shared_experts!r}")
        positive_int("shared_d_ff", self.shared_width)
        if self.straight_through and not traits.soft_weights:
            raise ValueError(f"straight_through: {router} routing has no soft top-k weights")

    # The auto defaults are resolved here, not written into the fields, so that
    # dataclasses.replace(cfg, router=...) takes the new router's defaults.
    @property
    def traits(self) -> RouterTraits:
        return router_traits(self.router)

    @property
    def activation_traits(self) -> ActivationTraits:
        return ACTIVATION_TRAITS[self.activation]

    @property
    def bias_rate(self) -> float:
        """The expert-bias step: bias_update_rate, or its default for the router."""
        if self.bias_update_rate is not None:
            return self.bias_update_rate
        return 1e-3 if self.traits.bias_by_default else 0.0

    @property
    def shared_width(self) -> int:
        """The hidden width of one shared expert."""
        return self.d_ff if self.shared_d_ff is None else self.shared_d_ff

    @property
    def active_ffn_width(self) -> int:
        """The FFN width one token runs through (top_k routed experts and the shared ones):
        the width of the dense baseline with the same active parameters."""
        return self.top_k * self.d_ff + self.num_shared_experts * self.shared_width

    @property
    def experts_per_token(self) -> float:
        """Routed experts a token runs through: top_k, or on average capacity * top_k when
        the experts choose (an expert takes capacity * R * k / E tokens)."""
        if self.traits.experts_choose:
            cap = self.capacity
            assert cap is not None  # expert choice always has one (1.0 by default)
            return self.top_k * cap
        return self.top_k

    @property
    def capacity(self) -> Optional[float]:
        """The capacity factor routing uses: capacity_factor, or 1.0 for expert choice."""
        if self.capacity_factor is None and self.traits.experts_choose:
            return 1.0
        return self.capacity_factor

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype]
