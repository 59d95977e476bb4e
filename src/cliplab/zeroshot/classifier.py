"""Zero-shot classification with prompt ensembles.

Class weights follow the CLIP paper (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021, arXiv:2103.00020, Sec. 3.1.4):

    w_c = normalise( mean_t normalise( f_text(template_t(c)) ) )        (ensemble)
    p(c | x) = softmax_c( s * <f_image(x), w_c> )                        (s = logit_scale)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.text import read_lines, read_text
from ..errors import DataError, DuplicateClassError, UsageError
from ..validation import check_choice, check_positive_int
from .templates import fill, get_templates

logger = logging.getLogger(__name__)

__all__ = ["ZeroShotClassifier", "class_weights", "check_classnames", "prompt_collisions", "softmax", "top_k",
           "classify_images", "ImagePredictions"]


def softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax of logits (N, C), computed stably (the maximum of each row subtracted)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(proba: np.ndarray, classes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes per row: (labels (N, k), probabilities (N, k)).

    Ties keep the class order (stable sort); ``k`` is capped at the number of classes.

    Raises
    ------
    UsageError
        ``k < 1``.
    """
    k = check_positive_int("k", k)
    k = min(k, proba.shape[1])
    idx = np.argsort(-proba, axis=1, kind="stable")[:, :k]                   # (N, k)
    return np.asarray(classes)[idx], np.take_along_axis(proba, idx, axis=1)


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


def class_weights(backbone, classnames: Sequence[str], templates: Sequence[str], *, store=None,
                  ties: str = "raise", progress: bool | None = None) -> np.ndarray:
    """Prompt-ensemble class embeddings: float32 (C, D), L2-normalised rows.

    Parameters
    ----------
    backbone : Backbone
        Encodes the prompts (``encode_texts``) and tokenizes them for the tie check.
    classnames : sequence of str (C,)
    templates : sequence of str (T,)
        ``{c}`` templates; the C*T prompt features are averaged per class.
    store : FeatureStore, optional
        Take the prompt features from (and add them to) its cache instead.
    ties : {"raise", "warn"}, default "raise"
        Classes whose prompts tokenize identically: ``"raise"`` checks the names with
        :func:`check_classnames` (stripped, non-empty, distinct); ``"warn"`` uses the names
        as given and logs the tied groups (a benchmark still runs, as CLIP_benchmark does).

    Raises
    ------
    DuplicateClassError, UsageError
        With ``ties="raise"``, as :func:`check_classnames`.
    """
    if check_choice("ties", ties, ("raise", "warn")) == "raise":
        names = check_classnames(backbone, classnames, templates)
    else:
        names = list(classnames)
        groups = prompt_collisions(backbone, names, templates)
        if groups:
            logger.warning("classes %s give the same prompts once tokenized; zero-shot cannot tell them apart",
                           "; ".join(" = ".join(repr(names[i]) for i in g) for g in groups[:5]))
    prompts = [fill(t, c) for c in names for t in templates]
    if store is not None:
        emb = np.asarray(store.text_features(prompts), np.float32)         # (C*T, D)
    else:
        emb = backbone.encode_texts(prompts, progress=progress)             # (C*T, D)
    emb = emb.reshape(len(names), len(templates), -1).mean(axis=1)          # (C, D)
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


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
        self.weights_ = class_weights(backbone, classnames, self.templates_, progress=progress)   # checks the names
        self.backbone = backbone
        self.classes_ = np.array([str(c).strip() for c in classnames])

    @property
    def image_encoder(self):
        """The Backbone whose image features :meth:`predict_proba` takes (the prediction protocol)."""
        return self.backbone

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
        return softmax(self.decision_function(images, **kwargs))

    def predict_proba_features(self, features: np.ndarray) -> np.ndarray:
        """Probabilities (N, C) from features (N, D) of :attr:`image_encoder` (the prediction protocol)."""
        return self.predict_proba(np.asarray(features, dtype=np.float32))

    def predict(self, images, **kwargs) -> np.ndarray:
        return self.classes_[self.decision_function(images, **kwargs).argmax(axis=1)]

    def topk(self, images, k: int = 5, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """The k most probable classes per image: (labels (N, k), probabilities (N, k))."""
        check_positive_int("k", k)
        return top_k(self.predict_proba(images, **kwargs), self.classes_, k)


@dataclass
class ImagePredictions:
    """What :func:`classify_images` returns.

    Attributes
    ----------
    items : list
        The images that were read, in input order (M,).
    labels : ndarray (M, k)
        The k most probable classes of each, most probable first.
    probs : ndarray float (M, k)
        Their probabilities.
    skipped : list
        The unreadable images (the Backbone's skip records); empty with ``strict``.
    """

    items: list
    labels: np.ndarray
    probs: np.ndarray
    skipped: list = field(default_factory=list)


def classify_images(classifier, images, *, classnames=None, k: int = 1, strict: bool = False,
                    **encode_kwargs) -> ImagePredictions:
    """Classify images (files, arrays, PIL images) with any cliplab classifier.

    The prediction protocol every classifier follows — :class:`ZeroShotClassifier`, the
    feature adapters and the learners of :mod:`cliplab.adapt` — is two members:
    ``image_encoder`` (the Backbone whose ``encode_images`` gives the features it scores:
    the model a zero-shot classifier or an adapter was built on, a fine-tuner's adapted
    model) and ``predict_proba_features(F)`` -> (N, C).

    Parameters
    ----------
    classifier : object with ``image_encoder`` and ``predict_proba_features``
    images : sequence
    classnames : sequence of str, optional
        Name of each class column; default ``classifier.classes_``.
    k : int, default 1
        Classes reported per image.
    strict : bool, default False
        Raise on the first unreadable image instead of skipping it.
    **encode_kwargs
        Passed to ``encode_images`` (``batch_size``, ``num_workers``...).

    Raises
    ------
    UsageError
        ``k < 1``, or a classifier without an image encoder (an adapter that was not
        loaded with :func:`cliplab.adapt.fewshot.load_fitted` and has no ``image_encoder`` set).
    DataError
        Every image is unreadable.
    """
    k = check_positive_int("k", k)
    encoder = classifier.image_encoder
    if encoder is None:
        raise UsageError(f"{type(classifier).__name__} has no image encoder; set est.image_encoder to the "
                         "Backbone whose features it was fit on")
    images = list(images)
    enc = encoder.encode_images(images, on_error="raise" if strict else "skip", **encode_kwargs)
    feats, skipped = enc.features, enc.skipped
    if images and len(skipped) == len(images):
        raise DataError(f"none of the {len(images)} images could be read (first: {skipped[0].source}: "
                        f"{skipped[0].reason})")
    kept = [images[i] for i in enc.kept]
    names = classifier.classes_ if classnames is None else classnames
    labels, probs = top_k(classifier.predict_proba_features(feats), names, k)
    return ImagePredictions(kept, labels, probs, list(skipped))


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
