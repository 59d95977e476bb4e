"""Caption phrasings for ShapesWorld scenes (language rewrites, LaCLIP-style).

Every scene gets one *canonical* caption first (all attributes: size, colour, shape,
position of every object) and then several rewrites of the same content in other words,
some dropping attributes.  A trainer samples one caption per step.

A colour is always written next to its shape, either ``"{color} {shape}"`` (``"red
star"``) or ``"{shape} in {color}"`` (``"star in red"``); :func:`mentions` tests both,
which is how held-out compositions are checked to be absent from training text.
Captions stay under about 25 words (three objects with size and position), which fits the
32-token context of the tiny model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_BACKGROUND_WORD = {"plain": "plain", "gradient": "gradient", "stripes": "striped", "noise": "noisy",
                    # the unseen backgrounds of the ``new-backgrounds`` domain
                    "checker": "checkered", "dots": "dotted", "waves": "wavy", "clouds": "cloudy"}
_COUNT_WORD = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def position_phrase(position: str) -> str:
    """``"left"`` -> ``"on the left"``, ``"top left"`` -> ``"at the top left"``."""
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def mentions(caption: str, color: str, shape: str) -> bool:
    """Whether ``caption`` names an object of this colour and shape in any phrasing."""
    return f"{color} {shape}" in caption or f"{shape} in {color}" in caption


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _single(o, bg: str) -> list[str]:
    c, s, z, p = o.color, o.shape, o.size, position_phrase(o.position)
    return [
        f"a {z} {c} {s} {p}",
        f"there is a {c} {s}, {z}",
        f"a {c} {s}",
        f"a photo of a {z} {c} {s}.",
        f"a {c} {s} on a {bg} background",
        f"a {z} {s} in {c}",
        f"{p} is a {c} {s}",
        f"a drawing of a {c} {s} {p}",
    ]


def _multi(objects, bg: str, rng: np.random.Generator) -> list[str]:
    full = [f"a {o.size} {o.color} {o.shape} {position_phrase(o.position)}" for o in objects]
    short = [f"a {o.color} {o.shape}" for o in objects]
    sized = [f"a {o.size} {o.color} {o.shape}" for o in objects]
    after = [f"a {o.size} {o.shape} in {o.color}" for o in objects]
    order = rng.permutation(len(objects))
    count = _COUNT_WORD.get(len(objects), str(len(objects)))
    return [
        _join(full),
        _join(short),
        _join([sized[i] for i in order]),
        f"a photo of {count} shapes: {_join(short)}.",
        f"{_join(short)} on a {bg} background",
        _join(after),
        f"{count} shapes: {_join([short[i] for i in order])}",
    ]


def make_captions(objects, background: str, rng: np.random.Generator, n: int = 5) -> list[str]:
    """Captions of one scene: the canonical one, then ``n - 1`` distinct rewrites.

    Parameters
    ----------
    objects : list of ObjectGT
        The visible objects, in drawing order.
    background : str
        The background kind.
    rng : numpy.random.Generator
        Picks the rewrites (part of the scene's own random stream).
    n : int, default=5
        Number of captions returned.

    Returns
    -------
    list of str
    """
    bg = _BACKGROUND_WORD[background]
    if len(objects) == 1:
        pool = _single(objects[0], bg)
    else:
        pool = _multi(objects, bg, rng)
    rest = rng.permutation(len(pool) - 1)[: n - 1] + 1
    return [pool[0]] + [pool[i] for i in rest]


def canonical_caption(objects) -> str:
    """The caption naming every attribute of every object (the first of :func:`make_captions`)."""
    return _join([f"a {o.size} {o.color} {o.shape} {position_phrase(o.position)}" for o in objects])


def negative_captions(objects, rng: np.random.Generator, k: int, colors, shapes, avoid=frozenset()) -> list[str]:
    """``k`` hard negatives: the canonical caption with one attribute of one object swapped.

    Each negative picks an object and replaces its colour or its shape (one of
    the two, at random) by another value, so the caption is fluent and wrong in
    exactly one word, as the negative descriptions of HQ-CLIP or the swaps of
    SugarCrepe.

    Parameters
    ----------
    objects : list of ObjectGT
        The visible objects.
    rng : numpy.random.Generator
    k : int
        Number of negatives (they may repeat).
    colors, shapes : sequence of str
        The values a swap may take (e.g. the split's shapes only).
    avoid : set of (colour, shape), optional
        Compositions a swap must not create (held-out pairs stay out of training text).

    Returns
    -------
    list of str
    """
    out = []
    for _ in range(k):
        i = int(rng.integers(len(objects)))
        o = objects[i]
        options = {"color": [c for c in colors if c != o.color and (c, o.shape) not in avoid],
                   "shape": [s for s in shapes if s != o.shape and (o.color, s) not in avoid]}
        attr = "color" if rng.random() < 0.5 else "shape"
        if not options[attr]:  # e.g. a world with a single shape
            attr = "shape" if attr == "color" else "color"
        swapped = dataclasses.replace(o, **{attr: str(rng.choice(options[attr]))})
        out.append(canonical_caption([*objects[:i], swapped, *objects[i + 1:]]))
    return out
