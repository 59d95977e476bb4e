"""Numerical experiments that check a theory paper's claim (no CLIP weights needed).

The names below are imported on first use (:mod:`cliplab.lazy`).
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".icl": ["ICLWeightShiftResult", "attention_context_shift", "compare_icl_gd", "gd_step", "run_icl_experiment",
             "softmax_regression_grad", "softmax_regression_loss"],
})
