"""ShapesWorld: a procedural image-caption world that is a pure function of its seed.

Scene ``i`` of split ``s`` is drawn from ``np.random.default_rng([seed, split_id, i])``
(defects from a second stream ``[seed, split_id, i, 1]``, a domain's rendering from
``[seed, split_id, i, 2, stage]``), so any scene can be made on its own, in any order, on
any process: DDP ranks and resumed runs see identical data, and turning defects or a
domain (:mod:`.domains`) on or off leaves everything else in the scene unchanged.

Splits
------
``train``, ``val``
    Objects use the in-distribution shapes (all but ``ood_shapes``) and never a held-out
    (colour, shape) pair.
``test``
    In-distribution shapes, every (colour, shape) pair including the held-out ones
    (compositional zero-shot tests).
``ood``
    Only exists when ``ood_shapes`` is not empty; every object has an OOD shape.  OOD
    shapes appear in no other split.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ...errors import UsageError
from ...validation import check_number, check_positive_int
from . import render
from .domains import check_domain, domain_rng, get_domain
from .captions import make_captions
from .long_captions import long_caption, short_caption

logger = logging.getLogger("cliplab.data.shapes")

COLORS: tuple[str, ...] = tuple(render.PALETTE)
SHAPES: tuple[str, ...] = tuple(render.SDF)
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "noise")
DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain")
SIZES: tuple[str, ...] = ("small", "large")
#: Short tags of a scene (HQ-CLIP's "short positive tags"): its colour and shape words,
#: as a multi-hot vector over this vocabulary.
TAGS: tuple[str, ...] = COLORS + SHAPES

#: One held-out colour per shape (shape i with colour (3 i + 1) mod 8): a Latin-square
#: diagonal, so every colour and every shape still occurs in training.
DEFAULT_HELDOUT: tuple[tuple[str, str], ...] = tuple(
    (COLORS[(3 * i + 1) % len(COLORS)], shape) for i, shape in enumerate(SHAPES)
)

#: Background forced by the first object's shape when ``spurious`` fires.
SPURIOUS_BACKGROUND: dict[str, str] = {s: BACKGROUNDS[i % len(BACKGROUNDS)] for i, s in enumerate(SHAPES)}

SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "ood": 3}
MAX_OBJECTS = 12
"""Most objects per scene (dense scenes, :mod:`.dense`, draw up to this many)."""
_RADIUS = {"small": (0.10, 0.14), "large": (0.18, 0.24)}  # half-extent / image side
_PLACE_TRIES = 20
_COLOR_JITTER = 12.0


@dataclass
class ObjectGT:
    """Ground truth of one object.

    Attributes
    ----------
    shape, color, size : str
        Attribute words (``size`` is ``"small"`` or ``"large"``).
    position : str
        Where its centre lies on a 3x3 grid: ``"top left"``, ``"top"``, ``"top right"``,
        ``"left"``, ``"center"``, ``"right"``, ``"bottom left"``, ``"bottom"``,
        ``"bottom right"``.
    box : tuple of int
        ``(x0, y0, x1, y1)`` in pixels, tight around ``mask``, ``x1``/``y1`` exclusive.
    mask : ndarray of bool, shape (H, W)
        Visible pixels (coverage >= 0.5, minus objects drawn on top).  Defects are not
        subtracted: the object is still there under a scratch.
    """

    shape: str
    color: str
    size: str
    position: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)

    @property
    def name(self) -> str:
        """``"red star"``."""
        return f"{self.color} {self.shape}"


@dataclass
class ObjectSpec:
    """An object to draw (the input of :meth:`ShapesWorld.compose`).

    Attributes
    ----------
    shape, color, size : str
        Attribute words; ``size`` is ``"small"`` or ``"large"`` (the caption word).
    cx, cy : float
        Centre in pixels (``x`` to the right, ``y`` down).
    r : float
        Half-extent in pixels.
    rgb : ndarray of float32, shape (3,)
        Fill colour, 0-255 (:func:`jitter_color` of ``color``).
    """

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float
    rgb: np.ndarray = field(repr=False)


def jitter_color(color: str, rng: np.random.Generator) -> np.ndarray:
    """The palette colour of ``color`` with ShapesWorld's per-object jitter: (3,) float32, 0-255."""
    jitter = rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, 3) + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER)
    return np.clip(np.asarray(render.PALETTE[color], np.float32) + jitter, 0, 255)


