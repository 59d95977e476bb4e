"""Industrial-inspection scenes: one object per image on a textured surface, normal or defective.

The ground truth of anomaly detection (``shapes:inspection``, MVTec AD-style folders of
``cliplab shapes export --task inspection --format mvtec``).  Each category is one
ShapesWorld shape with a fixed colour on a fixed surface (:data:`CATEGORIES`); normal
instances vary only a little (position, size, colour, texture phase, lighting), so a
defect is anything outside that range:

``scratch``
    A thin light or dark line across the object.
``hole``
    A dark round hole inside the object.
``stain``
    A brown translucent blot on the object.
``missing_part``
    A bite taken out of the object; the surface shows through.
``wrong_color``
    The whole object in another palette colour, far from the category's.
``misplaced``
    The object shifted well outside the normal position range.

Every image is a pure function of ``(seed, category, split, index, defect)`` and comes with
a pixel mask of the defect: the painted defect pixels (coverage >= 0.5) on the object for
the first three, the removed object pixels for ``missing_part``, the object for
``wrong_color``, and the pixels where the object is in one image but not the other of the
normal and the shifted placement for ``misplaced``.

>>> from cliplab.data.shapes.inspection import inspection_scene
>>> s = inspection_scene("star", "test", 0, defect="hole")
>>> s.image.shape, s.mask.dtype.name, bool(s.mask.any()), s.is_anomalous
((256, 256, 3), 'bool', True, True)

Splits: ``train`` and ``val`` hold normal images only; ``test`` holds normal and
defective ones.  The three draw from separate streams, so no image is in two splits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import UsageError
from ...validation import check_positive_int
from ..datasets import AnomalyData
from . import render
from .tasks import TaskRequest, register_task
from .world import COLORS, SHAPES, SPLIT_IDS, _box

logger = logging.getLogger("cliplab.data.shapes")

__all__ = [
    "CATEGORIES",
    "INSPECTION_DEFECTS",
    "INSPECTION_IMAGE_SIZE",
    "SURFACES",
    "Category",
    "InspectionScene",
    "InspectionWorld",
    "export_mvtec",
    "inspection_scene",
]

SURFACES: tuple[str, ...] = ("wood", "metal", "fabric")
"""Procedural surface textures."""

INSPECTION_DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain", "missing_part", "wrong_color", "misplaced")
"""Defect types, as the MVTec ``test/<defect>`` folder names."""

INSPECTION_IMAGE_SIZE = 256
"""Default image side of inspection scenes in pixels."""

INSPECTION_SPLITS: tuple[str, ...] = ("train", "val", "test")

_STREAM = 7  # first word of every inspection seed, apart from ShapesWorld scene streams
_RADIUS = 0.28  # object half-extent / image side
_POSE_JITTER = 0.03  # normal centre offset, fraction of the side, per axis
_SIZE_JITTER = 0.03  # normal relative size change
_COLOR_JITTER = 6.0
_SHIFT = (0.16, 0.22)  # misplacement distance, fraction of the side


@dataclass(frozen=True)
class Category:
    """An inspection category: one shape, one colour, one surface."""

    name: str
    shape: str
    color: str
    surface: str


#: One category per shape, named after it; colours and surfaces spread over the palette.
CATEGORIES: dict[str, Category] = {
    s: Category(s, s, COLORS[(3 * i) % len(COLORS)], SURFACES[i % len(SURFACES)]) for i, s in enumerate(SHAPES)
}


@dataclass
class InspectionScene:
    """One inspection image with its ground truth.

    Attributes
    ----------
    image : ndarray of uint8, shape (H, W, 3)
    mask : ndarray of bool, shape (H, W)
        Defect pixels; all ``False`` for a normal image.
    category : str
    defect : str
        ``"good"`` or one of :data:`INSPECTION_DEFECTS`.
    object_mask : ndarray of bool, shape (H, W)
        The object's pixels (coverage >= 0.5) as drawn.
    box : tuple of int
        ``(x0, y0, x1, y1)`` of ``object_mask``, ``x1``/``y1`` exclusive.
    split : str
    index : int
    """

    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    category: str
    defect: str
    object_mask: np.ndarray = field(repr=False)
    box: tuple
    split: str
    index: int

    @property
    def is_anomalous(self) -> bool:
        return self.defect != "good"


# ------------------------------------------------------------------ surfaces


def _smooth_noise(n: int, rng: np.random.Generator, width: float) -> np.ndarray:
    """1-D noise smoothed by a Gaussian of ``width`` samples: (n,) float32, unit std."""
    raw = rng.standard_normal(n + 64)
    k = np.exp(-0.5 * (np.arange(-32, 33) / max(width, 0.5)) ** 2)
    out = np.convolve(raw, k / k.sum(), mode="same")[32:32 + n]
    return ((out - out.mean()) / (out.std() + 1e-6)).astype(np.float32)


def surface(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural surface texture: float32 (size, size, 3), 0-255.

    ``wood``: brown with wavy grain lines; ``metal``: brushed grey with horizontal streaks
    and a soft highlight; ``fabric``: a plain weave of light threads.  The parameters vary
    a little per image (phase, period, tint) so normal images are never identical.
    """
    c = (np.arange(size, dtype=np.float32) + 0.5) / size  # (S,) in (0, 1)
    x, y = c[None, :], c[:, None]
    if kind == "wood":
        base = np.array([150.0, 104.0, 62.0], np.float32) + rng.uniform(-8, 8)
        warp = (0.04 * np.sin(2 * np.pi * (1.5 * x + rng.uniform()))
                + 0.02 * np.sin(2 * np.pi * (4.0 * x + rng.uniform())))
        grain = np.sin(2 * np.pi * (y + warp) * rng.uniform(9.0, 12.0) + rng.uniform(0, 2 * np.pi))  # (S, S)
        fine = _smooth_noise(size, rng, 1.0)[:, None] * 0.5
        lum = 1.0 + 0.10 * grain + 0.03 * fine  # (S, S)
        return base * lum[..., None]
    if kind == "metal":
        base = np.full(3, rng.uniform(150.0, 165.0), np.float32) + np.array([-3.0, 0.0, 4.0], np.float32)
        streaks = _smooth_noise(size, rng, 0.8)[:, None] * 6.0  # (S, 1) per-row brushing
        grit = rng.standard_normal((size, size)).astype(np.float32) * 3.0
        a = rng.uniform(0, 2 * np.pi)
        glow = 14.0 * np.cos(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) * 0.6)  # (S, S) soft highlight
        return base + (streaks + grit + glow)[..., None]
    if kind == "fabric":
        base = np.array([118.0, 124.0, 150.0], np.float32) + rng.uniform(-8, 8)
        period = rng.uniform(0.028, 0.034)
        px, py = rng.uniform(0, period, 2)
        u, v = (x + px) / period, (y + py) / period  # thread coordinates
        warp = 0.5 + 0.5 * np.cos(2 * np.pi * u)  # (1, S) vertical threads
        weft = 0.5 + 0.5 * np.cos(2 * np.pi * v)  # (S, 1) horizontal threads
        over = (np.floor(u) + np.floor(v)) % 2 == 0  # (S, S) which thread lies on top
        lum = np.where(over, warp, weft) * 0.16 + 0.92
        return base * lum[..., None]
    raise ValueError(f"unknown surface {kind!r}")


