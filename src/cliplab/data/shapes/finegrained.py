"""Fine-grained and ordinal ShapesWorld tasks: counting, size, spatial relations, one-detail pairs.

The tasks where CLIP models are known to be weak (counting, size comparison, "left of"
versus "right of", images that differ in one detail: Tong et al., "Eyes Wide Shut?
Exploring the Visual Shortcomings of Multimodal LLMs", CVPR 2024, arXiv:2401.06209, the
MMVP benchmark).  Each task places its own objects (:class:`~.world.ObjectSpec`) and
renders them with :meth:`ShapesWorld.compose <cliplab.data.shapes.ShapesWorld.compose>`,
so every rendering option of the world applies.  Scene ``i`` of a split is drawn from
``np.random.default_rng([seed, split_id, i, stream])`` with one ``stream`` per task
(:data:`STREAMS`): a pure function of the seed, independent of every other task.  In
``train`` and ``val`` no object has a held-out (colour, shape) pair of the world.

Tasks (``shapes:<name>``):

``count``
    1-6 objects of one kind (same shape and colour, not touching); 6 classes ``"one
    shape"`` ... ``"six shapes"`` with the template ``"a photo of {c}."``.
``size``
    One object in one of 4 size bins (:data:`SIZE_BINS`: tiny, small, large, huge).
``size-order``
    Two objects of one kind side by side, one clearly larger (radius ratio 1.4-2.2):
    ``"a large shape on the left and a small shape on the right"`` or the reverse.
``relation``
    A red and a blue object (random shapes); 4 classes ``"a red shape left of a blue
    shape"``, ``right of``, ``above``, ``below``.
``pairs``
    MMVP-style pairs (a :class:`~cliplab.data.datasets.RetrievalData`): images ``2p`` and
    ``2p + 1`` differ only in the size, the position or the number of one kind of object
    (same background pixels), each with its own caption; score with
    :func:`cliplab.eval.metrics.pair_accuracy` (a pair counts only when both images pick
    their own caption).  ``n`` is the number of pairs (``2 n`` images).

Ground truth per example
------------------------
Every task stores per-example arrays in ``data.attributes`` (lists of length N, kept
in step by ``subset``): ``count`` (objects in the image), ``area`` (visible object pixels,
the sum over objects), and task-specific ones: ``radius`` (``size``), ``area_left``,
``area_right`` (``size-order``), ``captions`` (``relation``: the four relation captions
with the actual shapes, true one at ``labels[i]``), ``pair``, ``detail``, ``side``
(``pairs``).  Ordinal ground truth (``count``, ``area``) is what a text-driven ranking
("a photo of many shapes", "a large shape") is scored against, e.g. with
:func:`cliplab.eval.metrics.rank_correlation`.
"""

from __future__ import annotations

import numpy as np

from ...errors import UsageError
from ..datasets import ClassificationData, RetrievalData
from .long_captions import count_phrase
from .tasks import TaskRequest, register_task
from .world import BACKGROUNDS, COLORS, SPLIT_IDS, ObjectSpec, Scene, ShapesWorld, jitter_color

__all__ = ["PAIR_DETAILS", "RELATIONS", "SIZE_BINS", "SIZE_ORDER_CLASSES", "STREAMS", "allowed_kinds", "place",
           "scene_rng", "count_scene", "size_scene", "size_order_scene", "relation_scene", "pair_scenes",
           "count_data", "size_data", "size_order_data", "relation_data", "pair_data"]

STREAMS: dict[str, int] = {"count": 101, "size": 102, "size-order": 103, "relation": 104, "pairs": 105,
                           "spurious": 201}
"""The fourth seed word of each task's per-scene random stream."""

