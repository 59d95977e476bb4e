"""Model loading, the Backbone, checkpoint conversion and ONNX export.

The names below are imported on first use (:mod:`cliplab.lazy`), so that importing one
module of the package, or the model-source registry's metadata, does not import torch
through the Backbone.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".backbone": ["Backbone", "EncodedImages", "Skipped"],
    ".loading": ["SOURCES", "build_model", "list_sources", "load"],
    ".export": ["export_onnx", "quantize_export"],
    ".onnx_backbone": ["OnnxBackbone"],
})
