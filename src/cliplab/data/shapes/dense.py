"""Dense ShapesWorld scenes: 3-12 overlapping objects with a semantic class map, instance masks and boxes.

The ground truth of segmentation (``shapes:seg``) and open-vocabulary detection
(``shapes:det``).  A dense scene is a pure function of ``(world, split, index)``: it draws
its objects from the same stream as :meth:`ShapesWorld.scene` (``[seed, split, index]``)
but places more, smaller objects that may overlap, then renders them with
:meth:`ShapesWorld.compose`, so every rendering option of the world applies.

>>> from cliplab.data.shapes.dense import dense_world, dense_scene, CLASSNAMES
>>> world = dense_world()                       # shapes-tiny, 256 px, 3-12 objects
>>> s = dense_scene(world, "test", 0)
>>> s.image.shape, s.class_map.shape, s.class_map.dtype.name
((256, 256, 3), (256, 256), 'uint8')
>>> CLASSNAMES[:3]
('background', 'circle', 'square')

Ground truth
------------
``class_map`` (H, W) uint8
    ``CLASS_IDS[shape]`` of the object visible at each pixel, ``0`` for background, and
    :data:`IGNORE_INDEX` (255) on the anti-aliased edge: the pixels whose colour is a
    blend of the top object and what lies under it.  With ``antialias=False`` no pixel
    is ignored.  Class ids are fixed: ``CLASS_IDS[s] == SHAPES.index(s) + 1``, the COCO
    ``category_id`` of every ShapesWorld COCO export.
``objects[k].mask`` (H, W) bool, ``objects[k].box``
    Visible pixels of each object (coverage >= 0.5, minus objects drawn on top; disjoint)
    and their tight ``(x0, y0, x1, y1)`` box, ``x1``/``y1`` exclusive.  Outside the
    ignored edge, ``class_map`` is exactly the instance masks painted with their class.

Placement
---------
Half-extents are drawn from :data:`DENSE_RADIUS` (fractions of the image side).  With
probability :data:`OVERLAP_RATE` an object is put next to one already placed, at
0.6-0.9 of their summed radii, so it overlaps it; every pair of centres stays at least
:data:`MIN_GAP` of their summed radii apart.  An object with less than
:data:`MIN_VISIBLE` of its area left visible by the ones drawn on top is left out, so no
object of the ground truth is hidden.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ...errors import UsageError
from ..datasets import DetectionData, SegmentationData
from . import render
from .tasks import TaskRequest, register_task
from .world import (
    BACKGROUNDS,
    SHAPES,
    SIZES,
    SPLIT_IDS,
    SPURIOUS_BACKGROUND,
    ObjectSpec,
    Scene,
    ShapesWorld,
    jitter_color,
)
from .worlds import shapes_tiny_world

logger = logging.getLogger("cliplab.data.shapes")

__all__ = [
    "CLASSNAMES",
    "CLASS_IDS",
    "DENSE_IMAGE_SIZE",
    "DENSE_OBJECTS",
    "IGNORE_INDEX",
    "DenseScene",
    "class_map_of",
    "dense_scene",
    "dense_scenes",
    "dense_world",
]

DENSE_IMAGE_SIZE = 256
"""Default side of dense scenes in pixels."""

DENSE_OBJECTS: tuple[int, int] = (3, 12)
"""Default number of objects per dense scene (inclusive range)."""

IGNORE_INDEX = 255
"""Class-map value of unscored (anti-aliased edge) pixels."""

CLASSNAMES: tuple[str, ...] = ("background", *SHAPES)
"""Class names of the class maps: index = class id, ``0`` background, then :data:`SHAPES`."""

CLASS_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASSNAMES)}
"""Class id of each shape (and of ``"background"``)."""

DENSE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.05, 0.08), "large": (0.09, 0.13)}
"""Half-extent ranges of dense-scene objects, as fractions of the image side."""

OVERLAP_RATE = 0.4
"""Probability that an object is placed overlapping one already placed."""

MIN_GAP = 0.55
"""Smallest distance between two centres, as a fraction of the sum of their half-extents."""

MIN_VISIBLE = 0.3
"""Smallest visible fraction of an object's own area; less and it is left out."""

_PLACE_TRIES = 30


@dataclass
class DenseScene(Scene):
    """A :class:`Scene` with its semantic class map.

    Attributes
    ----------
    class_map : ndarray of uint8, shape (H, W)
        :data:`CLASS_IDS` of the visible object at each pixel, ``0`` background,
        :data:`IGNORE_INDEX` on anti-aliased edges.
    specs : list of ObjectSpec
        The objects as drawn (centre, half-extent, exact fill colour), in the order of
        ``objects``.
    """

    class_map: np.ndarray = field(default=None, repr=False)
    specs: list = field(default_factory=list, repr=False)


