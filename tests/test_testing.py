"""moe_py.testing catches what it is for: each helper against a planted bug."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import moe_py
from moe_py.router import Router, RouterOutput
from moe_py.testing import (assert_matches_golden, assert_matches_reference,
                            assert_thread_invariant, gradcheck, save_golden)


def layer64(**kw):
    return moe_py.MoELayer(moe_py.MoEConfig(**{"d_model": 6, "d_ff": 8, "num_experts": 4,
                                               "top_k": 2, "dtype": "float64", "seed": 1, **kw}))


def test_gradcheck_reports_and_catches_a_wrong_gradient(monkeypatch):
    layer = layer64(capacity_factor=0.9)
    x = np.random.default_rng(0).standard_normal((9, 6))
    report = gradcheck(layer, {"x": x})
    assert report.worst_rel_error < 1e-6 and report.checked > 0 and "skipped" in str(report)
    real_backward = moe_py.MoELayer.backward

    def planted(self, dy, aux_weight=1.0, out=None):
        dx = real_backward(self, dy, aux_weight, out)
        self.grads["w2"] *= 1.001  # a gradient 0.1 % off
        return dx
    monkeypatch.setattr(moe_py.MoELayer, "backward", planted)
    with pytest.raises(AssertionError, match=r"worst w2\["):
        gradcheck(layer, {"x": x})


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(moe_py.MoELayer(moe_py.MoEConfig(d_model=4, d_ff=4, num_experts=2, top_k=1)),
                  {"x": np.zeros((2, 4), np.float32)})


def test_reference_catches_a_changed_router(monkeypatch):
    layer = layer64()
    x = np.random.default_rng(0).standard_normal((2, 5, 6))
    assert_matches_reference(layer, x)
    real = Router.compute

    def planted(self, x2, mask, training, *rest):
        r = real(self, x2, mask, training, *rest)  # weights renormalised over the first choice only
        w = r.output.topk_weights
        w[:, 0] = 1.0
        return r._replace(output=RouterOutput(*r.output))
    monkeypatch.setattr(Router, "compute", planted)
    with pytest.raises(AssertionError, match="router.topk_weights"):
        assert_matches_reference(layer, x)


def stable_result():
    layer = moe_py.MoELayer(moe_py.MoEConfig(d_model=32, d_ff=48, num_experts=6, top_k=2, seed=0))
    x = np.random.default_rng(0).standard_normal((900, 32)).astype(np.float32)
    out = layer(x)
    return {"y": out.y, "dx": layer.backward(x), **layer.grads}


def thread_dependent_sum():
    """A reduction whose order follows the thread count: the bug the helper must catch."""
    v = np.random.default_rng(0).standard_normal(10_001) * 1e3
    parts = np.array_split(v, moe_py.get_num_threads())
    return np.array([sum(float(p.sum()) for p in parts)])


def test_thread_invariance_passes_real_kernels_and_catches_a_thread_dependent_sum():
    assert_thread_invariant(stable_result, threads=(1, 2, 3))
    with pytest.raises(AssertionError, match="differ between 1 and"):
        assert_thread_invariant(thread_dependent_sum, threads=(1, 2, 3))


def test_golden_files_round_trip_and_name_what_differs(tmp_path):
    layer = layer64(capacity_factor=1.0)
    x = np.random.default_rng(0).standard_normal((3, 5, 6))
    path = str(tmp_path / "g.npz")
    save_golden(path, layer, {"x": x, "padding_mask": np.arange(15).reshape(3, 5) % 4 != 0})
    assert_matches_golden(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param.w2"] = arrays["param.w2"] * 1.01  # the weights changed under the file
    np.savez(path, **arrays)
    with pytest.raises(AssertionError, match=r"differs in \d+ field\(s\), first: .*y"):
        assert_matches_golden(path)


def test_pytest_plugin_writes_then_checks_golden_files(tmp_path):
    test = tmp_path / "test_pinned.py"
    body = textwrap.dedent("""
        import numpy as np, moe_py
        def test_pinned(moe_golden):
            cfg = moe_py.MoEConfig(d_model=6, d_ff=8, num_experts=3, top_k=2, seed={seed})
            x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
            moe_golden("golden/layer.npz", moe_py.MoELayer(cfg), {{"x": x}})
    """)

    def pytest_run(seed, *args):
        test.write_text(body.format(seed=seed))
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(test), *args], cwd=tmp_path, capture_output=True, text=True)
    assert pytest_run(0).returncode == 0  # writes the file
    assert os.path.exists(tmp_path / "golden" / "layer.npz")
    assert pytest_run(0).returncode == 0  # compares
    r = pytest_run(1)
    assert r.returncode == 1 and "differs in" in r.stdout  # a changed layer fails
    assert pytest_run(1, "--moe-update-golden").returncode == 0  # rewritten on purpose
    assert pytest_run(1).returncode == 0
