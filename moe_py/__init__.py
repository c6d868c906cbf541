"""moe_py: a Mixture-of-Experts laboratory for the CPU."""
from .machine import build_info, warn_if_blas_generic
from .config import MoEConfig
from .layer import MoELayer, MoEOutput
from .router import Router, RouterOutput
from .routed_experts import RoutedExperts
from .checkpoint import load, save
from .threads import get_num_threads, set_num_threads

__all__ = ["build_info", "MoEConfig", "MoELayer", "MoEOutput", "RoutedExperts", "Router", "RouterOutput",
           "get_num_threads", "set_num_threads", "save", "load"]
__version__ = "0.1.0"

warn_if_blas_generic()
