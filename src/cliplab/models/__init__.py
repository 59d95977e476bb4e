"""Model loading, the Backbone, and checkpoint conversion."""

from .backbone import Backbone, Skipped
from .loading import build_model, list_sources, load, register_source

__all__ = ["Backbone", "Skipped", "build_model", "list_sources", "load", "register_source"]