# ------------------------------------------------------------------ scenes


def _far_color(color: str, rng: np.random.Generator) -> str:
    """A palette colour at least 150 RGB units from ``color``."""
    ref = np.asarray(render.PALETTE[color], np.float32)
    far = [c for c in COLORS if np.linalg.norm(np.asarray(render.PALETTE[c], np.float32) - ref) >= 150]
    return far[rng.integers(len(far))]


def _disc(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage of a disc: (size, size) float32."""
    c = np.arange(size, dtype=np.float32) + 0.5
    sdf = np.hypot(c[None, :] - cx, c[:, None] - cy) - r
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _inside_point(alpha: np.ndarray, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A pixel centre well inside the object (eroded by ``margin`` px when possible)."""
    inside = alpha >= 1.0
    if margin >= 1:
        core = inside.copy()
        m = int(margin)
        core[m:, :] &= inside[:-m, :]
        core[:-m, :] &= inside[m:, :]
        core[:, m:] &= inside[:, :-m]
        core[:, :-m] &= inside[:, m:]
        inside = core if core.any() else inside
    rows, cols = np.nonzero(inside)
    k = rng.integers(len(rows))
    return float(cols[k]) + 0.5, float(rows[k]) + 0.5


class InspectionWorld:
    """Inspection scenes of every category, normal and defective.

    Parameters
    ----------
    seed : int, default 0
    image_size : int, default 256
        Image side in pixels (>= 32).
    categories : sequence of str, optional
        Names of :data:`CATEGORIES` to use; default all.

    Examples
    --------
    >>> w = InspectionWorld(seed=0, image_size=64, categories=["circle"])
    >>> w.scene("circle", "train", 0).defect
    'good'
    """

    def __init__(self, seed: int = 0, image_size: int = INSPECTION_IMAGE_SIZE, categories=None):
        if int(seed) != seed or seed < 0:
            raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
        if int(image_size) != image_size or image_size < 32:
            raise UsageError(f"image_size must be an integer >= 32, got {image_size!r}")
        categories = tuple(CATEGORIES) if categories is None else tuple(categories)
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown or not categories:
            raise UsageError(f"unknown inspection categories {unknown}; choose from {', '.join(CATEGORIES)}")
        self.seed, self.image_size, self.categories = int(seed), int(image_size), categories

    def config(self) -> dict:
        """The constructor arguments as plain data."""
        return {"seed": self.seed, "image_size": self.image_size, "categories": list(self.categories)}

    def __repr__(self) -> str:
        return f"InspectionWorld(seed={self.seed}, image_size={self.image_size}, categories={len(self.categories)})"

    def scene(self, category: str, split: str, index: int, defect: str | None = None) -> InspectionScene:
        """Image ``index`` of ``category`` in ``split``, normal or with ``defect``.

        Parameters
        ----------
        category : str
            One of ``self.categories``.
        split : {"train", "val", "test"}
        index : int
            >= 0; every index is a different instance.
        defect : str, optional
            One of :data:`INSPECTION_DEFECTS` (``test`` only); ``None`` or ``"good"`` for
            a normal image.

        Raises
        ------
        UsageError
            Unknown category, split or defect, or a defect outside ``test``.
        """
        if category not in self.categories:
            raise UsageError(f"unknown inspection category {category!r}; choose from {', '.join(self.categories)}")
        if split not in INSPECTION_SPLITS:
            raise UsageError(f"unknown split {split!r}; inspection scenes have {', '.join(INSPECTION_SPLITS)}")
        defect = "good" if defect is None else defect
        if defect != "good" and defect not in INSPECTION_DEFECTS:
            raise UsageError(f"unknown defect {defect!r}; choose from good, {', '.join(INSPECTION_DEFECTS)}")
        if defect != "good" and split != "test":
            raise UsageError(f"defects are only in the test split (train and val are normal), got {split!r}")
        index = int(index)
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        kind = 0 if defect == "good" else 1 + INSPECTION_DEFECTS.index(defect)
        rng = np.random.default_rng([_STREAM, self.seed, SHAPES.index(category), SPLIT_IDS[split], index, kind])
        return self._render(CATEGORIES[category], defect, rng, split, index)

    def _render(self, cat: Category, defect: str, rng: np.random.Generator, split: str, index: int):
        S = self.image_size
        image = surface(cat.surface, S, rng)  # (S, S, 3) float32
        light = rng.uniform(0.95, 1.05)

        # the normal instance: centre, size and colour in a narrow range
        cx, cy = (0.5 + rng.uniform(-_POSE_JITTER, _POSE_JITTER, 2)) * S
        r = _RADIUS * S * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
        color = cat.color
        rgb = np.asarray(render.PALETTE[color], np.float32) + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, 3)

        def coverage(x, y):
            window, a = render.coverage(cat.shape, x, y, r, S, True)
            full = np.zeros((S, S), np.float32)  # (H, W)
            full[window] = a
            return full

        alpha = coverage(cx, cy)
        mask = np.zeros((S, S), dtype=bool)
        if defect == "misplaced":
            normal = alpha >= 0.5
            dist = rng.uniform(*_SHIFT) * S
            for _ in range(50):  # a direction that keeps the object inside the image
                a = rng.uniform(0, 2 * np.pi)
                nx, ny = cx + dist * np.cos(a), cy + dist * np.sin(a)
                if r <= nx <= S - r and r <= ny <= S - r:
                    break
            cx, cy = float(np.clip(nx, r, S - r)), float(np.clip(ny, r, S - r))
            alpha = coverage(cx, cy)
            mask = normal ^ (alpha >= 0.5)
        elif defect == "wrong_color":
            color = _far_color(cat.color, rng)
            rgb = np.asarray(render.PALETTE[color], np.float32) + rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, 3)
            mask = alpha >= 0.5
        elif defect == "missing_part":
            whole = alpha >= 0.5
            for _ in range(50):  # a bite from the rim that removes a visible part
                a = rng.uniform(0, 2 * np.pi)
                rad = rng.uniform(0.35, 0.5) * r
                bite = _disc(S, cx + 0.85 * r * np.cos(a), cy + 0.85 * r * np.sin(a), rad)
                cut = alpha * (1.0 - bite)
                mask = whole & ~(cut >= 0.5)
                if mask.sum() >= 0.04 * whole.sum():
                    break
            alpha = cut
        render.paint(image, (slice(0, S), slice(0, S)), alpha, rgb)
        object_mask = alpha >= 0.5

        if defect in ("scratch", "hole", "stain"):
            geom, paint_rgb, opacity = self._surface_defect(defect, alpha, r, rng)
            on_object = geom * alpha  # (S, S) defects stay on the object
            render.paint(image, (slice(0, S), slice(0, S)), on_object * opacity, paint_rgb)
            mask = on_object >= 0.5
        image *= light
        out = np.clip(image + 0.5, 0, 255).astype(np.uint8)  # (H, W, 3)
        return InspectionScene(out, mask, cat.name, defect, object_mask, _box(object_mask), split, index)

    def _surface_defect(self, kind: str, alpha: np.ndarray, r: float, rng: np.random.Generator):
        """Geometry (coverage (S, S)), colour and opacity of a scratch, hole or stain on the object."""
        S = self.image_size
        c = np.arange(S, dtype=np.float32) + 0.5
        xs, ys = c[None, :], c[:, None]
        if kind == "scratch":
            p0 = np.array(_inside_point(alpha, rng, 0.2 * r))
            a = rng.uniform(0, 2 * np.pi)
            p1 = p0 + rng.uniform(0.6, 1.1) * r * np.array([np.cos(a), np.sin(a)])
            width = max(0.8, rng.uniform(0.006, 0.010) * S)
            sdf = render._segment_sdf(xs, ys, p0, p1, width)
            shade = 240.0 if rng.random() < 0.5 else 25.0
            return np.clip(0.5 - sdf, 0.0, 1.0), np.full(3, shade, np.float32), 1.0
        if kind == "hole":
            rad = max(1.5, rng.uniform(0.10, 0.18) * r)
            x, y = _inside_point(alpha, rng, rad)
            return _disc(S, x, y, rad), np.array([14.0, 11.0, 10.0], np.float32), 1.0
        if kind == "stain":
            x, y = _inside_point(alpha, rng, 0.25 * r)
            geom = np.zeros((S, S), np.float32)
            for _ in range(3):
                ox, oy = rng.normal(0.0, 0.08 * r, 2)
                geom = np.maximum(geom, _disc(S, x + ox, y + oy, rng.uniform(0.12, 0.22) * r))
            return geom, np.array([96.0, 62.0, 22.0], np.float32), 0.75
        raise ValueError(f"unknown surface defect {kind!r}")


