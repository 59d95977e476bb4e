"""Language rewrites of captions (LaCLIP), by rules instead of a language model.

LaCLIP (Fan et al., "Improving CLIP Training with Language Rewrites", NeurIPS 2023,
arXiv:2305.20088; reference github.com/LijieFan/LaCLIP) rewrites every training caption
offline into 4 paraphrases with LLaMA in-context learning, and each time a sample is loaded
draws its caption uniformly from {original, rewrite_1..4}.  The cliplab Trainer already does
the drawing (:func:`cliplab.train.datasets.caption_choice`); this module makes the
rewrites.

:func:`rewrite_caption` applies meaning-preserving edits, each at random (seeded):

1. template change: an attribute-free lead-in ("a photo of", "an image of", "there is"...)
   is removed, replaced or added, and a final full stop toggled;
2. clause reordering: a list of object phrases ("a red star, a blue circle and a green
   ring") is permuted; a scene-level tail ("on a striped background") stays at the end;
3. synonyms for sizes ("large" <-> "big") and positions ("in the center" <-> "in the
   middle", "at the top left" <-> "in the upper left corner");
4. colour placement: "a red star" <-> "a star in red" (for the colours and shapes of
   ShapesWorld);
5. article and plural variation: "a" <-> "one" before an object, "a"/"an" agreement, and
   repeated identical objects merged into a plural ("a red star and a red star" -> "two red
   stars").

Any caption goes in; edits whose pattern is absent do nothing, so plain web captions get
template, order and synonym changes only.  The same ``(caption, seed)`` always gives the same
rewrites.

Deviations from LaCLIP: no language model (rule-based edits are exact about the
attributes, which ShapesWorld can check, but less varied than LLaMA's), and the number of
rewrites is a parameter (LaCLIP: 4).
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from pathlib import Path

import numpy as np

from .shapes.world import COLORS, SHAPES

logger = logging.getLogger(__name__)

__all__ = ["rewrite_caption", "add_rewrites", "rewrite_table", "LEAD_INS", "SYNONYMS"]

#: Attribute-free lead-ins a rewrite may add, remove or swap.
LEAD_INS: tuple[str, ...] = ("a photo of", "an image of", "a picture of", "a picture showing", "this image shows",
                             "a drawing of", "there is", "an illustration of")

#: Groups of interchangeable phrases (whole words); the first of each group is canonical.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("large", "big"),
    ("small", "little"),
    ("in the center", "in the middle", "at the center"),
    ("on the left", "to the left", "on the left side"),
    ("on the right", "to the right", "on the right side"),
    ("at the top left", "in the top left corner", "in the upper left"),
    ("at the top right", "in the top right corner", "in the upper right"),
    ("at the bottom left", "in the bottom left corner", "in the lower left"),
    ("at the bottom right", "in the bottom right corner", "in the lower right"),
    ("at the top", "near the top", "at the top edge"),
    ("at the bottom", "near the bottom", "at the bottom edge"),
    ("background", "backdrop"),
)

_COUNT = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_ARTICLE = r"(?:a|an|one)"
_LEAD_RE = re.compile(r"^(?:" + "|".join(re.escape(p) for p in sorted(LEAD_INS, key=len, reverse=True))
                      + r")\s+(?=(?:a|an|one|the)\b)")
_TAIL_RE = re.compile(r"\s+on an? [a-z]+ (?:background|backdrop)$")
_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_SIZE_RE = "small|large|big|little"
# "a small red star" / "a red star" -> "a small star in red"
_COLOR_FIRST = re.compile(rf"\b({_ARTICLE}) (?:({_SIZE_RE}) )?({_COLOR_RE}) ({_SHAPE_RE})\b")
_COLOR_AFTER = re.compile(rf"\b({_ARTICLE}) (?:({_SIZE_RE}) )?({_SHAPE_RE}) in ({_COLOR_RE})\b")
_PLURAL = {"cross": "crosses"}


def _seed_of(caption: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(caption.encode("utf-8"))])


def _split_list(body: str) -> list[str]:
    """``"a, b and c"`` -> ``["a", "b", "c"]`` (top-level list of a caption)."""
    head, _, last = body.rpartition(" and ")
    if not head:
        return [body]
    return [p for p in head.split(", ")] + [last]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _is_object(phrase: str) -> bool:
    return re.match(rf"^{_ARTICLE} \S", phrase) is not None and "," not in phrase


def _plural(shape: str) -> str:
    return _PLURAL.get(shape, shape + "s")


def _merge_duplicates(parts: list[str]) -> list[str]:
    """Identical object phrases -> one plural phrase ("a red star" x2 -> "two red stars")."""
    out, seen = [], {}
    for p in parts:
        seen[p] = seen.get(p, 0) + 1
    for p in dict.fromkeys(parts):
        k = seen[p]
        m = re.match(rf"^{_ARTICLE} (.*?)\b({_SHAPE_RE})\b(.*)$", p)
        if k > 1 and m and k in _COUNT:
            out.append(f"{_COUNT[k]} {m.group(1)}{_plural(m.group(2))}{m.group(3)}")
        else:
            out.extend([p] * k)
    return out


def _articles(text: str) -> str:
    """``a`` / ``an`` agreement with the next word."""
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an " if m.group(2) in "aeiou" else "a ") + m.group(2), text)


_GROUP_OF = {phrase: group for group in SYNONYMS for phrase in group}
_SYNONYM_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(_GROUP_OF, key=len, reverse=True)) + r")\b")


def _synonyms(text: str, rng: np.random.Generator) -> str:
    """Each phrase of :data:`SYNONYMS` -> a random member of its group (one pass, longest match first)."""
    def pick(m):
        group = _GROUP_OF[m.group(1)]
        return group[int(rng.integers(len(group)))]

    return _SYNONYM_RE.sub(pick, text)


def _colour_placement(text: str, rng: np.random.Generator) -> str:
    def after(m):
        size = f"{m.group(2)} " if m.group(2) else ""
        return f"{m.group(1)} {size}{m.group(4)} in {m.group(3)}" if rng.random() < 0.5 else m.group(0)

    def before(m):
        size = f"{m.group(2)} " if m.group(2) else ""
        return f"{m.group(1)} {size}{m.group(4)} {m.group(3)}" if rng.random() < 0.5 else m.group(0)

    text = _COLOR_AFTER.sub(before, text)
    return _COLOR_FIRST.sub(after, text) if rng.random() < 0.5 else text


def _one_rewrite(caption: str, rng: np.random.Generator) -> str:
    text = caption.strip()
    stop = text.endswith(".")
    text = text.rstrip(".").strip()
    lower = text.lower()
    lead = _LEAD_RE.match(lower)
    body = text[lead.end():] if lead else text                              # 1. template
    header, sep, items = body.rpartition(": ")
    if not sep:
        header, items = "", body
    tail = _TAIL_RE.search(items)
    if tail:
        items, tail = items[:tail.start()], items[tail.start():]
    parts = _split_list(items)
    if len(parts) > 1 and all(_is_object(p) for p in parts):                # 2. clause order
        if rng.random() < 0.7:
            parts = [parts[i] for i in rng.permutation(len(parts))]
        if rng.random() < 0.5 and not header:
            parts = _merge_duplicates(parts)                                # 5. plurals
        items = _join(parts)
    body = f"{header}{sep}{items}{tail or ''}"
    body = _synonyms(body, rng)                                             # 3. synonyms
    body = _colour_placement(body, rng)                                     # 4. colour placement
    if rng.random() < 0.3:                                                  # 5. a <-> one
        body = re.sub(r"^(a|an) ", "one ", body) if re.match(r"^(a|an) ", body) else re.sub(r"^one ", "a ", body)
    if rng.random() < 0.6 and re.match(rf"^{_ARTICLE} ", body):             # 1. template
        lead_in = LEAD_INS[int(rng.integers(len(LEAD_INS)))]
        body = f"{lead_in} {body}"
    elif lead and rng.random() < 0.5:
        body = f"{text[:lead.end()].strip()} {body}"
    if rng.random() < 0.5:
        stop = not stop
    return _articles(body) + ("." if stop else "")


def rewrite_caption(caption: str, n: int = 4, *, seed: int = 0, max_tries: int = 8) -> list[str]:
    """Up to ``n`` distinct meaning-preserving rewrites of ``caption``, none equal to it.

    Parameters
    ----------
    caption : str
    n : int, default 4
        Rewrites wanted (LaCLIP: 4).  Fewer come back when the caption offers fewer
        distinct edits within ``max_tries * n`` attempts.
    seed : int, default 0
        With ``caption``, fixes the rewrites.
    max_tries : int, default 8

    Returns
    -------
    list of str

    Examples
    --------
    >>> rewrite_caption("a large red star on the left and a small blue circle", 2, seed=0)  # doctest: +SKIP
    ['an image of a small blue circle and a big star in red on the left.', ...]
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = _seed_of(caption, seed)
    out: list[str] = []
    for _ in range(max_tries * n):
        if len(out) >= n:
            break
        r = _one_rewrite(caption, rng)
        if r != caption and r not in out and r.strip():
            out.append(r)
    return out


