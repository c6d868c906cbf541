"""Typed signatures of moe_py._core, written by scripts/make_core_stub.py: do not edit."""
import collections.abc
import typing

import numpy
import numpy.typing


@typing.type_check_only
class _pybind11_type(type):
    """the metaclass of pybind11's classes (pybind11_builtins.pybind11_type)"""

class Activation(metaclass=_pybind11_type):
    """the expert FFN's activation"""
    swiglu: typing.ClassVar[Activation]
    gelu: typing.ClassVar[Activation]
    clamped_swiglu: typing.ClassVar[Activation]
    __members__: typing.ClassVar[dict[str, Activation]]
    def __init__(self, value: int) -> None: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class DropPolicy(metaclass=_pybind11_type):
    """which assignments an expert over capacity drops"""
    position: typing.ClassVar[DropPolicy]
    probs: typing.ClassVar[DropPolicy]
    __members__: typing.ClassVar[dict[str, DropPolicy]]
    def __init__(self, value: int) -> None: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class GroupScore(metaclass=_pybind11_type):
    """a group's score in group-limited top-k"""
    top2_sum: typing.ClassVar[GroupScore]
    max: typing.ClassVar[GroupScore]
    __members__: typing.ClassVar[dict[str, GroupScore]]
    def __init__(self, value: int) -> None: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class PackedExpertWeights(metaclass=_pybind11_type):
    """expert weights packed for a bfloat16 kernel (pack_expert_weights)"""
    @property
    def backward(self) -> bool: ...
    @property
    def kernel(self) -> str: ...
    @property
    def nbytes(self) -> int: ...

class RouterForwardResult(metaclass=_pybind11_type):
    """router_forward's buffers in RouterOutput's field order, then the unweighted load_balance, z_loss and entropy_loss"""
    @property
    def dropped(self) -> numpy.ndarray: ...
    @property
    def entropy(self) -> numpy.ndarray: ...
    @property
    def entropy_loss(self) -> float: ...
    @property
    def load_balance(self) -> float: ...
    @property
    def router_logits(self) -> numpy.ndarray: ...
    @property
    def router_probs(self) -> numpy.ndarray: ...
    @property
    def router_probs_clean(self) -> numpy.ndarray: ...
    @property
    def tokens_per_expert(self) -> numpy.ndarray: ...
    @property
    def topk_indices(self) -> numpy.ndarray: ...
    @property
    def topk_weights(self) -> numpy.ndarray: ...
    @property
    def z_loss(self) -> float: ...

class RouterKind(metaclass=_pybind11_type):
    """the routing algorithm"""
    softmax_topk: typing.ClassVar[RouterKind]
    sigmoid_topk: typing.ClassVar[RouterKind]
    expert_choice: typing.ClassVar[RouterKind]
    sinkhorn: typing.ClassVar[RouterKind]
    hash: typing.ClassVar[RouterKind]
    sqrtsoftplus_topk: typing.ClassVar[RouterKind]
    __members__: typing.ClassVar[dict[str, RouterKind]]
    def __init__(self, value: int) -> None: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class RouterOptions(metaclass=_pybind11_type):
    """the routing options of cpp/router.h, field by field"""
    capacity_factor: float
    drop_policy: DropPolicy
    group_score: GroupScore
    hash_seed: int
    kind: RouterKind
    n_group: int
    noise_seed: int
    noise_std: float
    noise_step: int
    noise_token_offset: int
    normalize_topk: bool
    routed_scaling_factor: float
    seq_len: int
    sinkhorn_iterations: int
    sinkhorn_tolerance: float
    straight_through: bool
    top_k: int
    topk_group: int
    topk_norm_min: float
    training: bool


def adamw_step_f32(*, param: numpy.ndarray, grad: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], m: numpy.ndarray, v: numpy.ndarray, lr: float, beta1: float, beta2: float, bias1: float, bias2: float, eps: float, decay: float, grad_scale: float) -> None:
    """one AdamW update in place of param, m and v"""

def adamw_step_f64(*, param: numpy.ndarray, grad: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], m: numpy.ndarray, v: numpy.ndarray, lr: float, beta1: float, beta2: float, bias1: float, bias2: float, eps: float, decay: float, grad_scale: float) -> None:
    """one AdamW update in place of param, m and v"""