@dataclass
class Scene:
    """One ShapesWorld image with its ground truth.

    Attributes
    ----------
    image : ndarray of uint8, shape (H, W, 3)
    objects : list of ObjectGT
        In drawing order (later ones on top).
    background : str
        One of :data:`BACKGROUNDS` (of :data:`~.domains.NEW_BACKGROUNDS` in the
        ``new-backgrounds`` domain).
    captions : list of str
        Canonical caption first, then rewrites.
    long_caption, short_caption : str
        Properties: a detailed caption of several sentences (counts, colours, positions,
        relations, background, defects) and its one-sentence summary, read off the
        ground truth (:mod:`.long_captions`; no random numbers).
    defects : list of dict
        ``{"kind": str, "mask": (H, W) bool, "box": (x0, y0, x1, y1)}``.
    split : str
    index : int
    """

    image: np.ndarray = field(repr=False)
    objects: list[ObjectGT]
    background: str
    captions: list[str]
    defects: list[dict] = field(default_factory=list)
    split: str = "train"
    index: int = 0

    @property
    def long_caption(self) -> str:
        """Detailed multi-sentence caption from the ground truth (:func:`.long_captions.long_caption`)."""
        return long_caption(self)

    @property
    def short_caption(self) -> str:
        """One-sentence summary beside :attr:`long_caption` (:func:`.long_captions.short_caption`)."""
        return short_caption(self)

    @property
    def captions_zh(self) -> list[str]:
        """Five Chinese captions from the ground truth, canonical first (:func:`.captions_zh.chinese_captions`)."""
        from .captions_zh import chinese_captions

        return chinese_captions(self.objects, self.background, n=5, offset=self.index)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y = np.flatnonzero(rows)
    x = np.flatnonzero(cols)
    if len(x) == 0:
        return (0, 0, 0, 0)
    return (int(x[0]), int(y[0]), int(x[-1]) + 1, int(y[-1]) + 1)


def _position_word(cx: float, cy: float, size: int) -> str:
    col = "left" if cx < size / 3 else ("right" if cx > 2 * size / 3 else "")
    row = "top" if cy < size / 3 else ("bottom" if cy > 2 * size / 3 else "")
    return " ".join(w for w in (row, col) if w) or "center"


class ShapesSplit(Sequence):
    """One split of a :class:`ShapesWorld` as a read-only sequence of scenes."""

    def __init__(self, world: "ShapesWorld", name: str):
        self.world = world
        self.name = name

    def __len__(self) -> int:
        return self.world.split_sizes[self.name]

    def __getitem__(self, index: int) -> Scene:
        if isinstance(index, slice):
            raise TypeError("ShapesWorld splits do not slice; use render_batch(split, indices)")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for split {self.name!r} of {n} scenes")
        return self.world.scene(self.name, index)

    def __iter__(self):
        for i in range(len(self)):
            yield self.world.scene(self.name, i)

    def __repr__(self) -> str:
        return f"ShapesSplit({self.name!r}, n={len(self)})"


