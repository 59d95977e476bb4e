"""Write ShapesWorld scenes in the standard formats the rest of cliplab reads.

Formats
-------
``folder``
    ``out_dir/<class>/<split>_<index>.png``, one sub-folder per class (``"red star"``,
    ``"star"`` or ``"red"``), for every class of the task's label set
    (:func:`~cliplab.data.shapes.task_classes`, the classes of the ``shapes:<task>``
    evaluation datasets), empty when no exported scene has it, so the folder read back
    is classified among the same classes.  Only for the classification tasks; those
    tasks force ``n_objects=1`` so every image has exactly one label.
``csv``
    ``out_dir/images/*.png`` and ``out_dir/captions.csv`` with **one row per caption**
    (rows of the same image are consecutive and share ``filepath``; the canonical caption
    comes first).  Columns: ``filepath,caption,label,split,index,background,n_objects,
    colors,shapes,defect,long_caption,short_caption`` (``colors``/``shapes`` are
    ``;``-joined, in drawing order; the long and short captions,
    :attr:`Scene.long_caption <cliplab.data.shapes.Scene.long_caption>`, repeat on every
    row of the image).
    :func:`cliplab.data.sources.read_caption_table` merges the rows back into one record
    per image.
``jsonl``
    ``out_dir/captions.jsonl``, one object per image: ``{"image", "captions", "label",
    "split", "index", "background", "objects": [{shape, color, size, position, box}],
    "defects": [{kind, box}], "long_caption", "short_caption"}``.
``wds``
    WebDataset shards ``out_dir/shard-000000.tar``... of ``{key}.png``, ``{key}.txt``
    (captions, one per line) and ``{key}.json`` (the JSONL record without ``image``).
``coco``
    ``out_dir/images/*.png`` and ``out_dir/annotations.json``: COCO instances with one
    category per shape, ``bbox`` as ``[x, y, w, h]``, ``segmentation`` as uncompressed
    RLE (column-major counts starting with background), plus ``color``/``size``/
    ``position`` attributes on each annotation.  Category ids are
    :data:`~cliplab.data.shapes.dense.CLASS_IDS` (``SHAPES.index(shape) + 1``), the class
    ids of the ``seg`` class maps.  ``pycocotools`` reads it as it is.
``masks``
    Semantic segmentation (task ``seg``): ``out_dir/images/<name>.png`` and
    ``out_dir/masks/<name>.png``, the class map as a single-channel PNG of class ids
    (:data:`~cliplab.data.shapes.dense.CLASSNAMES`, ``0`` background, ``255`` ignore),
    the layout mmseg-style readers take (``img_suffix=".png"``, ``seg_map_suffix=".png"``,
    ``reduce_zero_label=False``).
``mvtec``
    Task ``inspection``: MVTec AD folders ``<category>/train/good``, ``test/good``,
    ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``
    (:func:`~cliplab.data.shapes.inspection.export_mvtec`).

Tasks: ``color-shape``, ``shape``, ``color`` (classification, label = class name),
``captions`` (retrieval, no label) and ``detection`` (boxes; label = the ``;``-joined
object names) render :meth:`ShapesWorld.scene`; ``seg`` and ``det`` render dense scenes
(:func:`~cliplab.data.shapes.dense.dense_scene`, 3-12 overlapping objects; every format
but ``folder``, ``masks`` for ``seg`` only); ``inspection`` writes ``mvtec`` only.
Scenes are indices ``0 .. n-1`` of the split.  Boxes are ``(x0, y0, x1, y1)`` with
exclusive ``x1``/``y1``.

Every format also writes ``out_dir/shapesworld.json``: the world's options, the split,
task, format, ``n`` and the class list.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..._progress import progress_bar
from ...errors import UsageError
from ...validation import check_choice, check_positive_int
from .world import Scene, ShapesWorld
from .worlds import CLASSIFICATION_TASKS, get_world, task_classes, task_world

logger = logging.getLogger("cliplab.data.shapes")

EXPORT_FORMATS: tuple[str, ...] = ("folder", "csv", "jsonl", "wds", "coco", "masks", "mvtec")
EXPORT_TASKS: tuple[str, ...] = ("color-shape", "shape", "color", "captions", "detection", "seg", "det", "inspection")
DENSE_TASKS: tuple[str, ...] = ("seg", "det")
"""Export tasks that render dense scenes (:mod:`.dense`)."""
CSV_COLUMNS: tuple[str, ...] = (
    "filepath", "caption", "label", "split", "index", "background", "n_objects", "colors", "shapes", "defect",
    "long_caption", "short_caption",
)
SHARD_SIZE = 1000


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes
    ----------
    out_dir : Path
    fmt, task, split : str
    n_images : int
    index_file : Path or None
        The table / annotation file, or ``None`` for ``folder``.
    files : list of Path
        Shards (``wds``) or the index file.
    classes : list of str
        The label set of a classification task (sorted, the order a class-folder
        reader gives); of ``seg``/``det`` the class names in class-id order
        (``seg`` with ``"background"`` first); of ``inspection`` the categories; else
        empty.
    """

    out_dir: Path
    fmt: str
    task: str
    split: str
    n_images: int
    index_file: Path | None = None
    files: list[Path] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the CLI."""
        where = self.index_file or self.out_dir
        return f"wrote {self.n_images} {self.split} scenes ({self.task}, {self.fmt}) to {where}"


def scene_label(scene: Scene, task: str) -> str | None:
    """Label of a scene for ``task``: ``"red star"``/``"star"``/``"red"`` of the first
    object, the ``;``-joined object names for ``detection``, ``None`` for ``captions``."""
    if task == "captions":
        return None
    if task in ("detection", *DENSE_TASKS):
        return ";".join(o.name for o in scene.objects)
    obj = scene.objects[0]
    return {"color-shape": obj.name, "shape": obj.shape, "color": obj.color}[task]


def _record(scene: Scene, task: str) -> dict:
    return {
        "captions": list(scene.captions),
        "label": scene_label(scene, task),
        "split": scene.split,
        "index": scene.index,
        "background": scene.background,
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position, "box": list(o.box)}
            for o in scene.objects
        ],
        "defects": [{"kind": d["kind"], "box": list(d["box"])} for d in scene.defects],
        "long_caption": scene.long_caption,
        "short_caption": scene.short_caption,
    }


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def rle_encode(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a bool mask (H, W): column-major run lengths, first run
    counts background pixels."""
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")  # (H*W,) column-major
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of :func:`rle_encode`: (H, W) bool."""
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])  # (H*W,)
    return flat.reshape((h, w), order="F")


def export(
    world: ShapesWorld | str,
    out_dir,
    *,
    n: int,
    split: str = "test",
    task: str = "color-shape",
    fmt: str = "folder",
    domain: str | None = None,
    progress: bool | None = None,
    n_test: int | None = None,
) -> ExportResult:
    """Render ``n`` scenes of ``split`` and write them as ``fmt`` for ``task``.

    Parameters
    ----------
    world : ShapesWorld, InspectionWorld or str
        A world, or the name of a registered one (:func:`~cliplab.data.shapes.get_world`,
        e.g. ``"shapes-tiny"``, the world of the bundled model) with its defaults.  The
        dense tasks render the world as given (pass
        :func:`~cliplab.data.shapes.dense.dense_world` for 256 px, 3-12 objects; a name is
        turned into that).  ``inspection`` takes an
        :class:`~cliplab.data.shapes.inspection.InspectionWorld` (else one of the world's
        seed at 256 px).
    out_dir : str or Path
        Created if missing; existing files of the same names are overwritten.
    n : int
        Number of scenes (indices ``0 .. n-1``); for ``inspection`` the normal training
        images per category.
    split : str, default="test"
        Ignored by ``inspection``, which writes its train and test splits.
    task : {"color-shape", "shape", "color", "captions", "detection", "seg", "det", "inspection"}
        Classification tasks render single-object scenes (``n_objects=1``).
    fmt : {"folder", "csv", "jsonl", "wds", "coco", "masks", "mvtec"}
    domain : str, optional
        Render in this domain of :data:`~.domains.DOMAINS` (``"blur-3"``) instead of
        the world's own; masks and boxes follow it (occluded pixels leave the masks).
        Not for ``inspection``, which paints its own surfaces.
    progress : bool, optional
        Progress bar; ``None`` follows ``CLIPLAB_PROGRESS``.
    n_test : int, optional
        ``inspection``: test images per kind (``good`` and each defect) and category;
        default ``max(1, n // 4)``.

    Returns
    -------
    ExportResult

    Raises
    ------
    UsageError
        Unknown world, format, task, split or domain, or ``n`` out of range.
    """
    check_choice("format", fmt, EXPORT_FORMATS)
    check_choice("task", task, EXPORT_TASKS)
    if fmt == "folder" and task not in CLASSIFICATION_TASKS:
        raise UsageError(f"format 'folder' needs a classification task ({', '.join(CLASSIFICATION_TASKS)}), got {task!r}")
    if (fmt == "mvtec") != (task == "inspection"):
        raise UsageError("task 'inspection' is written as --format mvtec, and only it")
    if fmt == "masks" and task != "seg":
        raise UsageError(f"format 'masks' (class-index PNGs) needs task 'seg', got {task!r}")
    if task == "inspection":
        if domain is not None:
            raise UsageError("task 'inspection' paints its own surfaces; it takes no domain")
        return _export_inspection(world, out_dir, n=n, n_test=n_test, progress=progress)
    if isinstance(world, str):
        world = get_world(world)
        if task in DENSE_TASKS:
            from .dense import dense_world

            world = dense_world(world)
    if domain is not None:
        world = world.replace(domain=domain)
    world.split(split)  # validates the split name
    n = check_positive_int("n", n)
    if n > world.split_sizes[split]:
        raise UsageError(f"split {split!r} has {world.split_sizes[split]} scenes, asked for {n}; pass split_sizes")
    if task in CLASSIFICATION_TASKS:
        world = task_world(world, task)  # one object, one label

    classes = task_classes(world, task, split) if task in CLASSIFICATION_TASKS else []
    if task in DENSE_TASKS:
        from .dense import CLASSNAMES, dense_scenes

        classes = list(CLASSNAMES) if task == "seg" else list(CLASSNAMES[1:])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "folder":
        for c in classes:  # the whole label set, also the classes no exported scene has
            (out / c).mkdir(exist_ok=True)
    if task in DENSE_TASKS:
        scenes = dense_scenes(world, split, n, progress=progress, desc=f"export {fmt}")
    else:
        scenes = progress_bar(
            (world.scene(split, i) for i in range(n)), progress=progress, total=n, desc=f"export {fmt}", unit="img"
        )
    writer = {"folder": _write_folder, "csv": _write_csv, "jsonl": _write_jsonl, "wds": _write_wds, "coco": _write_coco,
              "masks": _write_masks}[fmt]
    result = ExportResult(out, fmt, task, split, n)
    writer(scenes, out, task, result)
    result.classes = list(classes) if task in DENSE_TASKS else sorted(classes)  # dense: in class-id order
    manifest = {"world": world.config(), "split": split, "task": task, "format": fmt, "n": n,
                "classes": result.classes}
    if task == "seg":
        from .dense import IGNORE_INDEX

        manifest["ignore_index"] = IGNORE_INDEX
    (out / "shapesworld.json").write_text(json.dumps(manifest, indent=1))
    logger.info(result.summary())
    return result


def _export_inspection(world, out_dir, *, n: int, n_test: int | None, progress) -> ExportResult:
    from .inspection import InspectionWorld, export_mvtec

    if not isinstance(world, InspectionWorld):
        seed = get_world(world).seed if isinstance(world, str) else world.seed
        world = InspectionWorld(seed)
    n = check_positive_int("n", n)
    n_test = max(1, n // 4) if n_test is None else check_positive_int("n_test", n_test)
    out = Path(out_dir)
    export_mvtec(world, out, n_train=n, n_test=n_test, progress=progress)
    total = len(world.categories) * (n + 7 * n_test)  # train/good + test/good + six defects
    result = ExportResult(out, "mvtec", "inspection", "train+test", total, classes=list(world.categories))
    manifest = {"world": world.config(), "task": "inspection", "format": "mvtec", "n_train": n, "n_test": n_test,
                "classes": result.classes}
    (out / "shapesworld.json").write_text(json.dumps(manifest, indent=1))
    logger.info(result.summary())
    return result


def _name(scene: Scene) -> str:
    return f"{scene.split}_{scene.index:07d}"


def _save_png(scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(path, format="PNG")


def _write_folder(scenes, out: Path, task: str, result: ExportResult) -> None:
    for scene in scenes:
        _save_png(scene, out / scene_label(scene, task) / f"{_name(scene)}.png")


def _write_csv(scenes, out: Path, task: str, result: ExportResult) -> None:
    path = out / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for scene in scenes:
            rel = f"images/{_name(scene)}.png"
            _save_png(scene, out / rel)
            label = scene_label(scene, task) or ""
            colors = ";".join(o.color for o in scene.objects)
            shapes = ";".join(o.shape for o in scene.objects)
            defect = scene.defects[0]["kind"] if scene.defects else ""
            long, short = scene.long_caption, scene.short_caption
            for caption in scene.captions:
                w.writerow([rel, caption, label, scene.split, scene.index, scene.background,
                            len(scene.objects), colors, shapes, defect, long, short])
    result.index_file = path
    result.files = [path]


def _write_jsonl(scenes, out: Path, task: str, result: ExportResult) -> None:
    path = out / "captions.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for scene in scenes:
            rel = f"images/{_name(scene)}.png"
            _save_png(scene, out / rel)
            f.write(json.dumps({"image": rel, **_record(scene, task)}) + "\n")
    result.index_file = path
    result.files = [path]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_wds(scenes, out: Path, task: str, result: ExportResult) -> None:
    tar, count = None, 0
    try:
        for scene in scenes:
            if count % SHARD_SIZE == 0:
                if tar is not None:
                    tar.close()
                shard = out / f"shard-{count // SHARD_SIZE:06d}.tar"
                tar = tarfile.open(shard, "w")
                result.files.append(shard)
            key = _name(scene)
            _add_member(tar, f"{key}.png", _png_bytes(scene.image))
            _add_member(tar, f"{key}.txt", "\n".join(scene.captions).encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps(_record(scene, task)).encode("utf-8"))
            count += 1
    finally:
        if tar is not None:
            tar.close()
    result.index_file = result.files[0] if result.files else None


def _write_masks(scenes, out: Path, task: str, result: ExportResult) -> None:
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        _save_png(scene, out / "images" / f"{_name(scene)}.png")
        Image.fromarray(scene.class_map, mode="L").save(out / "masks" / f"{_name(scene)}.png", format="PNG")
    result.index_file = out / "masks"
    result.files = [out / "images", out / "masks"]


def _write_coco(scenes, out: Path, task: str, result: ExportResult) -> None:
    from .world import SHAPES

    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    cat_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        rel = f"images/{_name(scene)}.png"
        _save_png(scene, out / rel)
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": rel, "width": w, "height": h,
                       "captions": list(scene.captions), "background": scene.background})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_id[obj.shape],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": int(obj.mask.sum()),
                "iscrowd": 0,
                "segmentation": rle_encode(obj.mask),
                "color": obj.color,
                "size": obj.size,
                "position": obj.position,
            })
    path = out / "annotations.json"
    coco = {
        "info": {"description": "ShapesWorld scenes exported by cliplab"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path.write_text(json.dumps(coco))
    result.index_file = path
    result.files = [path]


def _plain(value):
    """An attribute value as JSON-ready Python (numpy scalars and arrays unwrapped)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def export_dataset(data, out_dir, *, fmt: str = "csv", progress: bool | None = None) -> ExportResult:
    """Write a rendered ``shapes:<task>`` dataset (any registered task) in a standard format.

    The tasks that :func:`export` renders itself keep their own layouts; every other
    registered task (counting, size, relations, pairs, subgroups...) is written from its
    dataset (:func:`~.tasks.shapes_task`) by this function.

    Parameters
    ----------
    data : ClassificationData or RetrievalData
        Images as uint8 arrays.
    out_dir : path
        Created if missing.
    fmt : {"folder", "csv", "jsonl"}
        ``folder``: ``<class>/<index>.png`` (classification only); ``csv``:
        ``images/*.png`` and ``labels.csv`` (``filepath,label`` + one column per attribute,
        lists JSON-encoded) for classification, ``captions.csv`` (``filepath,caption`` +
        attributes, one row per caption) for retrieval; ``jsonl``: ``records.jsonl``, one
        object per image with its label or captions and attributes.  Every format also
        writes ``shapesworld.json`` (the dataset's meta and class names).

    Returns
    -------
    ExportResult

    Raises
    ------
    UsageError
        A format this dataset kind cannot be written as.
    """
    classification = data.kind == "classification"
    allowed = ("folder", "csv", "jsonl") if classification else ("csv", "jsonl")
    if fmt not in allowed:
        raise UsageError(f"{data.name} ({data.kind}) is written as {' or '.join(allowed)}, not {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(data.attributes)
    rows = []
    width = max(5, len(str(len(data.items))))
    for i, image in progress_bar(enumerate(data.items), progress=progress, total=len(data.items),
                                 desc=f"export {fmt}", unit="img"):
        if fmt == "folder":
            rel = Path(data.classnames[data.labels[i]]) / f"{i:0{width}d}.png"
        else:
            rel = Path("images") / f"{i:0{width}d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(_png_bytes(np.asarray(image)))
        attrs = {k: _plain(data.attributes[k][i]) for k in keys}
        target = {"label": data.classnames[data.labels[i]]} if classification else {"captions": list(data.captions[i])}
        rows.append((rel.as_posix(), target, attrs))
    if fmt == "folder":
        for c in data.classnames:
            (out / c).mkdir(exist_ok=True)
        index_file = None
    elif fmt == "csv":
        index_file = out / ("labels.csv" if classification else "captions.csv")
        cell = lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v  # noqa: E731
        with open(index_file, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "label" if classification else "caption", *keys])
            for rel, target, attrs in rows:
                texts = [target["label"]] if classification else target["captions"]
                for text in texts:
                    w.writerow([rel, text, *(cell(attrs[k]) for k in keys)])
    else:
        index_file = out / "records.jsonl"
        with open(index_file, "w", encoding="utf-8") as f:
            for rel, target, attrs in rows:
                f.write(json.dumps({"image": rel, **target, **attrs}) + "\n")
    result = ExportResult(out, fmt, data.name, str(data.meta.get("split", "")), len(rows), index_file,
                          classes=list(getattr(data, "classnames", [])))
    manifest = {"dataset": data.name, "format": fmt, "n": len(rows), "classes": result.classes,
                "attributes": keys, "meta": _plain_meta(data.meta)}
    (out / "shapesworld.json").write_text(json.dumps(manifest, indent=1))
    logger.info(result.summary())
    return result


def _plain_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(_plain(v))
            out[k] = _plain(v)
        except TypeError:
            out[k] = repr(v)
    return out