SIZE_BINS: dict[str, tuple[float, float]] = {
    "tiny": (0.05, 0.085), "small": (0.10, 0.14), "large": (0.18, 0.24), "huge": (0.27, 0.33),
}
"""Size bins of ``shapes:size``: half-extent / image side, drawn uniformly within the bin."""

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""The relations of ``shapes:relation``: where the red object lies relative to the blue one."""

PAIR_DETAILS: tuple[str, ...] = ("size", "position", "count")
"""What the two images of a ``shapes:pairs`` pair differ in (pair ``p`` has ``PAIR_DETAILS[p % 3]``)."""

_COUNT_RADIUS = (0.08, 0.11)
_SIZE_WORD = {"tiny": "small", "small": "small", "large": "large", "huge": "large"}
_TRIES = 400


def scene_rng(world: ShapesWorld, split: str, index: int, task: str) -> np.random.Generator:
    """The random stream of scene ``index`` of ``split`` of ``task`` (:data:`STREAMS`)."""
    return np.random.default_rng([world.seed, SPLIT_IDS[split], int(index), STREAMS[task]])


def allowed_kinds(world: ShapesWorld, split: str, colors=COLORS) -> list[tuple[str, str]]:
    """The (colour, shape) pairs ``split`` may draw: its shapes, minus held-out pairs in train/val."""
    avoid = set(world.heldout) if split in ("train", "val") else set()
    return [(c, s) for c in colors for s in world.shapes_of(split) if (c, s) not in avoid]


def _kind(world, split, rng, colors=COLORS) -> tuple[str, str]:
    kinds = allowed_kinds(world, split, colors)
    return kinds[rng.integers(len(kinds))]


def place(radii, size: int, rng: np.random.Generator, *, gap: float = 1.0, margin: float = 1.0):
    """Centres for objects of half-extents ``radii`` that do not touch: list of (cx, cy).

    Centres are at least ``gap * (r_i + r_j) + 2`` pixels apart and every object lies
    ``margin`` pixels inside the image.  Rejection sampling, restarting the whole layout
    when one object finds no room.

    Raises
    ------
    RuntimeError
        No layout found (the objects are too large for the image).
    """
    for _ in range(_TRIES):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(_TRIES):
                lo, hi = r + margin, size - r - margin
                cx, cy = rng.uniform(lo, hi, 2)
                if all(np.hypot(cx - x, cy - y) >= gap * (r + q) + 2 for (x, y), q in zip(centres, radii)):
                    centres.append((float(cx), float(cy)))
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(f"no room for {len(radii)} objects of radii {list(radii)} in {size} px")


def _background(rng) -> str:
    return BACKGROUNDS[rng.integers(len(BACKGROUNDS))]


def _spec(shape, color, size_word, cx, cy, r, rng) -> ObjectSpec:
    return ObjectSpec(shape, color, size_word, cx, cy, r, jitter_color(color, rng))


def _scenes(request: TaskRequest, make) -> tuple[list[Scene], list]:
    world = request.world
    out, extra = [], []
    for i in range(request.n):
        scene, info = make(world, request.split, i, scene_rng(world, request.split, i, request.task))
        out.append(scene)
        extra.append(info)
    return out, extra


def _area(scene: Scene) -> int:
    return int(sum(int(o.mask.sum()) for o in scene.objects))


def _classification(request, scenes, labels, classnames, per_item, template) -> ClassificationData:
    meta = dict(request.meta, templates=[template])
    attributes = {"count": [len(s.objects) for s in scenes], "area": [_area(s) for s in scenes], **per_item}
    data = ClassificationData([s.image for s in scenes], np.asarray(labels, np.int64), classnames, request.name,
                              meta=meta, attributes=attributes)
    return data


# ----------------------------------------------------------------------------- count


def count_scene(world: ShapesWorld, split: str, index: int, rng: np.random.Generator, k: int | None = None):
    """A scene of ``k`` (default: drawn in 1..6) non-touching objects of one kind: ``(scene, k)``."""
    k = int(rng.integers(1, 7)) if k is None else int(k)
    color, shape = _kind(world, split, rng)
    S = world.image_size
    radii = rng.uniform(*_COUNT_RADIUS, k) * S
    centres = place(radii, S, rng, gap=1.05)
    specs = [_spec(shape, color, "small", cx, cy, r, rng) for (cx, cy), r in zip(centres, radii)]
    return world.compose(specs, _background(rng), rng, split=split, index=index), k


def count_data(request: TaskRequest) -> ClassificationData:
    """``shapes:count``: 6-way counting (labels ``count - 1``)."""
    scenes, ks = _scenes(request, count_scene)
    classnames = [count_phrase(k) for k in range(1, 7)]
    return _classification(request, scenes, [k - 1 for k in ks], classnames, {}, "a photo of {c}.")


register_task("count", data="classification",
              help="counting: 1-6 objects of one kind, classes 'one shape' ... 'six shapes'")(count_data)


# ----------------------------------------------------------------------------- size


def size_scene(world: ShapesWorld, split: str, index: int, rng: np.random.Generator):
    """One object in a random size bin (:data:`SIZE_BINS`): ``(scene, (bin index, radius))``."""
    b = int(rng.integers(len(SIZE_BINS)))
    name = list(SIZE_BINS)[b]
    color, shape = _kind(world, split, rng)
    S = world.image_size
    r = rng.uniform(*SIZE_BINS[name]) * S
    (cx, cy), = place([r], S, rng)
    spec = _spec(shape, color, _SIZE_WORD[name], cx, cy, r, rng)
    return world.compose([spec], _background(rng), rng, split=split, index=index), (b, float(r))


def size_data(request: TaskRequest) -> ClassificationData:
    """``shapes:size``: 4 size bins of one object; ``attributes["area"]``, ``["radius"]``."""
    scenes, info = _scenes(request, size_scene)
    classnames = [f"a {name} shape" for name in SIZE_BINS]
    return _classification(request, scenes, [b for b, _ in info], classnames,
                           {"radius": [r for _, r in info]}, "a photo of {c}.")


register_task("size", data="classification",
              help="size bins of one object: tiny, small, large, huge (area in attributes)")(size_data)


# ----------------------------------------------------------------------------- size order

SIZE_ORDER_CLASSES = ("a large shape on the left and a small shape on the right",
                      "a small shape on the left and a large shape on the right")


def size_order_scene(world: ShapesWorld, split: str, index: int, rng: np.random.Generator):
    """Two objects of one kind, each inside its half of the image, one larger: ``(scene, label)``
    (0: the left one is larger)."""
    label = int(rng.integers(2))
    color, shape = _kind(world, split, rng)
    S = world.image_size
    big = rng.uniform(0.15, 0.21) * S
    small = big / rng.uniform(1.4, 2.2)
    radii = (big, small) if label == 0 else (small, big)
    y = rng.uniform(0.35, 0.65, 2) * S
    left_x = rng.uniform(radii[0] + 1, S / 2 - radii[0] - 1)  # each object inside its half
    right_x = rng.uniform(S / 2 + radii[1] + 1, S - radii[1] - 1)
    specs = [_spec(shape, color, "large" if r == big else "small", x, float(np.clip(yy, r + 1, S - r - 1)), r, rng)
             for x, yy, r in zip((left_x, right_x), y, radii)]
    return world.compose(specs, _background(rng), rng, split=split, index=index), label


def size_order_data(request: TaskRequest) -> ClassificationData:
    """``shapes:size-order``: which of two objects is larger; ``attributes["area_left"]``, ``["area_right"]``."""
    scenes, labels = _scenes(request, size_order_scene)
    per_item = {"area_left": [int(s.objects[0].mask.sum()) for s in scenes],
                "area_right": [int(s.objects[1].mask.sum()) for s in scenes]}
    return _classification(request, scenes, labels, list(SIZE_ORDER_CLASSES), per_item, "a photo of {c}.")


register_task("size-order", data="classification",
              help="which of two objects side by side is larger (left or right)")(size_order_data)


# ----------------------------------------------------------------------------- relation


def relation_scene(world: ShapesWorld, split: str, index: int, rng: np.random.Generator):
    """A red object ``RELATIONS[label]`` a blue one: ``(scene, (label, four captions))``.

    The red object is drawn first.  Its offset from the blue one is mostly along the
    relation's axis (the other component at most 0.35 of it), and they do not touch.
    """
    label = int(rng.integers(len(RELATIONS)))
    red = _kind(world, split, rng, ("red",))[1]
    blue = _kind(world, split, rng, ("blue",))[1]
    S = world.image_size
    ra, rb = rng.uniform(0.09, 0.14, 2) * S
    for _ in range(_TRIES):
        d = rng.uniform(ra + rb + 3, 0.75 * S)
        along, across = d, rng.uniform(-0.35, 0.35) * d
        dx, dy = {"left of": (-along, across), "right of": (along, across),
                  "above": (across, -along), "below": (across, along)}[RELATIONS[label]]
        bx, by = rng.uniform(rb + 1, S - rb - 1, 2)
        ax, ay = bx + dx, by + dy
        if ra + 1 <= ax <= S - ra - 1 and ra + 1 <= ay <= S - ra - 1:
            break
    else:  # pragma: no cover - the geometry always leaves room at 16 px and up
        raise RuntimeError(f"no room for a {RELATIONS[label]} layout in {S} px")
    specs = [_spec(red, "red", "small", ax, ay, ra, rng), _spec(blue, "blue", "small", bx, by, rb, rng)]
    captions = [f"a red {red} {rel} a blue {blue}" for rel in RELATIONS]
    return world.compose(specs, _background(rng), rng, split=split, index=index), (label, captions)


def relation_data(request: TaskRequest) -> ClassificationData:
    """``shapes:relation``: 4-way spatial relation of a red to a blue object."""
    scenes, info = _scenes(request, relation_scene)
    classnames = [f"a red shape {rel} a blue shape" for rel in RELATIONS]
    return _classification(request, scenes, [lab for lab, _ in info], classnames,
                           {"captions": [caps for _, caps in info]}, "a photo of {c}.")


register_task("relation", data="classification",
              help="spatial relation of a red to a blue object: left of, right of, above, below")(
    relation_data)


# ----------------------------------------------------------------------------- pairs


def pair_scenes(world: ShapesWorld, split: str, index: int, detail: str | None = None):
    """Pair ``index``: two scenes that differ only in ``detail`` and their two captions.

    Returns
    -------
    (Scene, Scene), (str, str), str
        The images, their captions, and the detail (``"size"``, ``"position"`` or ``"count"``).
        Both scenes are composed with the same random stream, so the background pixels
        and every object not changed are identical.
    """
    detail = PAIR_DETAILS[index % len(PAIR_DETAILS)] if detail is None else detail
    rng = scene_rng(world, split, index, "pairs")
    color, shape = _kind(world, split, rng)
    S = world.image_size
    bg = _background(rng)
    rgb = jitter_color(color, rng)
    if detail == "size":
        small, large = rng.uniform(0.10, 0.13) * S, rng.uniform(0.21, 0.25) * S
        cx, cy = rng.uniform(large + 1, S - large - 1, 2)
        variants = [[(cx, cy, small, "small")], [(cx, cy, large, "large")]]
        captions = (f"a small {color} {shape}", f"a large {color} {shape}")
    elif detail == "position":
        r = rng.uniform(0.12, 0.17) * S
        if rng.random() < 0.5:
            y = rng.uniform(S / 3 + 1, 2 * S / 3 - 1)
            a, b = rng.uniform(r + 1, S / 3 - 1), rng.uniform(2 * S / 3 + 1, S - r - 1)
            variants = [[(a, y, r, "small")], [(b, y, r, "small")]]
            captions = (f"a {color} {shape} on the left", f"a {color} {shape} on the right")
        else:
            x = rng.uniform(S / 3 + 1, 2 * S / 3 - 1)
            a, b = rng.uniform(r + 1, S / 3 - 1), rng.uniform(2 * S / 3 + 1, S - r - 1)
            variants = [[(x, a, r, "small")], [(x, b, r, "small")]]
            captions = (f"a {color} {shape} at the top", f"a {color} {shape} at the bottom")
        if rng.random() < 0.5:  # which of the two comes first
            variants, captions = variants[::-1], captions[::-1]
    elif detail == "count":
        k = int(rng.integers(1, 4))
        radii = rng.uniform(*_COUNT_RADIUS, k + 1) * S
        centres = place(radii, S, rng, gap=1.05)
        objs = [(cx, cy, r, "small") for (cx, cy), r in zip(centres, radii)]
        variants = [objs[:k], objs]
        captions = (f"{count_phrase(k, f'{color} {shape}')}", f"{count_phrase(k + 1, f'{color} {shape}')}")
    else:
        raise UsageError(f"unknown pair detail {detail!r}; choose one of {', '.join(PAIR_DETAILS)}")
    seed = int(rng.integers(2**63))
    scenes = tuple(
        world.compose([ObjectSpec(shape, color, z, cx, cy, r, rgb) for cx, cy, r, z in objs], bg,
                      np.random.default_rng(seed), split=split, index=index)
        for objs in variants)
    return scenes, tuple(captions), detail


def pair_data(request: TaskRequest) -> RetrievalData:
    """``shapes:pairs``: ``n`` one-detail image pairs (``2 n`` images, one caption each)."""
    items, captions, pair, detail, side, count, area = [], [], [], [], [], [], []
    for p in range(request.n):
        scenes, caps, what = pair_scenes(request.world, request.split, p)
        for j, (s, c) in enumerate(zip(scenes, caps)):
            items.append(s.image)
            captions.append([c])
            pair.append(p)
            detail.append(what)
            side.append(j)
            count.append(len(s.objects))
            area.append(_area(s))
    attributes = {"pair": pair, "detail": detail, "side": side, "count": count, "area": area}
    return RetrievalData(items, captions, request.name, meta=dict(request.meta), attributes=attributes)


register_task("pairs", data="retrieval",
              help="MMVP-style image pairs that differ only in size, position or count of one object")(
    pair_data)

