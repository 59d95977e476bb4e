"""Zero-shot classification: prompt templates and the prompt-ensemble classifier."""

from .classifier import ZeroShotClassifier, class_weights, read_labels
from .templates import get_templates, list_template_sets

__all__ = ["ZeroShotClassifier", "class_weights", "read_labels", "get_templates", "list_template_sets"]