def all_finite_f32(*, a: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> bool:
    """whether every value of a (C-contiguous) is finite: no NaN, no Inf"""

def all_finite_f64(*, a: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> bool:
    """whether every value of a (C-contiguous) is finite: no NaN, no Inf"""

def attention_backward_f32(*, qkv: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], dout: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], heads: int) -> numpy.typing.NDArray[numpy.float32]:
    """dqkv of attention_forward from the saved probs"""

def attention_backward_f64(*, qkv: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], dout: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], heads: int) -> numpy.typing.NDArray[numpy.float64]:
    """dqkv of attention_forward from the saved probs"""

def attention_forward_f32(*, qkv: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], heads: int) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """causal multi-head attention over qkv [B, S, 3D], padded keys hidden; returns (out, probs)"""

def attention_forward_f64(*, qkv: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], heads: int) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    """causal multi-head attention over qkv [B, S, 3D], padded keys hidden; returns (out, probs)"""

def balance_distribution_f32(*, probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], kind: RouterKind) -> numpy.typing.NDArray[numpy.float32]:
    """the distribution the load-balance loss averages: probs, or per-expert scores (sigmoid, sqrt-softplus) normalised per real token"""

def balance_distribution_f64(*, probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], kind: RouterKind) -> numpy.typing.NDArray[numpy.float64]:
    """the distribution the load-balance loss averages: probs, or per-expert scores (sigmoid, sqrt-softplus) normalised per real token"""

def bf16_kernel() -> str:
    """the bfloat16 GEMM kernel compute_dtype='bfloat16' runs on: 'amx', 'avx512_bf16' or 'fallback' (or an emulation, when set)"""

def bf16_kernel_available(*, kernel: str) -> bool:
    """whether this CPU and OS can run the kernel"""

def bf16_kernel_pays(*, kernel: str) -> bool:
    """whether the kernel, where it runs, is faster than the fallback on this CPU (may be the default)"""

def bf16_self_check(*, kernel: str) -> bool:
    """whether the kernel agrees with a float64 product on the built-in shapes"""

def build_facts() -> dict:
    """compiler, flags, compiled SIMD, OpenMP, Eigen and BLAS facts of this build"""

def combine_backward_f32(*, dy: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], ye: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """(dye, d_topk_weights) of combine_forward"""

def combine_backward_f64(*, dy: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], ye: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    """(dye, d_topk_weights) of combine_forward"""

def combine_forward_f32(*, ye: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """y[t] = sum_j topk_weights[t, j] * ye[slot_row[t, j]]"""

def combine_forward_f64(*, ye: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """y[t] = sum_j topk_weights[t, j] * ye[slot_row[t, j]]"""

def cross_entropy_f32(*, logits: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], labels: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], ignore_index: int) -> tuple[float, numpy.typing.NDArray[numpy.float32]]:
    """mean cross-entropy over labels != ignore_index, and d loss / d logits"""

def cross_entropy_f64(*, logits: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], labels: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], ignore_index: int) -> tuple[float, numpy.typing.NDArray[numpy.float64]]:
    """mean cross-entropy over labels != ignore_index, and d loss / d logits"""

def dispatch_plan(*, topk_indices: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dropped: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], num_experts: int) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64]]:
    """(offsets [E+1], row_token [N], slot_row [T, k]): kept slots sorted by expert, then token"""

def dispatch_weighted_backward_f32(*, dxs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """(dx, d_topk_weights) of dispatch_weighted"""

def dispatch_weighted_backward_f64(*, dxs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    """(dx, d_topk_weights) of dispatch_weighted"""

def dispatch_weighted_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], rows: int) -> numpy.typing.NDArray[numpy.float32]:
    """xs[slot_row[t, j]] = topk_weights[t, j] * x[t]: the rows of the input-scaled combine"""

def dispatch_weighted_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], rows: int) -> numpy.typing.NDArray[numpy.float64]:
    """xs[slot_row[t, j]] = topk_weights[t, j] * x[t]: the rows of the input-scaled combine"""

