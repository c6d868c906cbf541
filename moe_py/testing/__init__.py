"""What users need to pin their own MoE experiments with pytest (our own suite uses it too):

- gradcheck(layer_or_fn, inputs): float64 central differences over x and every parameter,
  skipping (and counting) entries whose perturbation flips a routing choice;
- assert_matches_reference(layer, x, mask): the layer against a slow, obvious NumPy float64
  implementation (moe_py.testing.reference) in every output, gradient and RouterOutput field;
- save_golden(path, layer, inputs) / assert_matches_golden(path): regression files with the
  config, weights, inputs, outputs, gradients and the machine that wrote them; the pytest
  fixture `moe_golden` and the option --moe-update-golden come with the package;
- assert_thread_invariant(fn): bitwise the same results at 1, 2 and 3 OpenMP threads.
"""
from .golden import assert_matches_golden, save_golden
from .gradcheck import GradcheckReport, gradcheck
from .reference import BF16_REL_FRO, TOLERANCES, assert_matches_reference, reference_forward_backward
from .threads import assert_thread_invariant

__all__ = ["gradcheck", "GradcheckReport", "assert_matches_reference", "reference_forward_backward",
           "TOLERANCES", "BF16_REL_FRO", "save_golden", "assert_matches_golden", "assert_thread_invariant"]