def add_rewrites(captions: list[str], n: int = 4, *, seed: int = 0) -> list[str]:
    """``captions`` followed by ``n`` rewrites of each (duplicates removed, originals first)."""
    out = list(captions)
    for c in captions:
        out.extend(rewrite_caption(c, n, seed=seed))
    return list(dict.fromkeys(out))


def rewrite_table(path, out, *, n: int = 4, seed: int = 0, image_key: str = "filepath",
                  caption_key: str = "caption") -> dict:
    """Write a caption table with ``n`` rewrites added to every image's captions (JSONL).

    Parameters
    ----------
    path : str or Path
        A ``.csv``/``.tsv``/``.jsonl`` table (:func:`cliplab.data.sources.read_caption_table`).
    out : str or Path
        The ``.jsonl`` written: one line per image, ``{"filepath": ..., "caption": [original
        captions..., rewrites...]}``, image paths as resolved from ``path``; training on it
        (``cliplab train --data OUT``) samples one phrasing per image per step.
    n, seed : int
        See :func:`rewrite_caption`.
    image_key, caption_key : str
        Columns of ``path``.

    Returns
    -------
    dict
        ``images``, ``captions`` (originals), ``rewrites`` (added), ``skipped`` (rows).
    """
    from .sources import SkipLog, read_caption_table

    skipped = SkipLog()
    records = read_caption_table(path, image_key=image_key, caption_key=caption_key, skip_log=skipped)
    n_orig = n_added = 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for rec in records:
            caps = add_rewrites(list(rec.captions), n, seed=seed)
            n_orig += len(rec.captions)
            n_added += len(caps) - len(dict.fromkeys(rec.captions))
            f.write(json.dumps({"filepath": str(rec.image), "caption": caps}) + "\n")
    logger.info("%s: %d images, %d captions, %d rewrites added -> %s", path, len(records), n_orig, n_added, out)
    return {"images": len(records), "captions": n_orig, "rewrites": n_added, "skipped": skipped.count}