def experts_backward_f32(*, xs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], w1: numpy.ndarray, w3: numpy.ndarray, w2: numpy.ndarray, h1: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], h3: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], dye: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], activation: Activation, dw1: numpy.ndarray, dw3: numpy.ndarray, dw2: numpy.ndarray, path: str = 'auto', swiglu_alpha: float | None = None, swiglu_limit: float | None = None, db1: numpy.ndarray | None = None, db3: numpy.ndarray | None = None, db2: numpy.ndarray | None = None, bf16: bool = False, linear: bool = False, packed: PackedExpertWeights | None = None, accumulate: bool = True) -> numpy.typing.NDArray[numpy.float32]:
    """dxs from dye; adds the weight gradients into dw1, dw3, dw2 (in the weights' layout: linear as in experts_forward) and, for experts with biases, db1, db3, db2 (path: 'auto', or 'by_expert' / 'two_phase' to force one walk; both give the same bits). packed: the weights' backward packs, as in experts_forward. accumulate False: the gradients are written into dw1 ... db2 instead, whatever they held"""

def experts_backward_f64(*, xs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], w1: numpy.ndarray, w3: numpy.ndarray, w2: numpy.ndarray, h1: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], h3: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], dye: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], activation: Activation, dw1: numpy.ndarray, dw3: numpy.ndarray, dw2: numpy.ndarray, path: str = 'auto', swiglu_alpha: float | None = None, swiglu_limit: float | None = None, db1: numpy.ndarray | None = None, db3: numpy.ndarray | None = None, db2: numpy.ndarray | None = None, bf16: bool = False, linear: bool = False, packed: PackedExpertWeights | None = None, accumulate: bool = True) -> numpy.typing.NDArray[numpy.float64]:
    """dxs from dye; adds the weight gradients into dw1, dw3, dw2 (in the weights' layout: linear as in experts_forward) and, for experts with biases, db1, db3, db2 (path: 'auto', or 'by_expert' / 'two_phase' to force one walk; both give the same bits). packed: the weights' backward packs, as in experts_forward. accumulate False: the gradients are written into dw1 ... db2 instead, whatever they held"""

def experts_forward_f32(*, xs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], w1: numpy.ndarray, w3: numpy.ndarray, w2: numpy.ndarray, activation: Activation, swiglu_alpha: float | None = None, swiglu_limit: float | None = None, b1: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None = None, b3: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None = None, b2: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None = None, bf16: bool = False, linear: bool = False, packed: PackedExpertWeights | None = None) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """every expert's FFN on its rows of xs (biases b1, b3, b2: all or none); returns (h1, h3, ye), h1/h3 saved for backward. bf16 (float32 only): the GEMMs read bfloat16-rounded operands, the weights given rounded already on the fallback kernel; packed: the weights' forward packs (pack_expert_weights), whose kernel runs the call. linear: the weights are nn.Linear's [E, out, in] (w1, w3 [E, d_ff, d_model], w2 [E, d_model, d_ff]); each expert's matrix must be C-contiguous, the experts may lie apart"""

def experts_forward_f64(*, xs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], w1: numpy.ndarray, w3: numpy.ndarray, w2: numpy.ndarray, activation: Activation, swiglu_alpha: float | None = None, swiglu_limit: float | None = None, b1: typing.Annotated[numpy.typing.ArrayLike, numpy.float64] | None = None, b3: typing.Annotated[numpy.typing.ArrayLike, numpy.float64] | None = None, b2: typing.Annotated[numpy.typing.ArrayLike, numpy.float64] | None = None, bf16: bool = False, linear: bool = False, packed: PackedExpertWeights | None = None) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    """every expert's FFN on its rows of xs (biases b1, b3, b2: all or none); returns (h1, h3, ye), h1/h3 saved for backward. bf16 (float32 only): the GEMMs read bfloat16-rounded operands, the weights given rounded already on the fallback kernel; packed: the weights' forward packs (pack_expert_weights), whose kernel runs the call. linear: the weights are nn.Linear's [E, out, in] (w1, w3 [E, d_ff, d_model], w2 [E, d_model, d_ff]); each expert's matrix must be C-contiguous, the experts may lie apart"""

def fingerprint(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> bytes:
    """64 bytes that change whenever any one value of x changes (bf16.h)"""

def fma_peak(*, iters: int) -> tuple[float, float]:
    """FP32 FMA loop on every OpenMP thread: (flops done, checksum); time it"""

def gather_rows_backward_f32(*, dxs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> numpy.typing.NDArray[numpy.float32]:
    """dx[t] = sum over t's kept slots of dxs[slot_row[t, j]] (fixed slot order)"""

def gather_rows_backward_f64(*, dxs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], slot_row: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> numpy.typing.NDArray[numpy.float64]:
    """dx[t] = sum over t's kept slots of dxs[slot_row[t, j]] (fixed slot order)"""

def gather_rows_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], row_token: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> numpy.typing.NDArray[numpy.float32]:
    """xs[r] = x[row_token[r]]: the tokens' rows grouped by expert"""

def gather_rows_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], row_token: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> numpy.typing.NDArray[numpy.float64]:
    """xs[r] = x[row_token[r]]: the tokens' rows grouped by expert"""

