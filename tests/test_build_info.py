"""build_info(), `python -m moe_py info`, the BLAS we link and the generic-kernel warning."""
import os
import re
import subprocess
import sys
import warnings

import pytest

import moe_py
from moe_py import _core, machine as bi


def test_build_info_names_compiler_blas_threads_and_cpu():
    info = moe_py.build_info()
    for key in ("moe_py", "compiler", "cxx_flags", "march", "blas", "blas_version", "blas_corename",
                "openmp_threads", "cpu", "cpu_simd", "compiled_simd"):
        assert info[key] not in (None, ""), key
    assert info["moe_py"] == moe_py.__version__
    assert info["openmp_threads"] == moe_py.get_num_threads()
    assert "-ffp-contract=off" in info["cxx_flags"]
    assert re.match(r"\d+\.\d+\.\d+", info["blas_version"])
    # the micro-kernel matches what the build was compiled for
    simd = info["compiled_simd"].split()
    assert info["gemm_kernel"] == ("avx512" if "avx512f" in simd else
                                   "avx2" if "avx2" in simd and "fma" in simd else "blas")


def test_default_build_links_pypi_openblas_found_beside_us():
    """The default build uses scipy-openblas32 through an rpath relative to the extension."""
    if os.environ.get("MOE_BLAS", "scipy-openblas32") != "scipy-openblas32":
        pytest.skip("built with MOE_BLAS=system")
    assert moe_py.build_info()["blas"] == "scipy-openblas32"
    out = subprocess.run(["readelf", "-d", _core.__file__], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("readelf not available")
    assert "$ORIGIN/../scipy_openblas32/lib" in out.stdout
    assert "libscipy_openblas.so" in out.stdout


@pytest.mark.parametrize("core,simd,generic", [
    ("Prescott", ["avx", "avx2", "fma"], True),
    ("Katmai", ["avx2", "avx512f"], True),
    ("Sandybridge", ["avx", "avx2"], True),
    ("Prescott", ["sse4_2"], False),      # an old CPU: nothing better to run
    ("SkylakeX", ["avx2", "avx512f"], False),
    ("Haswell", ["avx2", "fma"], False),
    ("Zen", ["avx2", "fma"], False),
])
def test_generic_core_known_answers(core, simd, generic):
    assert bi.blas_is_generic(core, simd) is generic


def test_warns_once_when_blas_is_generic(monkeypatch):
    monkeypatch.setattr(bi._kernels, "build_facts", lambda: {"blas_corename": "Prescott"})
    monkeypatch.setattr(bi, "cpu_simd_flags", lambda: ["avx2", "avx512f"])
    monkeypatch.setattr(bi, "_warned", [False])
    with pytest.warns(RuntimeWarning, match="Prescott.*AVX-512"):
        bi.warn_if_blas_generic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bi.warn_if_blas_generic()  # once per process


def test_info_command_prints_every_field():
    out = subprocess.run([sys.executable, "-m", "moe_py", "info"], capture_output=True, text=True,
                         check=True).stdout
    for key in moe_py.build_info():
        assert re.search(rf"^{key}\s", out, re.M), key


def test_fma_peak_counts_its_flops():
    flops, checksum = _core.fma_peak(iters=1000)
    lanes_times_acc = flops / (2 * 1000 * moe_py.get_num_threads())
    assert lanes_times_acc in (16 * 4, 16 * 8, 16 * 16)  # 16 accumulators of SSE/AVX/AVX-512
    assert checksum > 0
    with pytest.raises(ValueError, match="iters"):
        _core.fma_peak(iters=0)
