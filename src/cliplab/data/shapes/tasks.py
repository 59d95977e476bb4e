"""ShapesWorld evaluation tasks as datasets: ``shapes:<task>`` of :func:`cliplab.data.datasets.load_dataset`.

Each task renders the scenes of the shapes-tiny world (:func:`~.worlds.shapes_tiny_world`,
the world of the bundled model and of ``cliplab shapes export``) in memory:

- ``color-shape``: 64-way colour x shape classification;
- ``shape``, ``color``: 8-way;
- ``color-shape-heldout``: test scenes whose (colour, shape) is held out of train/val,
  classified among all 64 colour-shape classes;
- ``retrieval``: scenes of 1-3 objects with all their captions.
"""

from __future__ import annotations

import logging

import numpy as np

from ...errors import UsageError
from ...validation import check_positive_int
from ..datasets import SPLIT_NAMES, ClassificationData, RetrievalData
from .export import scene_label
from .worlds import shapes_tiny_world, task_classes, task_world

logger = logging.getLogger(__name__)

__all__ = ["SHAPES_DEFAULT_N", "SHAPES_TASKS", "shapes_task"]

SHAPES_TASKS: tuple[str, ...] = ("color-shape", "shape", "color", "color-shape-heldout", "retrieval")
"""ShapesWorld tasks that :func:`~cliplab.data.datasets.load_dataset` accepts as ``"shapes:<task>"``."""

SHAPES_DEFAULT_N: dict[str, int] = {"train": 2000, "val": 1000, "test": 1000}
"""Scenes per split of a ShapesWorld task when ``n`` is not given."""


def shapes_task(task: str, split: str = "test", n: int | None = None, seed: int = 0):
    """The first ``n`` scenes of ``split`` of a ShapesWorld task.

    Parameters
    ----------
    task : str
        One of :data:`SHAPES_TASKS`.
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
        Unknown task or split, ``n < 1``, or ``color-shape-heldout`` on a split other
        than ``test``.
    """
    if task not in SHAPES_TASKS:
        raise UsageError(f"unknown ShapesWorld task {task!r}; choose one of "
                         f"{', '.join('shapes:' + t for t in SHAPES_TASKS)}")
    if split not in SPLIT_NAMES:
        raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    n = SHAPES_DEFAULT_N[split] if n is None else check_positive_int("n", n)
    world = task_world(shapes_tiny_world(seed), task)  # the scenes `cliplab shapes export` writes
    meta = {"source": f"shapes:{task}", "split": split, "n": n, "seed": seed, "world": world.config()}
    name = f"shapes:{task}"

    if task == "retrieval":
        world = world.replace(split_sizes={split: max(n, world.split_sizes[split])})
        meta["world"] = world.config()
        images, scenes = world.render_batch(split, range(n))
        return RetrievalData(list(images), [list(s.captions) for s in scenes], name, meta=meta)

    classnames = task_classes(world, task, split)
    if task == "color-shape-heldout":
        if split != "test":
            raise UsageError("shapes:color-shape-heldout exists only for split 'test' "
                             "(held-out compositions never occur in train or val)")
        heldout = set(world.heldout)
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
                           name, len(scenes), n, limit)
        meta["heldout"] = sorted([list(p) for p in heldout if p[1] in world.shapes_of(split)])
    else:
        world = world.replace(split_sizes={split: max(n, world.split_sizes[split])})
        batch, scenes = world.render_batch(split, range(n))
        images = list(batch)

    label_task = "color-shape" if task == "color-shape-heldout" else task
    labels = [classnames.index(scene_label(s, label_task)) for s in scenes]  # the exported label
    return ClassificationData(list(images), np.asarray(labels, dtype=np.int64), classnames, name, meta=meta)
