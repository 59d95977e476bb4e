"""ShapesWorld: procedural coloured-shape scenes with captions, masks, boxes and defects.

>>> from cliplab.data.shapes import ShapesWorld, shapes_tiny_world
>>> scene = ShapesWorld(seed=0).scene("train", 0)
>>> world = shapes_tiny_world()  # the world of the bundled model

See :class:`ShapesWorld` for the options, :mod:`.worlds` for the named worlds
(``shapes-tiny``, the default, and ``plain``) and :func:`export` for writing the standard
formats (class folders, CSV, JSONL, WebDataset shards, COCO); :mod:`.tasks` builds the
in-memory ``shapes:<task>`` datasets (:func:`shapes_task`); :mod:`.dense` makes dense
scenes of 3-12 overlapping objects with class maps (``shapes:seg``, ``shapes:det``) and
:mod:`.inspection` industrial-inspection scenes with defect masks (``shapes:inspection``,
MVTec AD folders); :mod:`.domains` holds the controlled
shifts (``ShapesWorld(domain="blur-3")``, ``shapes:<task>@<domain>``).
"""

from .domains import DOMAINS, NEW_BACKGROUNDS, list_domains
from .world import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_HELDOUT,
    DEFECTS,
    SHAPES,
    SIZES,
    SPURIOUS_BACKGROUND,
    TAGS,
    ObjectGT,
    ObjectSpec,
    Scene,
    ShapesSplit,
    ShapesWorld,
    jitter_color,
)
from .worlds import (
    CLASSIFICATION_TASKS,
    DEFAULT_WORLD,
    MULTI_OBJECTS,
    SHAPES_TINY_OOD,
    WORLDS,
    get_world,
    list_worlds,
    plain_world,
    register_world,
    shapes_tiny_world,
    task_classes,
    task_world,
)
from .export import EXPORT_FORMATS, EXPORT_TASKS, ExportResult, export, export_dataset, scene_label
from .tasks import SHAPES_DEFAULT_N, SHAPES_TASKS, TaskRequest, parse_task, register_task, shapes_task
from .dense import CLASS_IDS, CLASSNAMES, IGNORE_INDEX, DenseScene, dense_scene, dense_world
from .inspection import CATEGORIES, INSPECTION_DEFECTS, InspectionScene, InspectionWorld, inspection_scene

__all__ = [
    "DOMAINS",
    "NEW_BACKGROUNDS",
    "list_domains",
    "BACKGROUNDS",
    "COLORS",
    "DEFAULT_HELDOUT",
    "DEFECTS",
    "SHAPES",
    "SIZES",
    "SPURIOUS_BACKGROUND",
    "TAGS",
    "ObjectGT",
    "ObjectSpec",
    "Scene",
    "ShapesSplit",
    "ShapesWorld",
    "jitter_color",
    "CLASSIFICATION_TASKS",
    "DEFAULT_WORLD",
    "MULTI_OBJECTS",
    "SHAPES_TINY_OOD",
    "WORLDS",
    "get_world",
    "list_worlds",
    "plain_world",
    "register_world",
    "shapes_tiny_world",
    "task_classes",
    "task_world",
    "EXPORT_FORMATS",
    "EXPORT_TASKS",
    "ExportResult",
    "export",
    "export_dataset",
    "scene_label",
    "SHAPES_DEFAULT_N",
    "SHAPES_TASKS",
    "TaskRequest",
    "parse_task",
    "register_task",
    "shapes_task",
    "CLASS_IDS",
    "CLASSNAMES",
    "IGNORE_INDEX",
    "DenseScene",
    "dense_scene",
    "dense_world",
    "CATEGORIES",
    "INSPECTION_DEFECTS",
    "InspectionScene",
    "InspectionWorld",
    "inspection_scene",
]
