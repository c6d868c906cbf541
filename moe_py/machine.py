"""What this moe_py was built with and runs on: paste `python -m moe_py info` into a bug report.

Also warns, once per process, when the linked OpenBLAS runs generic (pre-AVX2) kernels on a CPU
that has AVX2 or AVX-512: every GEMM is then several times slower than the machine allows.
"""
from __future__ import annotations

import platform
import re
import warnings
from typing import Any, Dict, List, Optional

from . import _kernels

# OpenBLAS core types that use no AVX2/FMA kernels. Debian bookworm's OpenBLAS 0.3.21 reports
# "Prescott" (SSE3) on CPUs newer than it knows.
_PRE_AVX2_CORES = {
    "katmai", "coppermine", "northwood", "prescott", "banias", "core2", "penryn", "dunnington",
    "nehalem", "atom", "sandybridge", "athlon", "opteron", "opteron_sse3", "barcelona",
    "bobcat", "bulldozer", "piledriver", "steamroller", "excavator", "generic",
}
# CPU flags worth naming in a report (from /proc/cpuinfo), in this order.
_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_bf16",
               "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve")


def _cpuinfo() -> Dict[str, str]:
    """First processor's fields of /proc/cpuinfo (empty off Linux)."""
    out: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def cpu_simd_flags() -> List[str]:
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    return [f for f in _SIMD_FLAGS if f in flags]


def rss_mib() -> Optional[float]:
    """This process's resident memory in MiB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def available_bytes() -> Optional[int]:
    """Memory the kernel says is available to new allocations (MemAvailable; Linux, else None)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_model() -> str:
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def blas_is_generic(corename: str, simd: List[str]) -> bool:
    """True when OpenBLAS picked a pre-AVX2 kernel set on a CPU that has AVX2 or AVX-512."""
    return corename.strip().lower() in _PRE_AVX2_CORES and ("avx2" in simd or "avx512f" in simd)


def bf16_path() -> str:
    """Which bfloat16 GEMM kernel compute_dtype="bfloat16" runs on (moe_py/bf16.py), and why."""
    has = [f for f in ("avx512_bf16", "amx_bf16") if f in cpu_simd_flags()]
    cpu = f"the CPU has {' and '.join(has)}" if has else "the CPU has no bfloat16 instructions"
    kernel = _kernels.bf16_kernel()
    failed = [k for k in ("amx", "avx512_bf16")
              if _kernels.bf16_kernel_available(k) and not _kernels.bf16_self_check(k)]
    note = "".join(f"; the {k} kernel FAILED its self-check against float64 here" for k in failed)
    if kernel == "amx":
        return f"amx: TDPBF16PS on AMX tiles ({cpu})"
    if kernel == "avx512_bf16":
        amx = "AMX not usable here" if not _kernels.bf16_kernel_available("amx") else "AMX not chosen"
        return f"avx512_bf16: VDPBF16PS micro-kernel ({cpu}; {amx}{note})"
    emulates = {"emulated": "avx512_bf16", "amx_emulated": "amx"}
    if kernel in emulates:
        return (f"{kernel}: the {emulates[kernel]} kernel's code with its bfloat16 instruction emulated "
                f"by float32 FMAs, for testing; slower than float32 ({cpu})")
    why = cpu + note
    paying = [k for k in ("amx", "avx512_bf16") if _kernels.bf16_kernel_available(k) and _kernels.bf16_kernel_pays(k)]
    if paying and not failed:
        why = "set by MOE_PY_BF16_KERNEL or moe_py.bf16.set_kernel"
    elif _kernels.bf16_kernel_available("avx512_bf16") and not paying:
        why = (f"{cpu}, but VDPBF16PS runs slower than float32 FMAs on this Intel CPU; "
               "MOE_PY_BF16_KERNEL=avx512_bf16 picks it anyway")
    return f"fallback: bfloat16-rounded operands in float32 FMA GEMMs, slower than float32 ({why})"


def build_info() -> Dict[str, Any]:
    """Version, compiler and flags, BLAS (name, version, core type), threads, CPU and SIMD."""
    from . import __version__
    import numpy as np
    facts = _kernels.build_facts()
    flags = facts["cxx_flags"]
    march = re.findall(r"-march=\S+", flags)
    version = re.search(r"OpenBLAS\s+(\S+)", facts["blas_config"])
    return {
        "moe_py": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "compiler": facts["compiler"],
        "cxx_flags": " ".join(flags.split()),
        "march": march[-1][len("-march="):] if march else "(none: generic x86-64)",
        "compiled_simd": facts["compiled_simd"],
        "eigen": facts["eigen"],
        "eigen_simd": facts["eigen_simd"],
        "openmp": facts["openmp"],
        "openmp_threads": _kernels.get_num_threads(),
        "blas": facts["blas"],
        "blas_version": version.group(1) if version else "unknown",
        "blas_config": facts["blas_config"],
        "blas_corename": facts["blas_corename"],
        # the micro-kernel of the expert, attention and linear GEMMs (cpp/small_gemm.h);
        # "blas" when the build targets neither AVX2 nor AVX-512
        "gemm_kernel": facts["gemm_kernel"],
        "block_cache": facts["block_cache"],
        # what MoEConfig(compute_dtype="bfloat16") runs on (moe_py/bf16.py)
        "bf16_gemm": bf16_path(),
        "cpu": cpu_model(),
        "cpu_simd": " ".join(cpu_simd_flags()),
        "platform": platform.platform(),
    }


def format_build_info(info: Dict[str, Any]) -> str:
    width = max(len(k) for k in info)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())


_warned = [False]


def warn_if_blas_generic() -> None:
    """Warn (once per process) if the BLAS kernels are far below what the CPU can run."""
    if _warned[0]:
        return
    _warned[0] = True
    core = _kernels.build_facts()["blas_corename"]
    simd = cpu_simd_flags()
    if blas_is_generic(core, simd):
        warnings.warn(
            f"moe_py: the linked OpenBLAS uses '{core}' kernels on a CPU with "
            f"{'AVX-512' if 'avx512f' in simd else 'AVX2'}: GEMMs run several times slower than "
            "this machine allows. Build against PyPI's scipy-openblas32 (the default), or set "
            "OPENBLAS_CORETYPE; `python -m moe_py info` shows the details.",
            RuntimeWarning, stacklevel=3)
