"""ShapesWorld: procedural coloured-shape scenes with captions, masks, boxes and defects.

>>> from cliplab.data.shapes import ShapesWorld
>>> scene = ShapesWorld(seed=0).scene("train", 0)

See :class:`ShapesWorld` for the options and :func:`export` for writing the standard
formats (class folders, CSV, JSONL, WebDataset shards, COCO).
"""

from .world import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_HELDOUT,
    DEFECTS,
    SHAPES,
    SIZES,
    SPURIOUS_BACKGROUND,
    ObjectGT,
    Scene,
    ShapesSplit,
    ShapesWorld,
)
from .export import EXPORT_FORMATS, EXPORT_TASKS, ExportResult, export, scene_label

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DEFAULT_HELDOUT",
    "DEFECTS",
    "SHAPES",
    "SIZES",
    "SPURIOUS_BACKGROUND",
    "ObjectGT",
    "Scene",
    "ShapesSplit",
    "ShapesWorld",
    "EXPORT_FORMATS",
    "EXPORT_TASKS",
    "ExportResult",
    "export",
    "scene_label",
]