def dense_world(world: ShapesWorld | None = None, *, seed: int = 0, image_size: int | None = None,
                n_objects=None) -> ShapesWorld:
    """The world whose dense scenes ``shapes:seg`` and ``shapes:det`` render.

    Parameters
    ----------
    world : ShapesWorld, optional
        The world to derive from (its seed, shapes, held-out pairs, rendering options);
        default the shapes-tiny world of ``seed`` (:func:`~.worlds.shapes_tiny_world`).
    seed : int, default 0
        Used only when ``world`` is not given.
    image_size : int, optional
        Default :data:`DENSE_IMAGE_SIZE` (256).
    n_objects : int or (int, int), optional
        Default :data:`DENSE_OBJECTS` (3-12).

    Returns
    -------
    ShapesWorld
    """
    world = shapes_tiny_world(seed) if world is None else world
    return world.replace(image_size=DENSE_IMAGE_SIZE if image_size is None else image_size,
                         n_objects=DENSE_OBJECTS if n_objects is None else n_objects)


def _place(size_word: str, placed: list, S: int, rng: np.random.Generator):
    r = rng.uniform(*DENSE_RADIUS[size_word]) * S
    for _ in range(_PLACE_TRIES):
        if placed and rng.random() < OVERLAP_RATE:
            px, py, pr = placed[rng.integers(len(placed))]
            dist = rng.uniform(0.6, 0.9) * (r + pr)
            angle = rng.uniform(0, 2 * np.pi)
            cx, cy = px + dist * np.cos(angle), py + dist * np.sin(angle)
            if not (r <= cx <= S - r and r <= cy <= S - r):
                continue
        else:
            cx, cy = rng.uniform(r, S - r, 2)
        if all(np.hypot(cx - px, cy - py) >= MIN_GAP * (r + pr) for px, py, pr in placed):
            return float(cx), float(cy), float(r)
    return None


def _visible_masks(coverages, S: int) -> list[np.ndarray]:
    """Visible (coverage >= 0.5, not under a later object) mask of each object: (H, W) bool."""
    masks = []
    for window, alpha in coverages:
        mask = np.zeros((S, S), dtype=bool)  # (H, W)
        mask[window] = alpha >= 0.5
        for m in masks:
            m &= ~mask
        masks.append(mask)
    return masks


def _drop_hidden(specs: list, coverages: list, S: int) -> tuple[list, list]:
    """Leave out, one at a time, the most hidden object while one shows < MIN_VISIBLE of itself."""
    while specs:
        masks = _visible_masks(coverages, S)
        shown = [m.sum() / max(int((a >= 0.5).sum()), 1) for m, (_, a) in zip(masks, coverages)]
        worst = int(np.argmin(shown))
        if shown[worst] >= MIN_VISIBLE:
            break
        logger.debug("dense scene: %s %s shows %.0f%% of itself, left out",
                     specs[worst].color, specs[worst].shape, 100 * shown[worst])
        del specs[worst], coverages[worst]
    return specs, coverages


def class_map_of(objects, coverages, size: int, antialias: bool = True) -> np.ndarray:
    """Semantic class map of objects drawn in order.

    Parameters
    ----------
    objects : sequence of ObjectGT
        With their visible (disjoint) masks.
    coverages : sequence of (window, alpha)
        :func:`~.render.coverage` of each object, same order.
    size : int
        Image side.
    antialias : bool, default True
        Mark the blended edge pixels :data:`IGNORE_INDEX`: those where the topmost object
        with non-zero coverage covers the pixel only partly.

    Returns
    -------
    ndarray of uint8, shape (size, size)
    """
    class_map = np.zeros((size, size), dtype=np.uint8)  # (H, W)
    for obj in objects:
        class_map[obj.mask] = CLASS_IDS[obj.shape]
    if antialias:
        top = np.zeros((size, size), dtype=np.float32)  # coverage of the topmost object touching each pixel
        for window, alpha in coverages:
            top[window] = np.where(alpha > 0, alpha, top[window])
        class_map[(top > 0) & (top < 1)] = IGNORE_INDEX
    return class_map