class ShapesWorld:
    """Procedural scenes of coloured shapes with captions, masks, boxes and defects.

    Parameters
    ----------
    seed : int, default=0
        The world; every scene is a pure function of ``(seed, split, index, options)``.
    image_size : int, default=64
        Side of the square images in pixels (>= 16).
    n_objects : int or (int, int), default=(1, 3)
        Objects per scene, or an inclusive range drawn uniformly, at most
        :data:`MAX_OBJECTS` (12).  Objects are placed by
        rejection sampling (centres at least 0.75 of the summed radii apart, 20 tries, a
        large object falls back to small after 10); an object that still finds no room is
        left out, which is rare below 4 objects at 64 px.
    heldout : sequence of (color, shape), default=DEFAULT_HELDOUT
        Compositions never drawn in ``train``/``val`` (images and captions); they occur in
        ``test``.
    ood_shapes : sequence of str, default=()
        Shapes drawn only in the ``ood`` split.
    spurious : float in [0, 1], default=0.0
        Probability that the background is :data:`SPURIOUS_BACKGROUND` of the first
        object's shape instead of uniform (shortcut studies).
    defect_rate : float in [0, 1], default=0.0
        Probability that a scene gets one defect (scratch, hole or stain) with its mask.
    split_sizes : dict, optional
        Length of each split; default ``{"train": 1_000_000, "val": 5_000, "test": 5_000}``
        plus ``"ood": 5_000`` when ``ood_shapes`` is set.
    antialias : bool, default=True
        Soft edges.  With ``False`` every mask pixel has exactly the object colour.
    n_captions : int, default=5
        Captions per scene (>= 3).
    domain : str, optional
        A controlled shift of the rendering (a name of
        :data:`~cliplab.data.shapes.domains.DOMAINS`: styles, lighting, clutter,
        occlusion, unseen backgrounds, corruptions such as ``"blur-3"``).  The objects and
        labels of scene ``i`` are the same in every domain; ``None`` (or ``"original"``)
        is the original rendering.

    Examples
    --------
    >>> w = ShapesWorld(seed=0)
    >>> s = w.scene("test", 3)
    >>> s.image.shape, len(s.captions) >= 3
    ((64, 64, 3), True)
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        n_objects=(1, 3),
        heldout=DEFAULT_HELDOUT,
        ood_shapes=(),
        spurious: float = 0.0,
        defect_rate: float = 0.0,
        split_sizes: dict | None = None,
        *,
        antialias: bool = True,
        n_captions: int = 5,
        domain: str | None = None,
    ):
        if int(seed) != seed or seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
        if int(image_size) != image_size or image_size < 16:
            raise UsageError(f"image_size must be an integer >= 16, got {image_size!r}")
        lo, hi = (n_objects, n_objects) if np.isscalar(n_objects) else tuple(n_objects)
        if not 1 <= lo <= hi <= MAX_OBJECTS:
            raise UsageError(f"n_objects must be an int or (lo, hi) range within 1..{MAX_OBJECTS}, got {n_objects!r}")
        for name, value in (("spurious", spurious), ("defect_rate", defect_rate)):
            check_number(name, value, minimum=0, maximum=1)
        heldout = tuple((str(c), str(s)) for c, s in heldout)
        for c, s in heldout:
            if c not in COLORS or s not in SHAPES:
                raise UsageError(f"held-out pair ({c!r}, {s!r}) is not a colour and shape of ShapesWorld")
        ood_shapes = tuple(ood_shapes)
        unknown = [s for s in ood_shapes if s not in SHAPES]
        if unknown:
            raise UsageError(f"unknown ood_shapes {unknown}; choose from {list(SHAPES)}")
        in_shapes = tuple(s for s in SHAPES if s not in ood_shapes)
        if not in_shapes:
            raise UsageError("ood_shapes leaves no shape for train/val/test")
        for s in in_shapes:
            if all((c, s) in heldout for c in COLORS):
                raise UsageError(f"every colour of {s!r} is held out; it could never be trained")
        check_positive_int("n_captions", n_captions, minimum=3)
        sizes = {"train": 1_000_000, "val": 5_000, "test": 5_000}
        if ood_shapes:
            sizes["ood"] = 5_000
        if split_sizes:
            bad = [k for k in split_sizes if k not in SPLIT_IDS]
            if bad:
                raise UsageError(f"unknown splits {bad}; choose from {list(SPLIT_IDS)}")
            sizes.update({k: int(v) for k, v in split_sizes.items()})
        if "ood" in sizes and not ood_shapes:
            raise UsageError("an 'ood' split needs ood_shapes")

        self.seed = int(seed)
        self.image_size = int(image_size)
        self.n_objects = (int(lo), int(hi))
        self.heldout = heldout
        self.ood_shapes = ood_shapes
        self.spurious = float(spurious)
        self.defect_rate = float(defect_rate)
        self.split_sizes = sizes
        self.antialias = bool(antialias)
        self.n_captions = int(n_captions)
        self.in_shapes = in_shapes
        self._heldout_set = frozenset(heldout)
        self.domain = check_domain(domain)
        self._domain = get_domain(self.domain)

    # ------------------------------------------------------------------ public

    def config(self) -> dict:
        """The constructor arguments as plain data (for manifests and :meth:`replace`);
        ``domain`` only when one is set, so the original domain's manifests are unchanged."""
        cfg = {
            "seed": self.seed,
            "image_size": self.image_size,
            "n_objects": list(self.n_objects),
            "heldout": [list(p) for p in self.heldout],
            "ood_shapes": list(self.ood_shapes),
            "spurious": self.spurious,
            "defect_rate": self.defect_rate,
            "split_sizes": dict(self.split_sizes),
            "antialias": self.antialias,
            "n_captions": self.n_captions,
        }
        if self.domain is not None:
            cfg["domain"] = self.domain
        return cfg

    def replace(self, **changes) -> "ShapesWorld":
        """A copy of this world with some constructor arguments changed."""
        cfg = self.config()
        cfg.update(changes)
        return ShapesWorld(**cfg)

    def split(self, name: str) -> ShapesSplit:
        """The scenes of split ``name`` as a sequence (``len``, ``[i]``, iteration)."""
        self._check_split(name)
        return ShapesSplit(self, name)

    def shapes_of(self, split: str) -> tuple[str, ...]:
        """The shapes that can occur in ``split``."""
        self._check_split(split)
        return self.ood_shapes if split == "ood" else self.in_shapes

    def scene(self, split: str, index: int) -> Scene:
        """Scene ``index`` of ``split``; equal to ``self.split(split)[index]``."""
        self._check_split(split)
        index = int(index)
        if not 0 <= index < self.split_sizes[split]:
            raise IndexError(f"index {index} out of range for split {split!r} of {self.split_sizes[split]} scenes")
        return self._make(split, index)

    def render_batch(self, split: str, indices) -> tuple[np.ndarray, list[Scene]]:
        """Render many scenes: ``(images uint8 (N, H, W, 3), scenes)``."""
        scenes = [self.scene(split, i) for i in indices]
        S = self.image_size
        images = np.empty((len(scenes), S, S, 3), dtype=np.uint8)  # (N, H, W, 3)
        for k, s in enumerate(scenes):
            images[k] = s.image
        return images, scenes

    def __repr__(self) -> str:
        return (
            f"ShapesWorld(seed={self.seed}, image_size={self.image_size}, n_objects={self.n_objects}, "
            f"heldout={len(self.heldout)} pairs, ood_shapes={self.ood_shapes}, spurious={self.spurious}, "
            f"defect_rate={self.defect_rate}" + (f", domain={self.domain!r})" if self.domain else ")")
        )

    # ------------------------------------------------------------------ internals

    def _check_split(self, name: str) -> None:
        if name not in self.split_sizes:
            raise UsageError(f"unknown split {name!r}; this world has {sorted(self.split_sizes)}")

    def _attributes(self, split: str, rng: np.random.Generator) -> tuple[str, str]:
        shapes = self.shapes_of(split)
        avoid = self._heldout_set if split in ("train", "val") else frozenset()
        while True:
            color = COLORS[rng.integers(len(COLORS))]
            shape = shapes[rng.integers(len(shapes))]
            if (color, shape) not in avoid:
                return color, shape

    def _place(self, size_word: str, placed: list, rng: np.random.Generator):
        S = self.image_size
        for attempt in range(_PLACE_TRIES):
            if attempt == _PLACE_TRIES // 2 and size_word == "large":
                size_word = "small"
            r = rng.uniform(*_RADIUS[size_word]) * S
            cx, cy = rng.uniform(r, S - r, 2)
            if all(np.hypot(cx - px, cy - py) >= 0.75 * (r + pr) for px, py, pr in placed):
                return size_word, float(cx), float(cy), float(r)
        return None

    def _make(self, split: str, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index])
        lo, hi = self.n_objects
        n = int(rng.integers(lo, hi + 1))

        # attributes and placement
        specs, placed = [], []
        for _ in range(n):
            color, shape = self._attributes(split, rng)
            size_word = SIZES[rng.integers(2)]
            spot = self._place(size_word, placed, rng)
            if spot is None:
                logger.debug("scene %s/%d: no room for a %s %s, left out", split, index, color, shape)
                continue
            size_word, cx, cy, r = spot
            placed.append((cx, cy, r))
            specs.append(ObjectSpec(shape, color, size_word, cx, cy, r, jitter_color(color, rng)))

        bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if rng.random() < self.spurious:
            bg = SPURIOUS_BACKGROUND[specs[0].shape]
        drng = np.random.default_rng([self.seed, SPLIT_IDS[split], index, 1])  # defects' own stream
        return self.compose(specs, bg, rng, drng, split=split, index=index)

    def compose(self, specs, background: str, rng: np.random.Generator,
                defect_rng: np.random.Generator | None = None, *, split: str = "train", index: int = 0) -> Scene:
        """Render a scene from given objects: background, objects in order, defect, captions.

        This is the second half of :meth:`scene`; tasks that choose their objects
        themselves (counting, relations, paired images) call it with their own specs.

        Parameters
        ----------
        specs : sequence of ObjectSpec
            Objects in drawing order (later ones on top), in pixels of ``image_size``.
        background : str
            One of :data:`BACKGROUNDS`.
        rng : numpy.random.Generator
            Draws the background texture and picks the caption rewrites.
        defect_rng : numpy.random.Generator, optional
            Decides and draws a defect with probability ``defect_rate``; none when omitted.
        split, index : optional
            Recorded on the scene; with ``index`` they key the random streams of the
            world's ``domain`` (:func:`~.domains.domain_rng`), which draws nothing from
            ``rng``, so the objects and captions' choices are those of the original domain.

        Returns
        -------
        Scene
        """
        S = self.image_size
        image = render.background(background, S, rng)  # (S, S, 3) float32
        dom = self._domain  # None: the original domain, bytes as before domains existed
        if dom is not None:
            stream = functools.partial(domain_rng, self.seed, SPLIT_IDS.get(split, 0), index)
            if dom.background is not None:
                image, background = dom.background(S, stream(0))
            if dom.behind is not None:
                dom.behind(image, specs, stream(1))
            shape_rng, paint_rng = stream(2), stream(3)
            cover = np.zeros((S, S), np.float32)  # (H, W) object coverage, for lighting

        # objects, later ones on top
        masks = []
        for spec in specs:
            if dom is not None and dom.shape is not None:
                window, alpha, inside = dom.shape(spec, S, self.antialias, shape_rng)
            else:
                window, alpha = render.coverage(spec.shape, spec.cx, spec.cy, spec.r, S, self.antialias)
                inside = alpha >= 0.5
            if dom is not None and dom.paint is not None:
                dom.paint(image, window, alpha, spec, paint_rng)
            else:
                render.paint(image, window, alpha, spec.rgb)
            mask = np.zeros((S, S), dtype=bool)  # (H, W)
            mask[window] = inside
            for m in masks:
                m[window] &= ~mask[window]
            masks.append(mask)
            if dom is not None:
                np.maximum(cover[window], alpha, out=cover[window])
        if dom is not None and dom.front is not None:
            hidden = dom.front(image, masks, stream(4))  # occluders: their pixels leave the masks
            for m in masks:
                m &= ~hidden
        objects = [
            ObjectGT(spec.shape, spec.color, spec.size, _position_word(spec.cx, spec.cy, S), _box(m), m)
            for spec, m in zip(specs, masks)
        ]

        defects = []
        if defect_rng is not None and defect_rng.random() < self.defect_rate:
            kind = DEFECTS[defect_rng.integers(len(DEFECTS))]
            alpha, rgb, dmask = render.defect(kind, S, defect_rng)
            window = (slice(0, S), slice(0, S))
            render.paint(image, window, alpha, rgb)
            defects.append({"kind": kind, "mask": dmask, "box": _box(dmask)})
        if dom is not None and dom.pixels is not None:
            image = dom.pixels(image, cover, stream(5))  # lighting, corruptions

        captions = make_captions(objects, background, rng, self.n_captions)
        out = np.clip(image + 0.5, 0, 255).astype(np.uint8)  # (H, W, 3)
        return Scene(out, objects, background, captions, defects, split, index)
