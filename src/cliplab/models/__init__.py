"""Model loading, the Backbone, and checkpoint conversion."""

from .backbone import Backbone, EncodedImages, Skipped
from .loading import SOURCES, build_model, list_sources, load

__all__ = ["Backbone", "EncodedImages", "Skipped", "SOURCES", "build_model", "list_sources", "load"]
