"""Named ShapesWorlds: one definition of each world, shared by every part of cliplab.

``shapes-tiny`` (the default) is the world the bundled model was trained on; the
training recipe, the ``shapes:<task>`` evaluation datasets, ``cliplab demo``,
``cliplab shapes export``, the benchmarks and the model card all build it through
:func:`shapes_tiny_world`, so their splits, classes and images agree.

>>> from cliplab.data.shapes import get_world
>>> get_world("shapes-tiny").shapes_of("test")
('circle', 'square', 'triangle', 'star', 'cross', 'diamond', 'hexagon', 'ring')

Worlds
------
``shapes-tiny``
    64 px, single-object scenes, ``heart`` and ``crescent`` reserved for the ``ood``
    split (8 colours x 8 shapes = 64 in-distribution classes), held-out compositions
    :data:`~cliplab.data.shapes.DEFAULT_HELDOUT`.
``plain``
    :class:`~cliplab.data.shapes.ShapesWorld` with its own defaults: 1-3 objects and
    all 10 shapes in train/val/test.

A task renders its scenes from :func:`task_world`: one object for the classification
tasks, :data:`MULTI_OBJECTS` for captions, retrieval and detection.
"""

from __future__ import annotations

from ...errors import UsageError
from ...registry import Registry
from .world import COLORS, ShapesWorld

DEFAULT_WORLD = "shapes-tiny"
"""The world of the bundled model; what export, demo and eval use unless told otherwise."""

SHAPES_TINY_OOD: tuple[str, ...] = ("heart", "crescent")
"""Shapes the shapes-tiny world keeps out of train/val/test, for its ``ood`` split."""

MULTI_OBJECTS: tuple[int, int] = (1, 3)
"""Objects per scene of the caption, retrieval and detection tasks of a named world."""

CLASSIFICATION_TASKS: tuple[str, ...] = ("color-shape", "shape", "color")
"""Tasks whose scenes have one object, labelled by its colour and/or shape."""

WORLDS: Registry = Registry("ShapesWorld")
"""The named worlds: ``fn(seed=0, **options) -> ShapesWorld``, each with a one-line ``help``."""


def register_world(name: str, **meta):
    """Function decorator: make ``fn(seed=0, **options) -> ShapesWorld`` a named world
    (an entry of :data:`WORLDS`; ``meta`` such as ``help="..."`` is stored with it)."""
    return WORLDS.register(name, **meta)


def list_worlds() -> list[str]:
    """Names of the registered worlds, sorted."""
    return sorted(WORLDS.names())


def get_world(name: str = DEFAULT_WORLD, seed: int = 0, **options) -> ShapesWorld:
    """The world ``name`` with ``seed``; keyword arguments override its ShapesWorld options.

    Raises
    ------
    UsageError
        For an unknown name or a bad option.
    """
    if name not in WORLDS:
        raise UsageError(f"unknown ShapesWorld {name!r}; choose one of {', '.join(list_worlds())}")
    return WORLDS.get(name)(seed=seed, **options)


@register_world("shapes-tiny", help="the world of the bundled model: 64 px, one object, 2 OOD shapes")
def shapes_tiny_world(seed: int = 0, **options) -> ShapesWorld:
    """The world of the bundled shapes-tiny model: 64 px, single objects, 2 OOD shapes.

    Parameters
    ----------
    seed : int, default=0
        The model was trained on seed 0 (single objects) and seed 1 (2-3 objects,
        see :func:`cliplab.train.recipes.shapes_tiny`); its model card is measured on
        the ``test`` split of seed 0.
    **options
        Override :class:`ShapesWorld` arguments (``n_objects``, ``split_sizes``...).
    """
    options = {"image_size": 64, "n_objects": 1, "ood_shapes": SHAPES_TINY_OOD, **options}
    return ShapesWorld(seed=seed, **options)


@register_world("plain", help="ShapesWorld's own defaults: 1-3 objects, all 10 shapes in every split")
def plain_world(seed: int = 0, **options) -> ShapesWorld:
    """:class:`ShapesWorld` with its own defaults (1-3 objects, all 10 shapes in every split)."""
    return ShapesWorld(seed=seed, **options)


def task_world(world: ShapesWorld, task: str) -> ShapesWorld:
    """The world whose scenes ``task`` renders.

    Classification tasks (``color-shape``, ``shape``, ``color`` and evaluation's
    ``color-shape-heldout``) get one object per scene, so each image has one label;
    ``captions``, ``retrieval`` and ``detection`` get :data:`MULTI_OBJECTS`.  Nothing
    else changes, so scene ``i`` of a split is the same image wherever it is rendered.
    """
    if task in CLASSIFICATION_TASKS or task == "color-shape-heldout":
        n_objects = (1, 1)
    elif task in ("captions", "retrieval", "detection"):
        n_objects = MULTI_OBJECTS
    else:
        raise UsageError(f"unknown ShapesWorld task {task!r}")
    return world if world.n_objects == n_objects else world.replace(n_objects=n_objects)


def task_classes(world: ShapesWorld, task: str, split: str) -> list[str]:
    """Class names of a classification task in ``split`` of ``world``.

    ``color-shape``: every colour x every shape of the split, colour-major
    (``"red circle", "red square", ...``), held-out compositions included in every
    split (a zero-shot classifier still chooses among them where they are never drawn);
    ``shape``: the split's shapes; ``color``: :data:`COLORS`.  This is the label set of
    the ``shapes:<task>`` evaluation datasets and of ``cliplab shapes export``.
    """
    shapes = world.shapes_of(split)
    if task in ("color-shape", "color-shape-heldout"):
        return [f"{c} {s}" for c in COLORS for s in shapes]
    if task == "shape":
        return list(shapes)
    if task == "color":
        return list(COLORS)
    raise UsageError(f"{task!r} is not a ShapesWorld classification task; "
                     f"choose one of {', '.join(CLASSIFICATION_TASKS)}")
