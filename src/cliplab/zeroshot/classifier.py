"""Zero-shot classification with prompt ensembles.

Class weights follow the CLIP paper (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021, arXiv:2103.00020, Sec. 3.1.4):

    w_c = normalise( mean_t normalise( f_text(template_t(c)) ) )        (ensemble)
    p(c | x) = softmax_c( s * <f_image(x), w_c> )                        (s = logit_scale)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, UsageError
from .templates import fill, get_templates

__all__ = ["ZeroShotClassifier", "class_weights"]


def class_weights(backbone, classnames: Sequence[str], templates: Sequence[str], *,
                  progress: bool | None = None) -> np.ndarray:
    """Prompt-ensemble class embeddings: float32 (C, D), L2-normalised rows."""
    prompts = [fill(t, c) for c in classnames for t in templates]
    emb = backbone.encode_texts(prompts, progress=progress)                 # (C*T, D)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)     # (C, D)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ZeroShotClassifier:
    """Classify images into free-text classes with a Backbone.

    The class weights are computed once, at construction.

    Parameters
    ----------
    backbone : Backbone
    classnames : sequence of str
        Non-empty, no duplicates.
    templates : str or list of str, default="default"
        A template set name (``default``, ``openai-7``, ``openai-80``), a file,
        a single template or a list; ``{c}`` marks the class name.

    Attributes
    ----------
    classes_ : ndarray of str, shape (C,)
    weights_ : ndarray of float32, shape (C, D)
    templates_ : list of str

    Examples
    --------
    >>> clf = ZeroShotClassifier(cliplab.load("shapes-tiny"), ["red star", "blue circle"])  # doctest: +SKIP
    >>> clf.predict(["img.png"])                                                           # doctest: +SKIP
    array(['red star'], dtype='<U11')
    """

    def __init__(self, backbone, classnames: Sequence[str], templates="default", *,
                 progress: bool | None = None):
        if isinstance(classnames, str):
            raise UsageError("classnames must be a list of names, not one string")
        names = [str(c).strip() for c in classnames]
        if not names or any(not n for n in names):
            raise UsageError("the label list is empty or contains an empty name; give at least one class")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UsageError(f"duplicate class names: {', '.join(dup)}")
        self.backbone = backbone
        self.classes_ = np.array(names)
        self.templates_ = get_templates(templates)
        self.weights_ = class_weights(backbone, names, self.templates_, progress=progress)

    def _features(self, images, **kwargs) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 2:
            return images  # already image features (N, D)
        if kwargs.get("on_error", "raise") != "raise":
            raise UsageError("to skip bad images, call backbone.encode_images(..., on_error='skip') "
                             "and pass the features")
        return self.backbone.encode_images(images, **kwargs)

    def decision_function(self, images, **kwargs) -> np.ndarray:
        """Logits ``logit_scale * cosine``: (N, C).  ``images`` may be features (N, D)."""
        return self.backbone.logit_scale * self._features(images, **kwargs) @ self.weights_.T

    def predict_proba(self, images, **kwargs) -> np.ndarray:
        """Softmax of the logits over the classes: (N, C)."""
        return _softmax(self.decision_function(images, **kwargs))

    def predict(self, images, **kwargs) -> np.ndarray:
        return self.classes_[self.decision_function(images, **kwargs).argmax(axis=1)]

    def topk(self, images, k: int = 5, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """The k most probable classes per image: (labels (N, k), probabilities (N, k))."""
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        proba = self.predict_proba(images, **kwargs)
        k = min(k, proba.shape[1])
        idx = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return self.classes_[idx], np.take_along_axis(proba, idx, axis=1)


def read_labels(path: str | Path) -> list[str]:
    """Class names from a file: one per line, or a JSON list / {index: name} mapping.

    Raises :class:`~cliplab.errors.DataError` for an unreadable or malformed file.
    """
    import json

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read labels file {p}: {getattr(e, 'strerror', None) or e}") from e
    if p.suffix != ".json":
        return [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DataError(f"{p} is not valid JSON: {e}") from e
    if isinstance(data, dict):
        try:
            data = [data[k] for k in sorted(data, key=int)]
        except ValueError:
            raise DataError(f"{p}: a JSON object of labels needs integer keys (\"0\": \"cat\", ...)") from None
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise DataError(f"{p}: expected a JSON list of class names or an {{index: name}} object")
    return data
