"""Numeric kernels and box operations shared by the method packages.

- :func:`soft_nms` (:mod:`.nms`): Soft-NMS, linear and Gaussian, and hard NMS as its limit.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".nms": ["soft_nms", "soft_nms_loop"],
})
