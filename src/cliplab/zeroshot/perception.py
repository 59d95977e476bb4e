"""PerceptionCLIP: infer the context of an image first, then classify conditioned on it.

An, Zhu, Feizi and Huang, "More Context, Less Distraction: Zero-shot Visual Classification
by Inferring and Conditioning on Contextual Attributes", ICLR 2024, arXiv:2308.01313
(reference code: ``umd-huang-lab/perceptionCLIP``,
``src/zero_shot_inference/perceptionclip_two_step.py``).  Training-free, two steps
("ClassifyByInference" with the "w/ y" context inference of the reference, its default):

    e(y, z)     = normalise( mean_{t in desc(z)} normalise(phi("{main(y)}, {t}.")) )
    f(y, z; x)  = s * cos(x, e(y, z))                                   (s = logit_scale)
    p(z | x)    ∝ sum_y exp( f(y, z; x) / T )                      step 1, "w/ y"
    p(z | x)    = softmax_z( f("object", z; x) / T )               step 1, "w/o y"
    p(y | x, z) = softmax_y f(y, z; x)                              step 2
    p(y | x)    = sum_z p(z | x) p(y | x, z)

An empty description gives the sentence "{main(y)}." (no context phrase).  With one
context value the method is plain zero-shot with the prompt "{main(y)}.".

Defaults: T = 1 (the README's setting for Waterbirds/CUB; T = 3 for ImageNet); one
contextual factor.  Several factors are composed by the caller as a Cartesian product
of their values, as in the reference (descriptions joined with ", ").

:data:`SHAPES_BACKGROUNDS` is the ShapesWorld factor: the background kind, phrased as
in ShapesWorld captions ("on a striped background").
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..validation import check_choice, check_number
from .classifier import ZeroShotClassifier

__all__ = ["PerceptionCLIP", "context_posterior", "perception_proba", "SHAPES_BACKGROUNDS"]

SHAPES_BACKGROUNDS: dict[str, list[str]] = {
    "plain": ["on a plain background"],
    "gradient": ["on a gradient background"],
    "stripes": ["on a striped background"],
    "noise": ["on a noisy background"],
}
"""ShapesWorld's background kind as a contextual attribute z (value -> descriptions)."""

INFER = ("with_y", "without_y")