def inspection_scene(category: str, split: str, index: int, defect: str | None = None, *,
                     seed: int = 0, image_size: int = INSPECTION_IMAGE_SIZE) -> InspectionScene:
    """One inspection image: ``InspectionWorld(seed, image_size).scene(category, split, index, defect)``."""
    return InspectionWorld(seed, image_size).scene(category, split, index, defect)


def mvtec_test_items(n_per_kind: int) -> list[tuple[str, int]]:
    """The ``(defect, index)`` pairs of a test set with ``n_per_kind`` images per kind: good first."""
    return [(kind, i) for kind in ("good", *INSPECTION_DEFECTS) for i in range(n_per_kind)]


# ------------------------------------------------------------------ MVTec folders and the task


def export_mvtec(world: InspectionWorld, out_dir, *, n_train: int, n_test: int,
                 progress: bool | None = None) -> list[Path]:
    """Write MVTec AD-style folders, one per category of ``world``.

    Layout (exactly MVTec AD's, so its readers work unchanged)::

        <category>/train/good/000.png ...                 n_train normal images
        <category>/test/good/000.png ...                  n_test normal images
        <category>/test/<defect>/000.png ...              n_test images per defect
        <category>/ground_truth/<defect>/000_mask.png ... 0 / 255 masks (L mode)

    Train images are ``train`` scenes ``0 .. n_train-1``; test images are ``test`` scenes
    ``0 .. n_test-1`` of each kind.  File names count from ``000`` (wider when needed).

    Returns
    -------
    list of Path
        The category folders.
    """
    from PIL import Image

    from ..._progress import progress_bar

    n_train = check_positive_int("n_train", n_train)
    n_test = check_positive_int("n_test", n_test)
    out = Path(out_dir)
    width = max(3, len(str(max(n_train, n_test) - 1)))
    jobs = [(c, "train", "good", i) for c in world.categories for i in range(n_train)]
    jobs += [(c, "test", kind, i) for c in world.categories for kind, i in mvtec_test_items(n_test)]
    for c in world.categories:
        (out / c / "train" / "good").mkdir(parents=True, exist_ok=True)
        for kind in ("good", *INSPECTION_DEFECTS):
            (out / c / "test" / kind).mkdir(parents=True, exist_ok=True)
        for kind in INSPECTION_DEFECTS:
            (out / c / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
    for c, split, kind, i in progress_bar(jobs, progress=progress, desc="export mvtec", unit="img"):
        scene = world.scene(c, split, i, kind)
        name = f"{i:0{width}d}"
        Image.fromarray(scene.image).save(out / c / split / kind / f"{name}.png", format="PNG")
        if kind != "good":
            m = scene.mask.astype(np.uint8) * 255  # (H, W) 0 / 255
            Image.fromarray(m, mode="L").save(out / c / "ground_truth" / kind / f"{name}_mask.png", format="PNG")
    return [out / c for c in world.categories]


@register_task("inspection", data="anomaly",
               help="anomaly detection: shapes on wood/metal/fabric, normal or with one of six defects and its mask")
def inspection(request: TaskRequest) -> AnomalyData:
    """``shapes:inspection``: the first ``n`` images of a split, cycling through the categories.

    Item ``i`` has category ``CATEGORIES[i % C]``.  In ``train`` and ``val`` every image
    is normal; in ``test`` item ``i`` has kind ``("good", *INSPECTION_DEFECTS)[(i // C) % 7]``
    (one normal image in seven).  The world is :class:`InspectionWorld` of the request's
    seed at 256 px, all categories (``data.categories`` selects a subset with
    :meth:`~cliplab.data.datasets.AnomalyData.subset`).
    """
    from ..._progress import progress_bar

    world = InspectionWorld(request.seed)
    C = len(world.categories)
    kinds = ("good", *INSPECTION_DEFECTS) if request.split == "test" else ("good",)
    images, labels, masks, categories, defects = [], [], [], [], []
    for i in progress_bar(range(request.n), progress=None, desc=request.name, unit="img"):
        j = i // C
        kind = kinds[j % len(kinds)]
        scene = world.scene(world.categories[i % C], request.split, j // len(kinds), kind)
        images.append(scene.image)
        labels.append(int(scene.is_anomalous))
        masks.append(scene.mask)
        categories.append(scene.category)
        defects.append(scene.defect)
    meta = dict(request.meta, world=world.config(), categories=list(world.categories))
    return AnomalyData(images, np.asarray(labels, np.int64), masks, categories, defects, request.name, meta=meta)