def get_num_threads() -> int:
    """OpenMP threads the kernels run on"""

def linear_backward_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], dy: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], dw: numpy.ndarray, need_dx: bool = True, bf16: bool = False) -> numpy.typing.NDArray[numpy.float32]:
    """dx = dy @ w.T (empty when need_dx is False); adds x.T @ dy into dw (bf16: bfloat16 operands, float32 sums; float32 only)"""

def linear_backward_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], w: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], dy: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], dw: numpy.ndarray, need_dx: bool = True, bf16: bool = False) -> numpy.typing.NDArray[numpy.float64]:
    """dx = dy @ w.T (empty when need_dx is False); adds x.T @ dy into dw (bf16: bfloat16 operands, float32 sums; float32 only)"""

def linear_forward_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], bf16: bool = False) -> numpy.typing.NDArray[numpy.float32]:
    """y = x @ w (bf16: bfloat16 operands, float32 sums; float32 only)"""

def linear_forward_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], w: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], bf16: bool = False) -> numpy.typing.NDArray[numpy.float64]:
    """y = x @ w (bf16: bfloat16 operands, float32 sums; float32 only)"""

def load_balance_of_sums(*, counts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], prob_sums: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], real: int) -> float:
    """the batch-scope load balance E * sum_e f_e * prob_sums[e] / real, f from the counts (the router kernel's own formula, for sums gathered over processes)"""

def matmul_f32(*, a: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], b: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """c = a @ b through the kernels' tiled GEMM path (the benchmarks' own SGEMM)"""

def matmul_f64(*, a: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], b: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """c = a @ b through the kernels' tiled GEMM path (the benchmarks' own SGEMM)"""

def multi_token_labels(*, targets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], n_predict: int, ignore_index: int) -> numpy.typing.NDArray[numpy.int64]:
    """labels [n_predict, B, S] of heads predicting t+1 ... t+n_predict, padding ignored"""

def pack_expert_weights(*, w1: numpy.ndarray, w3: numpy.ndarray, w2: numpy.ndarray, activation: Activation, linear: bool = False, backward: bool = False, kernel: str | None = None) -> PackedExpertWeights:
    """float32 expert weights (as experts_forward takes them) packed for a bfloat16 kernel (default: the one in use; not the fallback), as a forward's products read them or, backward, a backward's"""

def pool_cached_bytes() -> int:
    """bytes held in the kernels' block cache for reuse"""

def pool_release() -> None:
    """return the kernels' cached blocks to the OS"""

def rmsnorm_backward_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], g: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], rstd: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], dy: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], dg: numpy.ndarray) -> numpy.typing.NDArray[numpy.float32]:
    """dx of rmsnorm_forward; adds into dg"""

def rmsnorm_backward_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], g: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], rstd: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], dy: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], dg: numpy.ndarray) -> numpy.typing.NDArray[numpy.float64]:
    """dx of rmsnorm_forward; adds into dg"""

def rmsnorm_forward_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], g: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], eps: float) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """y = x * rstd * g with rstd = 1/sqrt(mean(x^2) + eps); returns (y, rstd)"""

def rmsnorm_forward_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], g: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], eps: float) -> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]:
    """y = x * rstd * g with rstd = 1/sqrt(mean(x^2) + eps); returns (y, rstd)"""

def round_to_bf16(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """x rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as float32 values"""

def router_backward_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w_router: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], router_logits: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], router_probs_clean: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], router_probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], entropy: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], topk_indices: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dropped: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], tokens_per_expert: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], d_topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None, options: RouterOptions, balance_counts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None, load_balance_coef: float, z_loss_coef: float, entropy_coef: float, dx: numpy.ndarray, dw_router: numpy.ndarray, db_router: numpy.ndarray | None = None) -> None:
    """add d(sum(d_topk_weights * topk_weights) + weighted aux losses) into dx, dw_router and (a router with a bias) db_router"""