def _log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def context_posterior(f: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """p(z | x) ∝ sum_y exp(f(y, z; x) / T) from logits f (N, C, Z); returns (N, Z).

    With ``f`` of shape (N, 1, Z) (class-agnostic texts) this is the "w/o y" rule
    softmax_z(f(z; x) / T).
    """
    g = f / temperature                                                   # (N, C, Z)
    m = g.max(axis=(1, 2), keepdims=True)
    lse = np.log(np.exp(g - m).sum(axis=1)) + m[:, 0]                     # (N, Z) logsumexp_y
    return np.exp(_log_softmax(lse, axis=1))


def perception_proba(f: np.ndarray, p_z: np.ndarray) -> np.ndarray:
    """p(y | x) = sum_z p(z | x) softmax_y f(y, z; x); f (N, C, Z), p_z (N, Z) -> (N, C)."""
    p_y_given_z = np.exp(_log_softmax(f, axis=1))                         # (N, C, Z)
    return np.einsum("ncz,nz->nc", p_y_given_z, p_z)


class PerceptionCLIP(ZeroShotClassifier):
    """Zero-shot classification that first infers a contextual attribute z.

    Parameters
    ----------
    backbone : Backbone
    classnames : sequence of str
    contexts : dict of str -> list of str, default=SHAPES_BACKGROUNDS
        Values of the contextual attribute and their descriptions (``""`` = no phrase).
    template : str, default="a photo of a {c}"
        The main template, without final punctuation.
    temperature : float > 0, default=1.0
        T of the context inference.
    infer : {"with_y", "without_y"}, default="with_y"
        How p(z | x) is inferred (see the module docstring).
    agnostic : str, default="object"
        The class word of the "without_y" texts.
    sep : str, default=", "
        Between the main prompt and a description.

    Attributes
    ----------
    classes_ : ndarray of str (C,)
    contexts_ : list of str (Z,)
    weights_ : ndarray of float32 (C, D)
        The plain "{main(c)}." class weights (z ignored).
    context_weights_ : ndarray of float32 (C, Z, D)
        e(y, z), unit rows.
    agnostic_weights_ : ndarray of float32 (Z, D) or None
        e("object", z) for ``infer="without_y"``.

    Examples
    --------
    >>> clf = PerceptionCLIP(cliplab.load("shapes-tiny"), ["circle", "star"])   # doctest: +SKIP
    >>> clf.context_proba(images).shape                                         # doctest: +SKIP
    (N, 4)
    """

    def __init__(self, backbone, classnames: Sequence[str], contexts: Mapping[str, Sequence[str]] | None = None,
                 template: str = "a photo of a {c}", *, temperature: float = 1.0, infer: str = "with_y",
                 agnostic: str = "object", sep: str = ", ", progress: bool | None = None):
        contexts = SHAPES_BACKGROUNDS if contexts is None else contexts
        if not isinstance(contexts, Mapping) or not contexts:
            raise UsageError("contexts must be a non-empty dict {value: [description, ...]}")
        for z, descs in contexts.items():
            if isinstance(descs, str) or not descs or not all(isinstance(t, str) for t in descs):
                raise UsageError(f"context {z!r} needs a non-empty list of descriptions ('' = no phrase)")
        check_number("temperature", temperature, minimum=0, strict_minimum=True)
        check_choice("infer", infer, INFER)
        if "{c}" not in template:
            raise UsageError(f"template {template!r} has no '{{c}}' placeholder")
        super().__init__(backbone, classnames, template + ".", progress=progress)  # validates names
        self.temperature = float(temperature)
        self.infer = infer
        self.contexts_ = [str(z) for z in contexts]
        self._descs = [list(contexts[z]) for z in contexts]
        self.context_weights_ = self._embed([template.replace("{c}", c) for c in self.classes_], sep,
                                            progress)                                  # (C, Z, D)
        self.agnostic_weights_ = (self._embed([template.replace("{c}", agnostic)], sep, progress)[0]
                                  if infer == "without_y" else None)                  # (Z, D)

    def _embed(self, mains: list[str], sep: str, progress) -> np.ndarray:
        """e(y, z) for each main prompt and context value: (len(mains), Z, D), unit rows."""
        sentences, owner = [], []
        for i, main in enumerate(mains):
            for j, descs in enumerate(self._descs):
                for t in descs:
                    sentences.append(f"{main}{sep}{t}." if t else f"{main}.")
                    owner.append((i, j))
        emb = self.backbone.encode_texts(sentences, progress=progress)               # (S, D)
        out = np.zeros((len(mains), len(self._descs), emb.shape[1]), dtype=np.float64)
        count = np.zeros((len(mains), len(self._descs), 1))
        for (i, j), e in zip(owner, emb):
            out[i, j] += e
            count[i, j] += 1
        out /= count                                                                 # mean of sentences
        return (out / np.linalg.norm(out, axis=2, keepdims=True)).astype(np.float32)

    def joint_logits(self, images, **kwargs) -> np.ndarray:
        """f(y, z; x) = s * cos(x, e(y, z)): (N, C, Z)."""
        x = self._features(images, **kwargs)                                         # (N, D)
        return self.backbone.logit_scale * np.einsum("nd,czd->ncz", x, self.context_weights_)

    def _context_proba(self, x, f) -> np.ndarray:
        if self.infer == "without_y":
            f = (self.backbone.logit_scale * x @ self.agnostic_weights_.T)[:, None, :]   # (N, 1, Z)
        return context_posterior(f, self.temperature)                                # (N, Z)

    def context_proba(self, images, **kwargs) -> np.ndarray:
        """p(z | x): (N, Z), columns in the order of ``contexts_``."""
        x = self._features(images, **kwargs)
        return self._context_proba(x, self.joint_logits(x))

    def decision_function(self, images, **kwargs) -> np.ndarray:
        """log p(y | x): (N, C).  ``predict_proba`` (its softmax) is p(y | x) itself."""
        x = self._features(images, **kwargs)
        f = self.joint_logits(x)                                                      # (N, C, Z)
        p = perception_proba(f, self._context_proba(x, f))                           # (N, C)
        return np.log(np.maximum(p, np.finfo(np.float64).tiny))
