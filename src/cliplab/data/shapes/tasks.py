"""ShapesWorld evaluation tasks as datasets: ``shapes:<task>[@<domain>]`` of :func:`cliplab.data.datasets.load_dataset`.

Each task renders its scenes in memory from the shapes-tiny world
(:func:`~.worlds.shapes_tiny_world`, the world of the bundled model and of ``cliplab
shapes export``) or from a world derived from it.  The tasks are the entries of
:data:`SHAPES_TASKS`, a registry: a module of this package adds one with
:func:`register_task`.  Built in:

- ``color-shape``: 64-way colour x shape classification;
- ``shape``, ``color``: 8-way;
- ``color-shape-heldout``: test scenes whose (colour, shape) is held out of train/val,
  classified among all 64 colour-shape classes;
- ``retrieval``: scenes of 1-3 objects with all their captions.

``shapes:<task>@<domain>`` renders the same scenes in a domain of
:data:`~.domains.DOMAINS` (``shapes:color-shape@blur-3``): the same objects and labels,
drawn with a controlled shift.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ...errors import UsageError
from ...registry import Registry
from ...validation import check_positive_int
from ..datasets import SPLIT_NAMES, ClassificationData, RetrievalData
from .export import scene_label
from .domains import check_domain
from .world import ShapesWorld
from .worlds import shapes_tiny_world, task_classes, task_world

logger = logging.getLogger(__name__)

__all__ = ["SHAPES_DEFAULT_N", "SHAPES_TASKS", "TaskRequest", "parse_task", "register_task", "shapes_task"]

SHAPES_TASKS: Registry = Registry("ShapesWorld task", package=__package__)
"""The ShapesWorld tasks that :func:`~cliplab.data.datasets.load_dataset` accepts as
``"shapes:<task>"``: ``fn(request: TaskRequest) -> ClassificationData | RetrievalData``, each
with a one-line ``help`` and ``example`` (the dataset spec, ``"shapes:<task>"``)."""

SHAPES_DEFAULT_N: dict[str, int] = {"train": 2000, "val": 1000, "test": 1000}
"""Scenes per split of a ShapesWorld task when ``n`` is not given."""


class TaskRequest:
    """What a task function is asked for: the first ``n`` scenes of ``split`` of ``world``.

    Attributes
    ----------
    task : str
        The task name (without ``shapes:``).
    world : ShapesWorld
        The shapes-tiny world of ``seed`` in the requested domain; a task may derive its
        own from it with :meth:`ShapesWorld.replace` (which keeps the domain).
    split : str
    n : int
    seed : int
    domain : str or None
        The domain of ``shapes:<task>@<domain>``; ``None`` for the original one.
    meta : dict
        Provenance the task puts into its dataset's ``meta`` (source, split, n, seed, world).
    """

    def __init__(self, task: str, world: ShapesWorld, split: str, n: int, seed: int):
        self.task, self.world, self.split, self.n, self.seed = task, world, split, n, seed
        self.domain = world.domain
        self.meta = {"source": self.name, "split": split, "n": n, "seed": seed, "world": world.config()}

    @property
    def name(self) -> str:
        """The dataset name, ``"shapes:<task>"`` or ``"shapes:<task>@<domain>"``."""
        return f"shapes:{self.task}" + (f"@{self.domain}" if self.domain else "")

    def sized(self, world: ShapesWorld) -> ShapesWorld:
        """``world`` with room for ``n`` scenes in the split; records it in ``meta``."""
        world = world.replace(split_sizes={self.split: max(self.n, world.split_sizes[self.split])})
        self.meta["world"] = world.config()
        return world


def register_task(name: str, **meta) -> Callable:
    """Decorator: make ``fn(request: TaskRequest) -> data`` the task ``shapes:<name>``.

    ``meta`` needs ``help="one line"`` and ``data``, the dataset kind the task returns
    (``"classification"``, ``"retrieval"``...); ``example`` defaults to ``"shapes:<name>"``.
    """
    meta.setdefault("example", f"shapes:{name}")
    return SHAPES_TASKS.register(name, **meta)


def parse_task(spec: str) -> tuple[str, str | None]:
    """``"color-shape@blur-3"`` -> ``("color-shape", "blur-3")``; ``"shape"`` -> ``("shape", None)``.

    Raises
    ------
    UsageError
        An unknown task or domain, or an empty domain after ``@``.
    """
    task, at, domain = str(spec).partition("@")
    if task not in SHAPES_TASKS:
        raise UsageError(f"unknown ShapesWorld task {task!r}; choose one of "
                         f"{', '.join('shapes:' + t for t in SHAPES_TASKS)}")
    if at and not domain:
        raise UsageError(f"shapes:{spec}: name a domain after '@' (shapes:{task}@DOMAIN, e.g. "
                         f"shapes:{task}@blur-3)")
    return task, check_domain(domain) if at else None


def shapes_task(task: str, split: str = "test", n: int | None = None, seed: int = 0):
    """The first ``n`` scenes of ``split`` of a ShapesWorld task.

    Parameters
    ----------
    task : str
        A name of :data:`SHAPES_TASKS`, optionally ``@<domain>`` with a name of
        :data:`~.domains.DOMAINS` (``"color-shape@blur-3"``).
    split : {"train", "val", "test"}, default "test"
    n : int, optional
        Number of scenes; default :data:`SHAPES_DEFAULT_N` of the split.
    seed : int, default 0
        World seed.

    Returns
    -------
    ClassificationData or RetrievalData
        Images are uint8 arrays (H, W, 3); labels are the ones ``cliplab shapes export``
        writes (:func:`~.export.scene_label`).

    Raises
    ------
    UsageError
        Unknown task, domain or split, ``n < 1``, or a split the task does not have.
    """
    task, domain = parse_task(task)
    if split not in SPLIT_NAMES:
        raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    n = SHAPES_DEFAULT_N[split] if n is None else check_positive_int("n", n)
    request = TaskRequest(task, shapes_tiny_world(seed, domain=domain), split, n, seed)
    return SHAPES_TASKS.get(task)(request)


# ------------------------------------------------------------------ built-in tasks


def _classification(request: TaskRequest, label_task: str) -> ClassificationData:
    world = task_world(request.world, label_task)  # the scenes `cliplab shapes export` writes
    world = request.sized(world)
    classnames = task_classes(world, label_task, request.split)
    images, scenes = world.render_batch(request.split, range(request.n))
    labels = [classnames.index(scene_label(s, label_task)) for s in scenes]  # the exported label
    return ClassificationData(list(images), np.asarray(labels, dtype=np.int64), classnames, request.name,
                              meta=request.meta)


@register_task("color-shape", data="classification",
               help="64-way colour x shape classification of single-object scenes")
def color_shape(request: TaskRequest) -> ClassificationData:
    return _classification(request, "color-shape")


@register_task("shape", data="classification",
               help="8-way shape classification of single-object scenes")
def shape(request: TaskRequest) -> ClassificationData:
    return _classification(request, "shape")


@register_task("color", data="classification",
               help="8-way colour classification of single-object scenes")
def color(request: TaskRequest) -> ClassificationData:
    return _classification(request, "color")


@register_task("color-shape-heldout", data="classification",
               help="test scenes of held-out colour-shape pairs, classified among all 64 pairs")
def color_shape_heldout(request: TaskRequest) -> ClassificationData:
    if request.split != "test":
        raise UsageError("shapes:color-shape-heldout exists only for split 'test' "
                         "(held-out compositions never occur in train or val)")
    world = task_world(request.world, "color-shape-heldout")
    classnames = task_classes(world, "color-shape", "test")
    heldout = set(world.heldout)
    n = request.n
    limit = max(world.split_sizes["test"], 32 * n)
    world = world.replace(split_sizes={"test": limit})
    images, scenes = [], []
    for i in range(limit):
        scene = world.scene("test", i)
        obj = scene.objects[0]
        if (obj.color, obj.shape) in heldout:
            images.append(scene.image)
            scenes.append(scene)
            if len(scenes) == n:
                break
    if len(scenes) < n:
        logger.warning("%s: found %d held-out scenes of %d asked in %d test scenes",
                       request.name, len(scenes), n, limit)
    meta = dict(request.meta, world=world.config())
    meta["heldout"] = sorted([list(p) for p in heldout if p[1] in world.shapes_of("test")])
    labels = [classnames.index(scene_label(s, "color-shape")) for s in scenes]
    return ClassificationData(images, np.asarray(labels, dtype=np.int64), classnames, request.name, meta=meta)


@register_task("retrieval", data="retrieval",
               help="image-text retrieval over scenes of 1-3 objects and all their captions")
def retrieval(request: TaskRequest) -> RetrievalData:
    world = request.sized(task_world(request.world, "retrieval"))
    images, scenes = world.render_batch(request.split, range(request.n))
    return RetrievalData(list(images), [list(s.captions) for s in scenes], request.name, meta=request.meta)


@register_task("ood", data="classification",
               help="the shapes-tiny world's out-of-distribution shapes (heart, crescent), test only")
def ood(request: TaskRequest) -> ClassificationData:
    if request.split != "test":
        raise UsageError("shapes:ood exists only for split 'test' (its shapes never occur in train or val)")
    world = task_world(request.world, "shape")
    world = world.replace(split_sizes={"ood": max(request.n, world.split_sizes["ood"])})
    meta = dict(request.meta, world=world.config(), split="ood")
    classnames = list(world.shapes_of("ood"))
    images, scenes = world.render_batch("ood", range(request.n))
    labels = [classnames.index(s.objects[0].shape) for s in scenes]
    return ClassificationData(list(images), np.asarray(labels, dtype=np.int64), classnames, request.name, meta=meta)
