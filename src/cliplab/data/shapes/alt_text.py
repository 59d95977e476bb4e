"""Noisy, alt-text-like captions of ShapesWorld scenes (the "before" of quality captions).

Web alt-text, the captions CLIP is usually trained on, names the image only in part:
objects are missing, attributes are wrong, words are dropped, and boilerplate ("stock photo
image 1234") is mixed in or replaces the description altogether.  :func:`corrupt_caption`
turns a scene's ground truth into such a caption at stated rates, so that the data-side
methods of HQ-CLIP / DataComp-style filtering (keep the pairs a CLIP scores high) and
re-captioning (replace alt-text by a faithful caption; ShapesWorld's is
:func:`~cliplab.data.shapes.captions.canonical_caption`) can be measured against it.

One noisy caption per scene, a pure function of ``(seed, index)`` through the ``rng``
given.  The corruption happens in this order (each event independent, at its rate):

1. ``unrelated``: the caption is boilerplate only (nothing about the image);
2. ``drop_object``: each object is left out (at least one object stays);
3. ``wrong_attribute``: each kept object gets its colour or its shape (one of the two, at
   random) replaced by another value -- never making a composition in ``avoid``, so
   held-out pairs stay out of training text;
4. the kept objects are written as the canonical caption, and ``drop_word`` removes each
   word (at least one word stays);
5. ``boilerplate``: a boilerplate phrase is put before or after the caption.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .captions import canonical_caption

#: Web boilerplate; ``{n}`` is a random number.
BOILERPLATE: tuple[str, ...] = (
    "stock photo image {n}",
    "IMG_{n}.jpg",
    "royalty free vector illustration {n}",
    "click to enlarge",
    "free download hd wallpaper {n}",
    "shapes clipart {n}",
    "geometric background design template",
    "image may contain: art",
)


@dataclass(frozen=True)
class NoiseRates:
    """Probabilities of each corruption of :func:`corrupt_caption` (all in [0, 1]).

    Parameters
    ----------
    unrelated : float, default 0.2
        The caption is boilerplate only.
    drop_object : float, default 0.3
        Each object is left out of the caption (one always stays).
    wrong_attribute : float, default 0.25
        Each kept object has its colour or shape replaced.
    drop_word : float, default 0.1
        Each word of the written caption is removed.
    boilerplate : float, default 0.4
        Boilerplate is added before or after a caption that describes the scene.
    """

    unrelated: float = 0.2
    drop_object: float = 0.3
    wrong_attribute: float = 0.25
    drop_word: float = 0.1
    boilerplate: float = 0.4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"NoiseRates.{f.name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class NoisyCaption:
    """A noisy caption and what was done to make it (for counting the rates).

    Attributes
    ----------
    text : str
    unrelated : bool
        Boilerplate only.
    n_objects, n_dropped_objects, n_wrong_attributes : int
        Objects of the scene, left out, and with a replaced attribute.
    n_words, n_dropped_words : int
        Words of the written caption before word dropping, and removed.
    boilerplate : bool
        Boilerplate was added to a describing caption.
    """

    text: str
    unrelated: bool = False
    n_objects: int = 0
    n_dropped_objects: int = 0
    n_wrong_attributes: int = 0
    n_words: int = 0
    n_dropped_words: int = 0
    boilerplate: bool = False


def _boilerplate(rng: np.random.Generator) -> str:
    return BOILERPLATE[int(rng.integers(len(BOILERPLATE)))].format(n=int(rng.integers(100, 10_000)))


def corrupt_caption(objects, rng: np.random.Generator, *, colors, shapes, rates: NoiseRates = NoiseRates(),
                    avoid=frozenset()) -> NoisyCaption:
    """One alt-text-like caption of a scene (see the module docstring for the steps).

    Parameters
    ----------
    objects : list of ObjectGT
        The scene's visible objects (at least one).
    rng : numpy.random.Generator
        Every random choice; seed it per scene for a deterministic caption.
    colors, shapes : sequence of str
        The values a wrong attribute may take.
    rates : NoiseRates
    avoid : set of (colour, shape), optional
        Compositions a wrong attribute must not create.

    Returns
    -------
    NoisyCaption
    """
    if not objects:
        raise ValueError("a scene needs at least one object")
    if rng.random() < rates.unrelated:                                        # 1.
        return NoisyCaption(_boilerplate(rng), unrelated=True, n_objects=len(objects))
    keep = rng.random(len(objects)) >= rates.drop_object                      # 2.
    if not keep.any():
        keep[int(rng.integers(len(objects)))] = True
    kept, n_wrong = [], 0
    for o, k in zip(objects, keep):
        if not k:
            continue
        if rng.random() < rates.wrong_attribute:                              # 3.
            options = {"color": [c for c in colors if c != o.color and (c, o.shape) not in avoid],
                       "shape": [s for s in shapes if s != o.shape and (o.color, s) not in avoid]}
            attr = "color" if rng.random() < 0.5 else "shape"
            if not options[attr]:
                attr = "shape" if attr == "color" else "color"
            if options[attr]:
                o = dataclasses.replace(o, **{attr: str(rng.choice(options[attr]))})
                n_wrong += 1
        kept.append(o)
    words = canonical_caption(kept).split()                                   # 4.
    drop = rng.random(len(words)) < rates.drop_word
    if drop.all():
        drop[int(rng.integers(len(words)))] = False
    text = " ".join(w for w, d in zip(words, drop) if not d)
    extra = rng.random() < rates.boilerplate                                  # 5.
    if extra:
        text = f"{_boilerplate(rng)} {text}" if rng.random() < 0.5 else f"{text} {_boilerplate(rng)}"
    return NoisyCaption(text, n_objects=len(objects), n_dropped_objects=int((~keep).sum()),
                        n_wrong_attributes=n_wrong, n_words=len(words), n_dropped_words=int(drop.sum()),
                        boilerplate=bool(extra))
