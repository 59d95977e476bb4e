"""Nano-Capsulator: a long caption rewritten as a short natural-language "capsule" that keeps its meaning.

Learning to Compress Prompt in Natural Language Formats (Chuang et al., NAACL 2024,
arXiv:2402.18700).  The paper fine-tunes an LLM (the Capsulator) to rewrite a long prompt
P into a shorter natural-language Capsule Prompt C, trained with a semantics-preserving
loss (its Eq. 1: C must keep P's meaning) weighted by a utility reward (its Eq. 2: the
downstream model answers as well from C as from P) that has a strict length cut-off
(capsules over the length budget get no reward).  Because C is plain text, any model can
read it (the paper's transferability); here the reader is the plain CLIP text tower, whose
context (32 tokens for shapes-tiny, 77 for OpenAI's CLIP) cuts long captions.

The rewriter (:class:`Capsulator`)
----------------------------------
A long text is cut into units (sentences, :func:`text_units`), each offered in two forms:
as written and compacted (function words dropped, :func:`compact`).  With f the plain
text tower (L2-normalised features), t(P) the long text's target feature and n(C) the
token count of C with start and end tokens, the capsule is built greedily:

    (1) s(C) = cos(f(C), t(P))                  semantic preservation (the paper's Eq. 1
                                                as a score instead of a loss)
    (2) feasible: n(C) <= budget                the length cut-off (Eq. 2's constraint;
                                                budget = the model's context by default)
    (3) C_0 = "", C_{j+1} = argmax s(C_j + u) over unused units u in either form
        (kept in the order of P) with C_j + u feasible; stop when s no longer rises.

The target t(P):

- ``target="sentences"`` (default): the mean of the text tower's features of P's units,
  each short enough to be read whole (P's meaning, read piece by piece), minus the
  *common direction* m, then normalised.  m is the mean unit feature of a corpus, learned
  by :meth:`Capsulator.fit` (the one learned part; without ``fit`` m = 0).  Units every
  text shares ("There are no defects.") pull the plain mean towards m and say nothing
  about one text; removing it is the common-component removal of SIF sentence
  embeddings (Arora et al., ICLR 2017).  Capsules are scored raw, f(C), against it;
- an object with ``encode_long_texts(texts) -> (N, D)``, e.g. a trained
  :class:`~cliplab.generative.softpromptcomp.SoftPromptComp`: the capsule then keeps
  what the compressor, trained for the retrieval task, keeps (the paper's utility term).

Deviations from the paper (no reference code is published):

- no language model is fine-tuned; the rewriter is a search over extractive and
  compacted units of P, scored by eq. (1) under eq. (2), so capsules contain only P's
  own words (in P's order); the paper's generator may paraphrase;
- the only training is the corpus mean m of the target (``fit``); on ShapesWorld it
  moves capsule R@1 from below truncation to above it (see docs/generative.md);
- the reward-weighted loss becomes the search's objective, and the utility reward
  (answers of a downstream model on sampled questions) is available only through a
  learned target (``target=`` a SoftPromptComp), not as a separate term;
- the length constraint counts the reader's tokens (what CLIP's context limits), not
  the paper's words.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np

from .._progress import progress_bar
from ..errors import UsageError
from ..validation import check_backbone

logger = logging.getLogger(__name__)

__all__ = ["FUNCTION_WORDS", "Capsulator", "compact", "text_units"]

FUNCTION_WORDS = frozenset({
    "a", "an", "the", "is", "are", "was", "were", "there", "of", "by", "it", "its", "this", "that",
    "which", "with", "as", "be", "has", "have", "picture", "photo", "image", "shows",
})
"""Words :func:`compact` drops (articles, copulas and picture-framing words)."""

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def text_units(text: str) -> list[str]:
    """A text cut into sentences (at ``.``, ``!``, ``?`` or ``;`` followed by space)."""
    return [u for u in (s.strip() for s in _SENTENCE_END.split(text.strip())) if u]


def compact(unit: str, function_words=FUNCTION_WORDS) -> str:
    """``"The first shape is a large red circle at the top."`` -> ``"first shape large red circle at top"``.

    Drops ``function_words`` (case-insensitive) and trailing punctuation; keeps the rest in order.
    """
    words = unit.strip().rstrip(".!?;:").split()
    return " ".join(w for w in words if w.lower().strip(",:") not in function_words).strip(" ,:")


class Capsulator:
    """Rewrite long texts into capsules that fit a text tower's context and keep their meaning.

    Parameters
    ----------
    backbone : Backbone
        Its tokenizer counts tokens, its text tower scores capsules (eq. 1).
    budget : int, optional
        Most tokens of a capsule, start and end tokens included (default: the backbone's
        context length, so the plain text tower reads the whole capsule).
    target : "sentences" or object with ``encode_long_texts``, default "sentences"
        What a capsule must stay close to (see the module docstring).
    compact_forms : bool, default True
        Offer every unit compacted (:func:`compact`) as well as as written.

    Attributes
    ----------
    common_ : ndarray (D,) or None
        The corpus mean unit feature m, set by :meth:`fit` (None before).
    n_cut_ : int
        Capsules of the last :meth:`compress` call that hold a unit cut at the token level
        (no whole word of it fitted the budget).

    Examples
    --------
    >>> cap = Capsulator(cliplab.load("shapes-tiny"))                        # doctest: +SKIP
    >>> cap.compress(["A picture of two shapes on a plain background. ..."])  # doctest: +SKIP
    ['two shapes on plain background first shape large red circle at top ...']
    """

    def __init__(self, backbone, *, budget: int | None = None, target="sentences", compact_forms: bool = True):
        check_backbone("backbone", backbone)
        ctx = backbone.context_length
        budget = ctx if budget is None else int(budget)
        if not 3 <= budget <= ctx:
            raise UsageError(f"budget must be between 3 and the context length {ctx} tokens, got {budget}")
        if not (isinstance(target, str) and target == "sentences") and not hasattr(target, "encode_long_texts"):
            raise UsageError("target must be 'sentences' or have encode_long_texts (e.g. a SoftPromptComp)")
        if not hasattr(backbone.tokenizer, "encode"):
            raise UsageError(f"{backbone.name}: counting capsule tokens needs a BPE tokenizer with encode()")
        self.backbone, self.budget, self.target, self.compact_forms = backbone, budget, target, compact_forms
        self.common_ = None
        self.n_cut_ = 0

    def fit(self, texts: Sequence[str]) -> "Capsulator":
        """Learn the common direction m: the mean feature of the units of ``texts`` (a training corpus).

        Returns ``self``.  Used by ``target="sentences"`` only.
        """
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UsageError("fit needs a non-empty list of texts")
        units = [self._fit(u, self.backbone.context_length) for t in texts for u in (text_units(t) or [t])]
        self.common_ = self.backbone.encode_texts(units, progress=False).mean(0).astype(np.float32)  # (D,)
        return self

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` with start and end tokens (what eq. 2 bounds)."""
        return len(self.backbone.tokenizer.encode(text)) + 2

    def targets(self, texts: Sequence[str]) -> np.ndarray:
        """t(P) of each text: L2-normalised float32 (N, D)."""
        if not isinstance(self.target, str):
            return np.asarray(self.target.encode_long_texts(list(texts)), np.float32)
        units = [text_units(t) or [t] for t in texts]
        flat = [self._fit(u, self.backbone.context_length) for us in units for u in us]
        feats = self.backbone.encode_texts(flat, progress=False)             # (sum units, D)
        common = 0.0 if self.common_ is None else self.common_
        out, start = [], 0
        for us in units:
            m = feats[start:start + len(us)].mean(0) - common                 # (D,)
            out.append(m / max(np.linalg.norm(m), 1e-12))
            start += len(us)
        return np.asarray(out, np.float32)                                    # (N, D)

    def _fit(self, unit: str, limit: int) -> str:
        """``unit`` cut to whole words within ``limit`` tokens (a unit longer than the context).

        A first word longer than ``limit`` on its own (a URL) is cut at the token level.
        """
        words = unit.split()
        while len(words) > 1 and self.n_tokens(" ".join(words)) > limit:
            words.pop()
        out = " ".join(words)
        return self._cut(out, limit) if out and self.n_tokens(out) > limit else out

    def compress(self, texts: str | Sequence[str], *, progress: bool | None = None,
                 return_scores: bool = False):
        """Capsules of ``texts``: strings of at most ``budget`` tokens (eq. 3).

        Parameters
        ----------
        texts : str or sequence of str
        progress : bool, optional
        return_scores : bool, default False
            Also return each capsule's eq. (1) score, float32 (N,).

        Returns
        -------
        list of str, or (list of str, ndarray (N,))
            A text that already fits the budget is its own capsule (score of itself).  A unit
        whose first word alone exceeds the budget (a long URL, a run-on word) is cut to its
        longest prefix within the budget instead of being dropped, so no capsule is empty;
        :attr:`n_cut_` counts the capsules holding such a cut.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise UsageError("texts must be strings")
        self.n_cut_ = 0
        goals = self.targets(texts) if texts else np.zeros((0, self.backbone.embed_dim), np.float32)
        caps, scores = [], []
        with progress_bar(total=len(texts), progress=progress if len(texts) > 1 else False,
                          desc="capsules", unit="text") as bar:
            for text, goal in zip(texts, goals):
                cap, score = self._one(text, goal)
                caps.append(cap)
                scores.append(score)
                bar.update(1)
        return (caps, np.asarray(scores, np.float32)) if return_scores else caps

    def _one(self, text: str, goal: np.ndarray) -> tuple[str, float]:
        if self.n_tokens(text) <= self.budget:
            return text, float(self.backbone.encode_texts([text], progress=False)[0] @ goal)
        options, token_cut = [], set()                                        # (unit index, form)
        for i, unit in enumerate(text_units(text)):
            raw = (unit, compact(unit)) if self.compact_forms else (unit,)
            forms = {self._fit(f, self.budget) for f in raw}
            options += [(i, f) for f in sorted(forms) if f]
            token_cut |= {(i, self._fit(f, self.budget)) for f in raw if f.split()
                          and self.n_tokens(f.split()[0]) > self.budget}     # no whole word fits
        chosen: dict[int, str] = {}
        best = -np.inf
        while True:
            cands = []
            for i, form in options:
                if i in chosen:
                    continue
                c = " ".join({**chosen, i: form}[j] for j in sorted({*chosen, i}))
                if self.n_tokens(c) <= self.budget:                          # eq. (2)
                    cands.append((i, form, c))
            if not cands:
                break
            s = self.backbone.encode_texts([c for *_, c in cands], progress=False) @ goal   # eq. (1)
            j = int(np.argmax(s))
            if s[j] <= best:                                                  # eq. (3): no gain, stop
                break
            best = float(s[j])
            chosen[cands[j][0]] = cands[j][1]
        if not chosen:                                                        # no unit at all: never empty
            capsule = self._cut(text, self.budget)
            self.n_cut_ += 1
            return capsule, float(self.backbone.encode_texts([capsule], progress=False)[0] @ goal)
        self.n_cut_ += any((i, form) in token_cut for i, form in chosen.items())
        return " ".join(chosen[j] for j in sorted(chosen)), best

    def _cut(self, text: str, limit: int) -> str:
        """The longest prefix of ``text`` within ``limit`` tokens: the fallback when no whole word fits.

        A bisection over the prefix's length in characters, so the capsule keeps the
        text's own characters (a decode of the first tokens would space them out).
        """
        lo, hi = 0, len(text)                                                 # text[:lo] fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.n_tokens(text[:mid].strip()) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return text[:lo].strip()
