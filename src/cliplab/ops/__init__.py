"""Numeric kernels and box operations shared by the method packages.

- :func:`soft_nms` (:mod:`.nms`): Soft-NMS, linear and Gaussian, and hard NMS as its limit.
- :mod:`.softmax`: the two-pass softmax and the two three-pass variants as compiled float32
  row kernels (numba, extra ``kernels``): ``cliplab.ops.softmax.softmax`` and
  :func:`attention_softmax`.  The function ``softmax`` is not re-exported here: the module of
  the same name would shadow it once imported.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".nms": ["soft_nms", "soft_nms_loop"],
    ".softmax": ["attention_softmax"],
})
