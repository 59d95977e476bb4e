"""Subgroups and shortcuts: ShapesWorld scenes with a "site" and a protected-like attribute.

A stand-in for the hospital / scanner of medical imaging and for a demographic attribute,
each correlated with the label by a chosen amount, differently at train and at test time
(as in Waterbirds / CelebA: Sagawa et al., "Distributionally Robust Neural Networks",
ICLR 2020, arXiv:1911.08731).  Subgroup metrics, shortcut tests and attribute probes get
their ground truth from ``data.attributes``.

Every scene has one object whose shape is the label (``classes``, default ``("circle",
"hexagon")``: two shapes that look alike when small), and two nuisance attributes:

site (:data:`SITES`)
    How the image was "acquired": the background family, a colour cast, a contrast
    change and sensor noise.  ``site-a``: plain or gradient backgrounds, no cast, no noise;
    ``site-b``: striped or noisy backgrounds, a warm cast, 0.7 contrast and Gaussian noise
    (sigma 18 grey levels).
protected (:data:`PROTECTED`)
    A property of the object itself: ``solid`` fill or ``striped`` fill (every other
    3-pixel diagonal band of the object darkened by 45 %).

Class ``k``'s *aligned* site is ``SITES[k % 2]`` and its aligned protected value is
``PROTECTED[k % 2]``.  A scene has its aligned site with probability
``site_correlation`` (else the other one), and its aligned protected value with
probability ``protected_correlation``; 0.5 is independence, 1 a perfect shortcut, 0 the
reversed one.  ``train`` and ``val`` use the ``*_train`` values, ``test`` the ``*_test``
ones.  Both attributes are drawn from their own uniform numbers whatever the
correlation, so changing a correlation changes only the attributes that flip, never the
object.

Ground truth per example (``data.attributes``, lists of length N): ``site`` and
``protected`` (indices into :data:`SITES` / :data:`PROTECTED`), ``group`` (``(label *
2 + site) * 2 + protected``; names in ``data.meta["group_names"]``), ``site_aligned``
and ``protected_aligned`` (bool).  Worst-group accuracy over (label, site):
``worst_group_accuracy(pred, labels, np.c_[labels, site])``
(:func:`cliplab.eval.metrics.worst_group_accuracy`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...errors import UsageError
from ...validation import check_number
from ..datasets import ClassificationData
from .finegrained import allowed_kinds, place, scene_rng
from .tasks import TaskRequest, register_task
from .world import _RADIUS, SIZES, ObjectSpec, ShapesWorld, jitter_color  # _RADIUS: the world's own sizes

__all__ = ["DEFAULT_CLASSES", "PROTECTED", "SITES", "apply_site", "apply_texture", "spurious_data",
           "spurious_scene"]

SITES: dict[str, dict] = {
    "site-a": {"backgrounds": ("plain", "gradient"), "cast": (0.0, 0.0, 0.0), "contrast": 1.0, "noise": 0.0},
    "site-b": {"backgrounds": ("stripes", "noise"), "cast": (25.0, 8.0, -25.0), "contrast": 0.7, "noise": 18.0},
}
"""The sites: background family, colour cast (added, grey levels), contrast (about mid-grey) and noise sigma."""

PROTECTED: tuple[str, ...] = ("solid", "striped")
"""The values of the protected-like attribute (the object's fill)."""

DEFAULT_CLASSES: tuple[str, str] = ("circle", "hexagon")
"""The labels of ``shapes:spurious``: shapes of the object."""


def apply_texture(image: np.ndarray, mask: np.ndarray, period: int = 6, strength: float = 0.45) -> np.ndarray:
    """Darken every other diagonal band (``period`` pixels) of the pixels in ``mask``: uint8 (H, W, 3)."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    band = ((xx + yy) // (period // 2)) % 2 == 0                           # (H, W)
    out = image.astype(np.float32)
    out[mask & band] *= 1.0 - strength
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def apply_site(image: np.ndarray, site: str, rng: np.random.Generator) -> np.ndarray:
    """Render ``image`` (uint8 (H, W, 3)) as ``site`` acquires it: contrast, colour cast, noise."""
    spec = SITES[site]
    out = image.astype(np.float32)
    out = (out - 128.0) * spec["contrast"] + 128.0 + np.asarray(spec["cast"], np.float32)
    if spec["noise"]:
        out += rng.standard_normal(out.shape[:2] + (1,), dtype=np.float32) * spec["noise"]  # (H, W, 1)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _pick(aligned: int, n: int, correlation: float, u: float, other: int) -> int:
    """``aligned`` with probability ``correlation`` (``u`` uniform), else one of the others."""
    if u < correlation or n == 1:
        return aligned
    return [v for v in range(n) if v != aligned][other % (n - 1)]


def spurious_scene(world: ShapesWorld, split: str, index: int, *, classes=DEFAULT_CLASSES,
                   site_correlation: float = 0.9, protected_correlation: float = 0.5):
    """Scene ``index`` of the subgroup task: ``(scene, (label, site, protected))``."""
    rng = scene_rng(world, split, index, "spurious")
    label = int(rng.integers(len(classes)))
    u_site, o_site, u_prot, o_prot = rng.random(), int(rng.integers(1 << 30)), rng.random(), int(rng.integers(1 << 30))
    site = _pick(label % len(SITES), len(SITES), site_correlation, u_site, o_site)
    protected = _pick(label % len(PROTECTED), len(PROTECTED), protected_correlation, u_prot, o_prot)
    shape = classes[label]
    colors = [c for c, s in allowed_kinds(world, split) if s == shape]
    color = colors[rng.integers(len(colors))]
    S = world.image_size
    size_word = SIZES[rng.integers(len(SIZES))]
    r = rng.uniform(*_RADIUS[size_word]) * S
    (cx, cy), = place([r], S, rng)
    site_name = list(SITES)[site]
    backgrounds = SITES[site_name]["backgrounds"]
    bg = backgrounds[rng.integers(len(backgrounds))]
    spec = ObjectSpec(shape, color, size_word, cx, cy, r, jitter_color(color, rng))
    scene = world.compose([spec], bg, rng, split=split, index=index)
    image = scene.image
    if PROTECTED[protected] == "striped":
        image = apply_texture(image, scene.objects[0].mask)
    image = apply_site(image, site_name, rng)
    return replace(scene, image=image), (label, site, protected)


def spurious_data(world: ShapesWorld, split: str, n: int, *, classes=DEFAULT_CLASSES,
                  site_correlation_train: float = 0.9, site_correlation_test: float = 0.1,
                  protected_correlation_train: float = 0.7, protected_correlation_test: float = 0.3,
                  name: str = "shapes:spurious", meta: dict | None = None) -> ClassificationData:
    """The first ``n`` scenes of ``split`` of a subgroup / shortcut task.

    Parameters
    ----------
    world : ShapesWorld
        Renders the scenes (its seed, image size and held-out pairs apply).
    split : {"train", "val", "test"}
        ``train`` and ``val`` use the ``*_train`` correlations, ``test`` the ``*_test`` ones.
    n : int
    classes : sequence of str, default ("circle", "hexagon")
        Shapes of the world, one per class (at least 2).
    site_correlation_train, site_correlation_test : float in [0, 1]
        Probability that a scene has its class's aligned site (0.5: independent).
    protected_correlation_train, protected_correlation_test : float in [0, 1]
        The same for the protected-like attribute.
    name : str
    meta : dict, optional
        Extra provenance merged into ``data.meta``.

    Returns
    -------
    ClassificationData
        Class names are ``classes``; template ``"a photo of a {c}."``; per-example ground
        truth in ``data.attributes`` (module docstring).

    Raises
    ------
    UsageError
        A correlation outside [0, 1], fewer than 2 classes, or a class that is not a shape
        of the split.
    """
    for key, value in (("site_correlation_train", site_correlation_train),
                       ("site_correlation_test", site_correlation_test),
                       ("protected_correlation_train", protected_correlation_train),
                       ("protected_correlation_test", protected_correlation_test)):
        check_number(key, value, minimum=0, maximum=1)
    classes = tuple(classes)
    bad = [c for c in classes if c not in world.shapes_of(split)]
    if len(classes) < 2 or len(set(classes)) != len(classes) or bad:
        raise UsageError(f"classes must be at least 2 distinct shapes of split {split!r} "
                         f"({', '.join(world.shapes_of(split))}), got {list(classes)}")
    test = split == "test"
    sc = site_correlation_test if test else site_correlation_train
    pc = protected_correlation_test if test else protected_correlation_train
    scenes, labels, sites, prots = [], [], [], []
    for i in range(n):
        scene, (y, s, p) = spurious_scene(world, split, i, classes=classes, site_correlation=sc,
                                          protected_correlation=pc)
        scenes.append(scene)
        labels.append(y)
        sites.append(s)
        prots.append(p)
    y, s, p = np.asarray(labels), np.asarray(sites), np.asarray(prots)
    group = (y * len(SITES) + s) * len(PROTECTED) + p
    site_names = list(SITES)
    info = {
        "classes": list(classes), "sites": site_names, "protected_values": list(PROTECTED),
        "site_correlation": sc, "protected_correlation": pc,
        "correlations": {"site_train": site_correlation_train, "site_test": site_correlation_test,
                         "protected_train": protected_correlation_train,
                         "protected_test": protected_correlation_test},
        "group_names": [f"{c}/{st}/{pv}" for c in classes for st in site_names for pv in PROTECTED],
        "templates": ["a photo of a {c}."],
    }
    attributes = {"site": s, "protected": p, "group": group, "site_aligned": s == y % len(SITES),
                  "protected_aligned": p == y % len(PROTECTED)}
    data = ClassificationData([sc_.image for sc_ in scenes], y.astype(np.int64), list(classes), name,
                              meta={**(meta or {}), **info}, attributes=attributes)
    return data


@register_task("spurious", data="classification",
               help="circle vs hexagon; site (scanner-like style) 90 % aligned with the label "
                    "in train, 10 % in test; protected fill 70 % / 30 %")
def spurious(request: TaskRequest) -> ClassificationData:
    return spurious_data(request.world, request.split, request.n, name=request.name, meta=request.meta)