def dense_scene(world: ShapesWorld, split: str, index: int) -> DenseScene:
    """Dense scene ``index`` of ``split``: objects, class map, masks, boxes, captions.

    Parameters
    ----------
    world : ShapesWorld
        Usually :func:`dense_world`; its ``image_size`` and ``n_objects`` set the scene's
        size and object count, its ``heldout``/``ood_shapes`` which objects the split
        may draw (as for :meth:`ShapesWorld.scene`).
    split : str
    index : int
        ``0 <= index < world.split_sizes[split]``.

    Returns
    -------
    DenseScene

    Raises
    ------
    UsageError
        Unknown split.
    IndexError
        ``index`` out of range.
    """
    world.split(split)  # validates the name
    index = int(index)
    if not 0 <= index < world.split_sizes[split]:
        raise IndexError(f"index {index} out of range for split {split!r} of {world.split_sizes[split]} scenes")
    S = world.image_size
    rng = np.random.default_rng([world.seed, SPLIT_IDS[split], index])
    lo, hi = world.n_objects
    n = int(rng.integers(lo, hi + 1))
    specs, placed = [], []
    for _ in range(n):
        color, shape = world._attributes(split, rng)
        size_word = SIZES[rng.integers(2)]
        spot = _place(size_word, placed, S, rng)
        if spot is None:
            logger.debug("dense scene %s/%d: no room for a %s %s, left out", split, index, color, shape)
            continue
        cx, cy, r = spot
        placed.append((cx, cy, r))
        specs.append(ObjectSpec(shape, color, size_word, cx, cy, r, jitter_color(color, rng)))
    coverages = [render.coverage(s.shape, s.cx, s.cy, s.r, S, world.antialias) for s in specs]
    specs, coverages = _drop_hidden(specs, coverages, S)
    if not specs:
        raise UsageError(f"dense scene {split}/{index}: no object fits in {S} px; use a larger image_size")

    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if rng.random() < world.spurious:
        bg = SPURIOUS_BACKGROUND[specs[0].shape]
    drng = np.random.default_rng([world.seed, SPLIT_IDS[split], index, 1])  # defects' own stream
    scene = world.compose(specs, bg, rng, drng, split=split, index=index)
    class_map = class_map_of(scene.objects, coverages, S, world.antialias)
    return DenseScene(scene.image, scene.objects, scene.background, scene.captions, scene.defects,
                      scene.split, scene.index, class_map=class_map, specs=list(specs))


def dense_scenes(world: ShapesWorld, split: str, n: int, *, progress: bool | None = False, desc: str = "render"):
    """Dense scenes ``0 .. n-1`` of ``split``, generated lazily (with a progress bar on request)."""
    from ..._progress import progress_bar

    return progress_bar((dense_scene(world, split, i) for i in range(n)), progress=progress, total=n,
                        desc=desc, unit="img")


# ------------------------------------------------------------------ tasks


def _dense_meta(request: TaskRequest, world: ShapesWorld, names: list[str]) -> dict:
    meta = dict(request.meta)
    meta["classes"] = [c for c in names if c == "background" or c in world.shapes_of(request.split)]
    return meta


@register_task("seg", data="segmentation",
               help="semantic segmentation of 256 px scenes of 3-12 overlapping shapes (class maps, 255 = ignore)")
def seg(request: TaskRequest) -> SegmentationData:
    """``shapes:seg``: dense scenes of :func:`dense_world` with their class maps.

    ``classnames`` is :data:`CLASSNAMES` (index = class id, ``0`` background) in every
    split; ``meta["classes"]`` lists the ones the split can draw (shapes-tiny keeps
    ``heart`` and ``crescent`` out of train/val/test).
    """
    world = request.sized(dense_world(request.world))
    images, maps = [], []
    for scene in dense_scenes(world, request.split, request.n, progress=None, desc=request.name):
        images.append(scene.image)
        maps.append(scene.class_map)
    return SegmentationData(images, maps, list(CLASSNAMES), request.name, ignore_index=IGNORE_INDEX,
                            meta=_dense_meta(request, world, list(CLASSNAMES)))


@register_task("det", data="detection",
               help="open-vocabulary detection of shapes in 256 px scenes of 3-12 overlapping objects")
def det(request: TaskRequest) -> DetectionData:
    """``shapes:det``: dense scenes of :func:`dense_world` with a labelled box per object.

    ``classnames`` is :data:`SHAPES` (label ``k`` is class id ``k + 1`` of the class maps
    and the COCO ``category_id``); ``meta["classes"]`` lists the shapes the split can
    draw.  Colours and captions of the objects are in :func:`dense_scene`.
    """
    world = request.sized(dense_world(request.world))
    images, boxes, labels = [], [], []
    for scene in dense_scenes(world, request.split, request.n, progress=None, desc=request.name):
        images.append(scene.image)
        boxes.append([o.box for o in scene.objects])
        labels.append([SHAPES.index(o.shape) for o in scene.objects])
    return DetectionData(images, boxes, labels, list(SHAPES), request.name,
                         meta=_dense_meta(request, world, list(SHAPES)))
