"""Zero-shot classification: prompt templates, the prompt-ensemble classifier,
classification by description and PerceptionCLIP."""

from .classifier import (ImagePredictions, ZeroShotClassifier, check_classnames, class_weights, classify_images,
                         prompt_collisions, read_labels, softmax, top_k)
from .descriptions import DescriptionClassifier
from .perception import PerceptionCLIP
from .templates import get_templates, list_template_sets

__all__ = ["ZeroShotClassifier", "DescriptionClassifier", "PerceptionCLIP", "class_weights", "check_classnames",
           "prompt_collisions", "read_labels", "get_templates", "list_template_sets", "softmax", "top_k",
           "classify_images", "ImagePredictions"]
