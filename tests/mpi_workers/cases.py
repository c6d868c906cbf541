"""Inputs shared by the MPI workers and tests/test_distributed.py: both sides build the
same configs and batches from these few numbers, so nothing computed crosses over."""
import numpy as np

from moe_py.config import MoEConfig
from moe_py.layer import MoELayer
from moe_py.data import BatchSampler, synthetic_corpus
from moe_py.models import ModelConfig
from moe_py.train import TrainConfig


def layer_setup(case: dict):
    """(cfg, params, x [T, D], mask [T], dy [T, D], splits): the global batch, the
    single-process layer's weights, and where the ranks' token ranges start. With
    "seq_len" the layer sees x as [T / seq_len, seq_len, D] (cut between sequences)."""
    cfg = MoEConfig(**case["cfg"])
    params = MoELayer(cfg).state_dict()
    rng = np.random.default_rng(case["seed"])
    T, D = case["tokens"], cfg.d_model
    x = rng.standard_normal((T, D)).astype(cfg.np_dtype)
    mask = rng.random(T) >= case.get("padding", 0.0)
    for a, b in case.get("padded_ranges", []):
        mask[a:b] = False
    dy = rng.standard_normal((T, D)).astype(cfg.np_dtype)
    if "b_router" in params:  # router_bias: a bias away from 0, from its own generator
        params["b_router"][...] = np.random.default_rng(case["seed"] + 2000).standard_normal(cfg.num_experts) * 0.5
    if "starve" in case:
        # expert e loses every choice: feature 0 is >= 1 and its router weight there -100
        x[:, 0] = np.abs(x[:, 0]) + 1
        params["w_router"][:, case["starve"]] = 0
        params["w_router"][0, case["starve"]] = -100
    if cfg.ffn_bias:  # biases away from their init of 0, from their own generator
        brng = np.random.default_rng(case["seed"] + 1000)
        for name in ("b1", "b3", "b2"):
            if name in params:
                params[name] = brng.standard_normal(params[name].shape).astype(cfg.np_dtype)
    return cfg, params, x, mask, dy, case["splits"]


def token_ids(case: dict, T: int):
    """Byte ids [T] for the hash router (None for the others), from their own generator so
    that the other cases' inputs stay as they were."""
    if case["cfg"].get("router") != "hash":
        return None
    return np.random.default_rng(case["seed"] + 1000).integers(0, 256, T)


def as_sequences(case: dict, *arrays):
    """The arrays as [sequences, seq_len, ...] when the case has sequences."""
    S = case.get("seq_len")
    return arrays if S is None else tuple(a.reshape((-1, S) + a.shape[1:]) for a in arrays)


def prepare(layer, case: dict, x, mask, ids=None, bounds=None) -> None:
    """What happens to a layer before the compared forward: an expert bias (the top-k routers),
    router noise, and an earlier training forward of the same step (whose loads the global
    scope reads, and which moves the noise one step on). The earlier batch reverses each
    rank's rows (`bounds`: the ranks' row ranges, for the global batch), so the global
    batch of that forward is the same in one process and over the ranks."""
    if "expert_bias" in case:
        layer.router.expert_bias[...] = case["expert_bias"]
    if "noise" in case:  # NoisyTop-k: [start_std, anneal_steps]
        layer.set_noise_annealing(*case["noise"])
    if case.get("earlier_forward"):
        bounds = [0, len(x)] if bounds is None else bounds
        order = np.concatenate([np.arange(a, b)[::-1] for a, b in zip(bounds[:-1], bounds[1:])])
        earlier = None if ids is None else as_sequences(case, ids[order])[0]
        layer(*as_sequences(case, x[order], mask[order]), token_ids=earlier)


_CORPUS = {}


def train_setup(case: dict):
    """(ModelConfig, TrainConfig, BatchSampler) of a small LM on the synthetic corpus."""
    if "c" not in _CORPUS:
        _CORPUS["c"] = synthetic_corpus(n_docs=200, split_seed=0)
    corpus = _CORPUS["c"]
    moe = MoEConfig(**case["moe"])
    model = ModelConfig(d_model=moe.d_model, n_layers=2, n_heads=2, d_ff=2 * moe.d_ff,
                        max_seq_len=case["seq_len"], moe=moe, dtype=moe.dtype, seed=1,
                        n_predict=case.get("n_predict", 1))
    train = TrainConfig(corpus="synthetic", steps=case["steps"], batch_size=case["batch_size"],
                        seq_len=case["seq_len"], grad_accum=case.get("grad_accum", 1), warmup=3,
                        lr=3e-3)
    return model, train, BatchSampler(corpus.train, train.batch_size, train.seq_len, train.seed)


class EvalWindows:
    """A held-out sample for evaluate(): the first `n` windows of a batch, as one batch
    (n = 1 leaves the second of two ranks nothing but a padding window)."""

    def __init__(self, sampler, n: int):
        self.batch, self.n = sampler.batch(10_000), n

    def iter_eval(self, max_batches=None):
        from moe_py.data import Batch
        b = self.batch
        yield Batch(b.inputs[:self.n], b.targets[:self.n], b.mask[:self.n], b.labels[:self.n])
