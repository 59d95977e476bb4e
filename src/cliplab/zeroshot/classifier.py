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

from ..data.text import read_lines, read_text
from ..errors import DataError, DuplicateClassError, UsageError
from .templates import fill, get_templates

__all__ = ["ZeroShotClassifier", "class_weights", "check_classnames", "prompt_collisions"]


def prompt_collisions(backbone, classnames: Sequence[str], templates: Sequence[str]) -> list[list[int]]:
    """Groups of classes whose prompts tokenize identically under every template.

    Such classes get identical class weights: the CLIP tokenizer lower-cases and
    collapses whitespace, so ``"Red star"`` and ``"red  star"`` are one prompt, and a
    prompt cut at the context length can lose the class name altogether.

    Parameters
    ----------
    backbone : Backbone
        Its ``tokenize`` decides; without one, names are compared as strings.
    classnames : sequence of str (C,)
    templates : sequence of str (T,)
        ``{c}`` templates.

    Returns
    -------
    list of list of int
        Indices into ``classnames``, one sorted list per group of two or more.
    """
    tokenize = getattr(backbone, "tokenize", None)
    groups = [list(range(len(classnames)))]
    for t in templates:                    # only classes still colliding are tokenized again
        idx = [i for g in groups for i in g]
        if not idx:
            break
        prompts = [fill(t, classnames[i]) for i in idx]
        rows = ([bytes(r) for r in tokenize(prompts).cpu().numpy()] if tokenize is not None
                else prompts)              # (len(idx),) one key per prompt
        key = dict(zip(idx, rows))
        regrouped = []
        for g in groups:
            same: dict = {}
            for i in g:
                same.setdefault(key[i], []).append(i)
            regrouped += [v for v in same.values() if len(v) > 1]
        groups = regrouped
    return groups


def check_classnames(backbone, classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Validated class names (stripped): non-empty, distinct, and distinct once tokenized.

    Raises
    ------
    UsageError
        ``classnames`` is one string, empty, or holds an empty name.
    DuplicateClassError
        Two names are equal, or their prompts tokenize identically under every template
        (see :func:`prompt_collisions`).
    """
    if isinstance(classnames, str):
        raise UsageError("classnames must be a list of names, not one string")
    names = [str(c).strip() for c in classnames]
    if not names:
        raise UsageError("the label list is empty; give at least one class")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise UsageError(f"the label list has an empty name at position {empty[0] + 1} of {len(names)}; "
                         "remove it or give the class a name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DuplicateClassError([[n] * names.count(n) for n in dup],
                                  f"duplicate class names: {', '.join(map(repr, dup))}; keep one of each")
    groups = [[names[i] for i in g] for g in prompt_collisions(backbone, names, templates)]
    if groups:
        shown = "; ".join(" = ".join(map(repr, g)) for g in groups[:5])
        more = f" (and {len(groups) - 5} more groups)" if len(groups) > 5 else ""
        raise DuplicateClassError(groups, f"classes {shown}{more} give the same prompts once tokenized "
                                          "(CLIP's tokenizer ignores case and repeated spaces), so they "
                                          "cannot be told apart; keep one name per class")
    return names


def class_weights(backbone, classnames: Sequence[str], templates: Sequence[str], *,
                  progress: bool | None = None) -> np.ndarray:
    """Prompt-ensemble class embeddings: float32 (C, D), L2-normalised rows.

    Raises :class:`~cliplab.errors.DuplicateClassError` (and UsageError) as
    :func:`check_classnames`.
    """
    return _ensemble(backbone, check_classnames(backbone, classnames, templates), templates, progress)


def _ensemble(backbone, classnames: list[str], templates: Sequence[str], progress) -> np.ndarray:
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
        Non-empty, no duplicates, and no two whose prompts tokenize identically
        (``"Red star"`` and ``"red star"`` are one prompt to CLIP's tokenizer).
    templates : str or list of str, default="default"
        A template set name (``default``, ``openai-7``, ``openai-80``), a file,
        a single template or a list; ``{c}`` marks the class name.

    Raises
    ------
    UsageError
        An empty label list or name, or a bad template spec.
    DuplicateClassError
        Names that are equal, or equal once tokenized (see :func:`check_classnames`).

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
        self.templates_ = get_templates(templates)
        names = check_classnames(backbone, classnames, self.templates_)
        self.backbone = backbone
        self.classes_ = np.array(names)
        self.weights_ = _ensemble(backbone, names, self.templates_, progress)

    def _features(self, images, **kwargs) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 2:
            return images  # already image features (N, D)
        if kwargs.get("on_error", "raise") != "raise":
            raise UsageError("to skip bad images, call backbone.encode_images(..., on_error='skip') "
                             "and pass the features")
        return self.backbone.encode_images(images, **kwargs).features

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

    Text files are read by :func:`cliplab.data.text.read_lines`: a UTF-8 byte-order
    mark, ``\\r\\n`` / ``\\r`` line ends, blank lines, ``#`` comment lines and the
    whitespace around each name are dropped.

    Raises
    ------
    DataError
        A missing, unreadable, non-UTF-8 or malformed file.
    """
    import json

    p = Path(path)
    if p.suffix.lower() != ".json":
        return read_lines(p, what="labels file")
    text = read_text(p, what="labels file")
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
    return [x.strip() for x in data]