def router_backward_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], w_router: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], router_logits: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], router_probs_clean: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], router_probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], entropy: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], topk_indices: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dropped: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], tokens_per_expert: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], d_topk_weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float64] | None, options: RouterOptions, balance_counts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None, load_balance_coef: float, z_loss_coef: float, entropy_coef: float, dx: numpy.ndarray, dw_router: numpy.ndarray, db_router: numpy.ndarray | None = None) -> None:
    """add d(sum(d_topk_weights * topk_weights) + weighted aux losses) into dx, dw_router and (a router with a bias) db_router"""

def router_forward_f32(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w_router: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None, mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], num_experts: int, options: RouterOptions, expert_bias: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None, balance_counts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None, token_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None, forced_indices: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None, expert_mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8] | None = None, b_router: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None = None) -> RouterForwardResult:
    """route x [T, d_model] with the algorithm of options.kind: logits (x @ w_router + b_router), clean and noisy scores, the selection (or forced_indices; never an expert_mask 0 expert), combine weights, capacity drops and the router losses"""

def router_forward_f64(*, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], w_router: typing.Annotated[numpy.typing.ArrayLike, numpy.float64] | None, mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], num_experts: int, options: RouterOptions, expert_bias: typing.Annotated[numpy.typing.ArrayLike, numpy.float64] | None, balance_counts: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None, token_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None, forced_indices: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None, expert_mask: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8] | None = None, b_router: typing.Annotated[numpy.typing.ArrayLike, numpy.float64] | None = None) -> RouterForwardResult:
    """route x [T, d_model] with the algorithm of options.kind: logits (x @ w_router + b_router), clean and noisy scores, the selection (or forced_indices; never an expert_mask 0 expert), combine weights, capacity drops and the router losses"""

def row_entropy_f32(*, probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
    """-sum p log p of each row in nats (the router's own entropy)"""

def row_entropy_f64(*, probs: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> numpy.typing.NDArray[numpy.float64]:
    """-sum p log p of each row in nats (the router's own entropy)"""

def scatter_add_rows_f32(*, dout: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], table_grad: numpy.ndarray) -> None:
    """table_grad[ids[t]] += dout[t], in token order"""

def scatter_add_rows_f64(*, dout: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], table_grad: numpy.ndarray) -> None:
    """table_grad[ids[t]] += dout[t], in token order"""

def set_bf16_kernel(*, kernel: str) -> None:
    """use this bfloat16 kernel from now on in this process (ValueError if it cannot run here)"""

def set_num_threads(*, n: int) -> None:
    """OpenMP threads of every later kernel call, from any thread"""

def small_gemm_bf16(*, kernel: str, a: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], b: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], trans_a: bool, trans_b: bool, c: numpy.ndarray, accumulate: bool, packed: bool) -> None:
    """c (+)= op(a) op(b) as bfloat16 products summed in float32 (a and b rounded to bfloat16 as packed), by one bfloat16 kernel"""

def small_gemm_f32(*, a: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], b: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], trans_a: bool, trans_b: bool, c: numpy.ndarray, accumulate: bool, packed: bool) -> None:
    """c (+)= op(a) op(b) by the expert kernels' micro-kernel GEMM, one call (packed: op(b) packed beforehand, as for expert weights)"""

def small_gemm_f64(*, a: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], b: typing.Annotated[numpy.typing.ArrayLike, numpy.float64], trans_a: bool, trans_b: bool, c: numpy.ndarray, accumulate: bool, packed: bool) -> None:
    """c (+)= op(a) op(b) by the expert kernels' micro-kernel GEMM, one call (packed: op(b) packed beforehand, as for expert weights)"""

def sum_squares_f32(*, g: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> float:
    """sum of g**2 in float64, in a fixed order"""

def sum_squares_f64(*, g: typing.Annotated[numpy.typing.ArrayLike, numpy.float64]) -> float:
    """sum of g**2 in float64, in a fixed order"""

def zeros_f32(*, shape: collections.abc.Sequence[int]) -> numpy.ndarray:
    """an array of zeros whose memory comes from the kernels' block cache"""

def zeros_f64(*, shape: collections.abc.Sequence[int]) -> numpy.ndarray:
    """an array of zeros whose memory comes from the kernels' block cache"""
