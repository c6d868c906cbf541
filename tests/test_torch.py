"""moe_py.torch.MoE, the nn.Module over the C++ layer (skipped when torch is not installed)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_py  # noqa: E402
from moe_py.torch import MoE  # noqa: E402


def module(**kw):
    cfg = moe_py.MoEConfig(**{"d_model": 6, "d_ff": 8, "num_experts": 4, "top_k": 2,
                              "dtype": "float64", "seed": 1, "load_balance_coef": 0.1,
                              "z_loss_coef": 0.01, "entropy_coef": 0.05, **kw})
    m = MoE(cfg)
    with torch.no_grad():  # a decisive router: no top-k tie within the finite-difference step
        if cfg.router != "hash":
            m.w_router.mul_(60.0)
    return m


def plain_torch(m, x, mask):
    """The same maths in plain torch float64: every expert on every token, a one-hot combine."""
    cfg = m.cfg
    T = x.reshape(-1, cfg.d_model)
    real = torch.ones(T.shape[0], dtype=torch.bool) if mask is None else torch.as_tensor(mask).reshape(-1)
    logits = T @ m.w_router
    probs = torch.softmax(logits, -1) * real[:, None]
    top_p, top_i = torch.topk(probs, cfg.top_k, dim=-1)
    w = torch.where(real[:, None], top_p / top_p.sum(-1, keepdim=True).clamp_min(1e-300), 0.0)
    y = torch.zeros_like(T)
    params = dict(m.named_parameters())

    def lin(v, name, e):  # with the expert's bias when the module has one
        b = "b" + name[1]
        return v @ params[name][e] + (params[b][e] if b in params else 0)
    for e in range(cfg.num_experts):
        coef = ((top_i == e) * w).sum(-1)
        if cfg.combine == "input":  # the weight scales the expert's input
            xin, out_scale = coef[:, None] * T, (top_i == e).any(-1).double()
        else:
            xin, out_scale = T, coef
        h = torch.nn.functional.silu(lin(xin, "w1", e)) * lin(xin, "w3", e)
        y = y + out_scale[:, None] * lin(h, "w2", e)
    y = y * real[:, None]
    R = real.sum()
    f = torch.bincount(top_i[real].reshape(-1), minlength=cfg.num_experts).double() / (R * cfg.top_k)
    P = probs[real].mean(0)
    lb = cfg.num_experts * (f * P).sum()
    z = (torch.logsumexp(logits[real], -1) ** 2).mean()
    pr = probs[real]
    ent = -torch.special.xlogy(pr, pr).sum(-1).mean()
    aux = cfg.load_balance_coef * lb + cfg.z_loss_coef * z + cfg.entropy_coef * ent
    return y.reshape(x.shape), aux


@pytest.mark.parametrize("kw", [{}, {"ffn_bias": True}, {"combine": "input", "ffn_bias": True}])
def test_matches_plain_torch_in_output_and_every_gradient(kw):
    m = module(**kw)
    rng = np.random.default_rng(0)
    with torch.no_grad():  # biases (when there are) away from their init of 0
        for n, p in m.named_parameters():
            if n.startswith("b"):
                p.copy_(torch.tensor(rng.standard_normal(p.shape)))
    assert {n for n, _ in m.named_parameters()} == set(m.layer.params)
    x = torch.tensor(rng.standard_normal((2, 5, 6)), requires_grad=True)
    mask = torch.tensor(rng.random((2, 5)) > 0.3)
    dy = torch.tensor(rng.standard_normal((2, 5, 6)))
    y, aux, router = m(x, padding_mask=mask)
    ((y * dy).sum() + aux).backward()
    got = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters()}}
    x.grad = None
    for p in m.parameters():
        p.grad = None
    y2, aux2 = plain_torch(m, x, mask)
    ((y2 * dy).sum() + aux2).backward()
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, aux2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["x"], x.grad, rtol=1e-9, atol=1e-11)
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-11, msg=n)
    assert router.topk_indices.shape == (10, 2)


def test_torch_gradcheck_float64_with_aux_losses():
    m = module(d_model=4, d_ff=3, num_experts=3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = list(m.parameters())

    def f(x, *ps):  # gradcheck perturbs the module's own parameters in place
        y, aux, _ = m(x)
        return y, aux
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(router="sigmoid_topk", routed_scaling_factor=1.5),
                                dict(router="expert_choice"), dict(router="sinkhorn"),
                                dict(router="hash", num_shared_experts=1),
                                dict(num_shared_experts=2, load_balance_scope="sequence"),
                                # the transformers families' variants (docs/design.md, "Routers
                                # beyond softmax top-k"), as the tournament's entries set them
                                dict(normalize_topk=False),
                                dict(router_bias=True),
                                dict(num_experts=4, n_group=2, topk_group=1, group_score="max"),
                                dict(topk_norm_min=1e-12, bias_update_rate=1e-3),
                                dict(router="sqrtsoftplus_topk", router_bias=True),
                                dict(router="sigmoid_topk", top_k=1, normalize_topk=False, combine="input"),
                                dict(router_bias=True, activation="clamped_swiglu", swiglu_limit=0.5,
                                     ffn_bias=True)])
def test_torch_gradcheck_float64_every_router(kw):
    m = module(**{"d_model": 4, "d_ff": 3, "num_experts": 3, **kw})
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.arange(10).reshape(2, 5) % 4
    params = list(m.parameters())

    def f(x, *ps):
        y, aux, _ = m(x, token_ids=ids)
        return y, aux
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)
    if m.cfg.router == "sigmoid_topk":
        m.update_expert_bias()
        assert m.layer.router.expert_bias.any()


def test_two_calls_before_one_backward_accumulate_both():
    m = module()
    x1, x2 = (torch.randn(7, 6, dtype=torch.float64) for _ in range(2))
    y1, a1, _ = m(x1)
    y2, a2, _ = m(x2)
    (y1.sum() + a1 + 2 * y2.sum() + a2).backward()
    both = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    y1, a1, _ = m(x1)
    (y1.sum() + a1).backward()
    y2, a2, _ = m(x2)
    (2 * y2.sum() + a2).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, both[n], rtol=1e-12, atol=1e-13)


def test_optimiser_updates_are_seen_and_state_dict_round_trips():
    m = module(dtype="float32")
    x = torch.randn(9, 6)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = m.layer.params["w2"].copy()
    y, aux, _ = m(x)
    (y.pow(2).mean() + aux).backward()
    opt.step()
    assert not np.array_equal(m.layer.params["w2"], before)  # the C++ layer sees the update
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    other = module(dtype="float32", seed=7)
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x)[0], m(x)[0], rtol=0, atol=0)


def test_layouts_modes_and_errors():
    m = module()
    base = torch.randn(6, 4, dtype=torch.float64)
    x = base.t()  # non-contiguous [4, 6]
    y, _, _ = m(x)
    torch.testing.assert_close(y, m(x.contiguous())[0])
    with torch.no_grad():
        assert not m(x)[0].requires_grad
    m.eval()
    y_eval, _, _ = m(x)
    m.train()
    assert y_eval.shape == (4, 6)
    with pytest.raises(TypeError, match="x: expected dtype float64"):
        m(torch.randn(3, 6, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 6\]"):
        m(torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        m(np.zeros((3, 6)))


def test_a_tiny_torch_model_with_the_module_learns():
    torch.manual_seed(0)
    moe = MoE(moe_py.MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, seed=0))
    emb = torch.nn.Embedding(32, 16)
    head = torch.nn.Linear(16, 32)
    params = list(moe.parameters()) + list(emb.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    ids = torch.randint(0, 32, (8, 12))
    targets = (ids * 7 + 3) % 32  # a fixed map the model can learn
    losses = []
    for _ in range(60):
        h = emb(ids)
        y, aux, _ = moe(h)
        logits = head(h + y)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), targets.reshape(-1))
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_moe_py_thread_count_is_not_changed_by_torch():
    moe_py.set_num_threads(1)
    torch.set_num_threads(2)
    assert moe_py.get_num_threads() == 1
    moe_py.set_num_threads(2)
    assert moe_py.get_num_threads() == 2


def test_moe_py_testing_gradcheck_takes_the_module():
    from moe_py.testing import gradcheck
    m = module()
    x = np.random.default_rng(0).standard_normal((2, 5, 6))
    report = gradcheck(m, {"x": x, "padding_mask": np.arange(10).reshape(2, 5) % 3 != 0})
    assert report.checked > 0 and report.worst_rel_error < 1e-6


def test_an_in_place_change_of_the_input_after_forward_leaves_the_gradient_right():
    cfg = moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, dtype="float64")
    base = torch.randn(2, 8, 16, dtype=torch.float64)
    grads = []
    for change in (False, True):
        moe = MoE(cfg)
        leaf = base.clone().requires_grad_()
        h = leaf * 1.0  # a non-leaf activation a caller may reuse in place
        y, aux, _ = moe(h)
        if change:
            h.detach().mul_(10)
        (y.pow(2).sum() + aux).backward()
        grads.append((leaf.grad.clone(), moe.w_router.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_double_backward_raises_instead_of_returning_no_graph():
    moe = MoE(moe_py.MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, dtype="float64"))
    x = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    y, aux, _ = moe(x)
    g, = torch.autograd.grad(y.pow(2).sum() + aux, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()
