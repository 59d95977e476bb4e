"""Long and short captions of ShapesWorld scenes (Long-CLIP-style detailed text).

Every :class:`~cliplab.data.shapes.Scene` has, beside its short rewrites
(``scene.captions``), a *long caption* of several sentences and a one-sentence *short
caption* (its summary), both read off the scene's ground truth only: no random numbers,
so they never disturb the scene's random stream and the same scene always gets the same
text.

The long caption says, in this order:

1. how many shapes there are and the background (``"A picture of five shapes on a
   striped background."``);
2. how many of each shape (``"There are two circles, one star and two squares."``);
3. each object in drawing order, with its size, colour and position (``"The first shape
   is a large red circle at the top left."``);
4. for each object after the first, where it lies relative to the object drawn before it
   (``"The blue square is right of the red circle."``), from the centres of their masks:
   ``left of``/``right of`` when the horizontal offset is at least the vertical one, else
   ``above``/``below`` (:func:`relation`);
5. the defects (``"There is a scratch near the top left."``) or ``"There are no defects."``

With 8 or more objects the long caption is longer than CLIP's 77-token context (about
15 tokens per object); the short caption stays far below it (count, background and the
three largest objects).

Objects are named ``"the red circle"``; when two objects share colour and shape, their
position is added (``"the red circle at the top left"``).
"""

from __future__ import annotations

import numpy as np

from .captions import _BACKGROUND_WORD, position_phrase

__all__ = ["COUNT_WORDS", "count_phrase", "long_caption", "mask_center", "relation", "short_caption"]

COUNT_WORDS: dict[int, str] = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
    7: "seven", 8: "eight", 9: "nine", 10: "ten", 11: "eleven", 12: "twelve",
}
"""Number words of counts (larger counts are written in digits)."""

_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
             "eleventh", "twelfth")


def count_word(n: int) -> str:
    """``3`` -> ``"three"`` (digits above twelve)."""
    return COUNT_WORDS.get(int(n), str(int(n)))


def count_phrase(n: int, noun: str = "shape") -> str:
    """``(3, "circle")`` -> ``"three circles"``, ``(1, "shape")`` -> ``"one shape"``."""
    return f"{count_word(n)} {noun}" + ("" if n == 1 else "s")


def mask_center(mask: np.ndarray) -> tuple[float, float]:
    """Centre ``(x, y)`` in pixels of a bool mask (H, W) (pixel centres at +0.5); NaN if empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return float("nan"), float("nan")
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def relation(a_mask: np.ndarray, b_mask: np.ndarray) -> str:
    """Where object ``a`` lies relative to ``b``: ``"left of"``, ``"right of"``, ``"above"`` or ``"below"``.

    From the centres of the two masks (:func:`mask_center`): the horizontal relation when
    ``|dx| >= |dy|``, else the vertical one (``y`` grows downwards).
    """
    ax, ay = mask_center(a_mask)
    bx, by = mask_center(b_mask)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _names(objects) -> list[str]:
    names = [f"the {o.color} {o.shape}" for o in objects]
    repeated = {n for n in names if names.count(n) > 1}
    return [f"{n} {position_phrase(o.position)}" if n in repeated else n for n, o in zip(names, objects)]


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _defect_sentence(defects, size: int) -> str:
    if not defects:
        return "There are no defects."
    parts = []
    for d in defects:
        x0, y0, x1, y1 = d["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        parts.append(f"a {d['kind']} {_near(cx, cy, size)}")
    return f"There {'is' if len(parts) == 1 else 'are'} {_join(parts)}."


def _near(cx: float, cy: float, size: int) -> str:
    col = "left" if cx < size / 3 else ("right" if cx > 2 * size / 3 else "")
    row = "top" if cy < size / 3 else ("bottom" if cy > 2 * size / 3 else "")
    where = " ".join(w for w in (row, col) if w) or "center"
    return f"near the {where}"


def long_caption(scene) -> str:
    """The detailed multi-sentence caption of ``scene`` (see the module docstring).

    Parameters
    ----------
    scene : Scene
        Needs ``objects`` (with ``mask``), ``background``, ``defects`` and ``image``.

    Returns
    -------
    str
    """
    objects = list(scene.objects)
    size = int(scene.image.shape[1])
    bg = _BACKGROUND_WORD.get(scene.background, scene.background)
    n = len(objects)
    out = [f"A picture of {count_phrase(n)} on a {bg} background."]
    if n > 1:
        shapes: dict[str, int] = {}
        for o in objects:
            shapes[o.shape] = shapes.get(o.shape, 0) + 1
        counts = [count_phrase(k, s) for s, k in shapes.items()]
        out.append(f"There {'is' if counts[0].startswith('one ') else 'are'} {_join(counts)}.")
        colors: dict[str, int] = {}
        for o in objects:
            colors[o.color] = colors.get(o.color, 0) + 1
        out.append("By colour: " + _join([f"{count_word(k)} {c}" for c, k in colors.items()]) + ".")
    for i, o in enumerate(objects):
        which = _ORDINALS[i] if i < len(_ORDINALS) else f"number {i + 1}"
        subject = "The shape" if n == 1 else f"The {which} shape"
        out.append(f"{subject} is a {o.size} {o.color} {o.shape} {position_phrase(o.position)}.")
    names = _names(objects)
    for i in range(1, n):
        rel = relation(objects[i].mask, objects[i - 1].mask)
        out.append(f"{names[i][0].upper()}{names[i][1:]} is {rel} {names[i - 1]}.")
    out.append(_defect_sentence(scene.defects, size))
    return " ".join(out)


def short_caption(scene) -> str:
    """One sentence summing ``scene`` up: the count, the background and the three largest objects.

    ``"a large red circle on a plain background"`` for one object, else ``"a photo of five
    shapes on a striped background, including a large red circle, a small blue square and
    a large green star"`` (largest visible area first).  Fits CLIP's 77 tokens at any count.
    """
    objects = list(scene.objects)
    bg = _BACKGROUND_WORD.get(scene.background, scene.background)
    if len(objects) == 1:
        o = objects[0]
        return f"a {o.size} {o.color} {o.shape} on a {bg} background"
    area = [int(o.mask.sum()) for o in objects]
    order = sorted(range(len(objects)), key=lambda i: (-area[i], i))[:3]
    main = _join([f"a {objects[i].size} {objects[i].color} {objects[i].shape}" for i in order])
    return f"a photo of {count_phrase(len(objects))} on a {bg} background, including {main}"
