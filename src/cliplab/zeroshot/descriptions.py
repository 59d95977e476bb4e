"""Classification by description, with a GRAIN-style global + best-descriptor score.

Menon & Vondrick, "Visual Classification via Description from Large Language Models",
ICLR 2023, arXiv:2210.07183 (reference code: ``sachit-menon/classify_by_description_release``,
``main.py``, ``load.py``).  Each class c has a list of descriptors D_c (short visual
features, e.g. "four equal sides"); each becomes one sentence "{c}, which has {d}." and

    s(c, x) = 1/|D_c| sum_{d in D_c} cos(x, phi("{c}, which has {d}."))      (Eq. 1)
    y_hat   = argmax_c s(c, x)

The logits are ``logit_scale * s``, so ``predict_proba`` is on the same scale as
:class:`~cliplab.zeroshot.ZeroShotClassifier`.

``mode="grain"`` reconstructs the inference-time scoring of GRAIN (Chakraborty et al.,
WACV 2026, arXiv:2412.04429, ``shaunak27/grain-clip`` ``our_eval.py``) for a plain CLIP:

    g(c, x) = cos(x, w_c)                      w_c: prompt-ensemble class weight
    r(c, x) = max_{d in D_c} cos(x, phi("{c}, which has {d}."))
    score   = a * g(c, x) + (1 - a) * r(c, x)  a = ``grain_weight``

Deviations
----------
- One fixed sentence template; the reference picks "which is / which has / which" from
  the descriptor's first word.
- GRAIN is a pre-training method; its region score takes the mean over Q learned region
  queries of the best descriptor match.  A plain CLIP has no region embeddings, so here
  the single global image embedding stands in for the regions (Q = 1) and the descriptor
  sentences include the class name (GRAIN's region side embeds the bare descriptor).
  This is a reconstruction of the scoring rule, not GRAIN's model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..data.text import read_text
from ..errors import DataError, UsageError
from ..validation import check_choice, check_number
from .classifier import ZeroShotClassifier

__all__ = ["DescriptionClassifier", "description_scores", "load_descriptors", "describe",
           "BUNDLED_DESCRIPTORS"]

BUNDLED_DESCRIPTORS = {"shapes": Path(__file__).with_name("descriptors_shapes.json")}
"""Descriptor files shipped with cliplab (ShapesWorld shapes and colours)."""

MODES = ("mean", "grain")


def load_descriptors(spec) -> dict[str, list[str]]:
    """Descriptors ``{class: [descriptor, ...]}`` from a dict, a JSON file or a bundled name.

    Raises :class:`~cliplab.errors.DataError` for a malformed file and
    :class:`~cliplab.errors.UsageError` for a malformed dict.
    """
    if isinstance(spec, Mapping):
        data, where = dict(spec), "descriptors"
    else:
        path = BUNDLED_DESCRIPTORS.get(str(spec), Path(spec))
        if not Path(path).exists():
            raise DataError(f"{path}: no such descriptor file; pass a JSON {{class: [descriptors]}} "
                            f"or one of {', '.join(BUNDLED_DESCRIPTORS)}")
        text = read_text(path, what="descriptor file")
        try:
            data = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}: not a JSON descriptor file ({e})") from None
        where = str(path)
    if not isinstance(data, dict) or not data:
        raise DataError(f"{where}: expected a non-empty JSON object {{class: [descriptor, ...]}}")
    out = {}
    for c, ds in data.items():
        if isinstance(ds, str) or not isinstance(ds, (list, tuple)) or not ds \
                or not all(isinstance(d, str) and d.strip() for d in ds):
            raise DataError(f"{where}: class {c!r} needs a non-empty list of non-empty descriptor strings")
        name = str(c).strip()
        if not name or name in out:
            raise DataError(f"{where}: class {c!r} is empty or repeats another class")
        out[name] = [d.strip() for d in ds]
    return out


def describe(template: str, classname: str, descriptor: str) -> str:
    """The sentence of one descriptor: ``template`` with ``{c}`` and ``{d}`` filled."""
    return template.replace("{c}", classname).replace("{d}", descriptor)


def description_scores(x: np.ndarray, desc: np.ndarray, owner: np.ndarray, n_classes: int, *,
                       reduce: str = "mean") -> np.ndarray:
    """Per-class mean (or max) cosine of images to descriptor sentences.

    Parameters
    ----------
    x : ndarray (N, D)
        L2-normalised image features.
    desc : ndarray (M, D)
        L2-normalised descriptor-sentence features, all classes stacked.
    owner : int ndarray (M,)
        Class index of each row of ``desc``; every class owns at least one row.
    n_classes : int
    reduce : {"mean", "max"}

    Returns
    -------
    ndarray of float32 (N, C)
    """
    cos = x @ desc.T                                                   # (N, M)
    out = np.empty((len(x), n_classes), dtype=np.float32)              # (N, C)
    for c in range(n_classes):
        cols = cos[:, owner == c]                                      # (N, |D_c|)
        out[:, c] = cols.mean(axis=1) if reduce == "mean" else cols.max(axis=1)  # Eq. 1 / GRAIN r
    return out


class DescriptionClassifier(ZeroShotClassifier):
    """Zero-shot classification by description (Menon & Vondrick) or GRAIN-style scoring.

    Parameters
    ----------
    backbone : Backbone
    descriptors : dict of str -> list of str, or str/Path
        ``{class: [descriptor, ...]}``, a JSON file of that, or a bundled name
        (``"shapes"``: ShapesWorld shapes and colours).
    template : str, default="{c}, which has {d}."
        Sentence per descriptor; ``{c}`` is the class name, ``{d}`` the descriptor.
    mode : {"mean", "grain"}, default="mean"
        ``mean``: Eq. 1 of the paper.  ``grain``: ``grain_weight`` times the global
        class-prompt cosine plus ``1 - grain_weight`` times the best descriptor cosine.
    grain_weight : float in [0, 1], default=0.5
        Weight a of the global score in ``grain`` mode (1 = plain zero-shot).
    classnames : sequence of str, optional
        The classes, in order; each must have descriptors.  Default: the descriptor keys.
    class_templates : template spec, default="default"
        Prompts of the global class weights ``weights_`` (``grain`` mode).

    Attributes
    ----------
    classes_ : ndarray of str (C,)
    weights_ : ndarray of float32 (C, D)
        Global prompt-ensemble class weights.
    descriptor_weights_ : ndarray of float32 (M, D)
        One row per descriptor sentence.
    descriptor_owner_ : ndarray of int (M,)
        Class index of each descriptor sentence.
    sentences_ : list of str (M,)

    Examples
    --------
    >>> clf = DescriptionClassifier(cliplab.load("shapes-tiny"), "shapes",      # doctest: +SKIP
    ...                             classnames=["circle", "square"])
    >>> clf.predict(images)                                                    # doctest: +SKIP
    """

    def __init__(self, backbone, descriptors, template: str = "{c}, which has {d}.", *,
                 mode: str = "mean", grain_weight: float = 0.5, classnames: Sequence[str] | None = None,
                 class_templates="default", progress: bool | None = None):
        check_choice("mode", mode, MODES)
        check_number("grain_weight", grain_weight, minimum=0, maximum=1)
        if "{d}" not in template:
            raise UsageError(f"template {template!r} has no '{{d}}' placeholder for the descriptor")
        table = load_descriptors(descriptors)
        names = list(table) if classnames is None else [str(c).strip() for c in classnames]
        missing = [c for c in names if c not in table]
        if missing:
            raise UsageError(f"no descriptors for class(es) {', '.join(missing[:5])}; add them to the "
                             "descriptor JSON")
        super().__init__(backbone, names, class_templates, progress=progress)   # validates names
        self.mode = mode
        self.grain_weight = float(grain_weight)
        self.template = template
        self.sentences_ = [describe(template, c, d) for c in names for d in table[c]]
        self.descriptor_owner_ = np.repeat(np.arange(len(names)), [len(table[c]) for c in names])
        self.descriptor_weights_ = backbone.encode_texts(self.sentences_, progress=progress)  # (M, D)

    def decision_function(self, images, **kwargs) -> np.ndarray:
        """``logit_scale`` times the description score: (N, C).  ``images`` may be features."""
        x = self._features(images, **kwargs)                                          # (N, D)
        c = len(self.classes_)
        if self.mode == "mean":
            score = description_scores(x, self.descriptor_weights_, self.descriptor_owner_, c)
        else:
            best = description_scores(x, self.descriptor_weights_, self.descriptor_owner_, c, reduce="max")
            a = self.grain_weight
            score = a * (x @ self.weights_.T) + (1.0 - a) * best                   # GRAIN mix
        return self.backbone.logit_scale * score
