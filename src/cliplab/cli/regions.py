"""``cliplab regions``: CLOC promptable region embeddings — train a Prompter, classify boxes."""

from __future__ import annotations

from ..errors import DataError, UsageError
from ._common import add_model_args, load_backbone, write_rows

HELP = "region embeddings (CLOC): train a Prompter on ShapesWorld scenes, classify boxes in images"


def add_parser(sub) -> None:
    p = sub.add_parser("regions", help=HELP, description=(
        "CLOC's promptable region embeddings: a light Prompter maps the frozen model's patch tokens "
        "plus a box to an embedding in the joint space. 'train' fits one on ShapesWorld dense scenes "
        "through the Trainer; 'classify' labels the boxes of a table with a trained Prompter (or, "
        "with --baseline crop, by cropping and encoding each box)."))
    cmds = p.add_subparsers(dest="regions_command", metavar="{train,classify}")
    cmds.required = True
    t = cmds.add_parser("train", help="train a Prompter on ShapesWorld dense scenes (frozen model)")
    t.add_argument("--out", required=True, metavar="DIR", help="run folder; the Prompter goes to DIR/prompter")
    t.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    t.add_argument("--scenes", type=int, default=200, help="training scenes (default 200)")
    t.add_argument("--image-size", type=int, help="input side of the tokens (default: the model's)")
    t.add_argument("--seed", type=int, default=0)
    add_model_args(t)
    t.set_defaults(run=run)
    c = cmds.add_parser("classify", help="label the boxes of a table (image,x0,y0,x1,y1 in pixels)")
    c.add_argument("--boxes", required=True, metavar="CSV",
                   help="table with columns image, x0, y0, x1, y1 (pixels, x1/y1 exclusive); image paths "
                        "relative to the table's folder")
    lab = c.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", help="comma-separated classes")
    lab.add_argument("--labels-file", help="file with one class per line")
    c.add_argument("--prompter", metavar="DIR", help="a trained Prompter (cliplab regions train --out DIR: DIR/prompter)")
    c.add_argument("--baseline", choices=["crop"], help="crop-and-encode each box instead of a Prompter")
    c.add_argument("--templates", default="a photo of a {c}.",
                   help="template set or a string with {c} (default: 'a photo of a {c}.')")
    c.add_argument("--format", choices=["table", "json", "csv"], default="table")
    add_model_args(c)
    c.set_defaults(run=run)


def run(args) -> int:
    return _train(args) if args.regions_command == "train" else _classify(args)


def _train(args) -> int:
    from ..dense.cloc import train_cloc
    from ..validation import check_positive_int

    check_positive_int("--steps", args.steps)
    check_positive_int("--scenes", args.scenes)
    backbone = load_backbone(args)
    train_cloc(backbone, args.steps, args.out, n_scenes=args.scenes, image_size=args.image_size, seed=args.seed)
    print(f"prompter written to {args.out}/prompter")
    return 0


def _read_boxes(path):
    import csv
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such table")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV table ({e})") from None
    need = ["image", "x0", "y0", "x1", "y1"]
    if not rows or any(k not in rows[0] for k in need):
        raise DataError(f"{path}: needs the columns {', '.join(need)} and at least one row")
    boxes: dict = {}
    for n, r in enumerate(rows, start=2):
        try:
            box = [float(r[k]) for k in need[1:]]
        except (TypeError, ValueError):
            raise DataError(f"{path}, line {n}: box coordinates must be numbers") from None
        if not (box[2] > box[0] and box[3] > box[1]):
            raise DataError(f"{path}, line {n}: an empty box (x1 <= x0 or y1 <= y0)")
        boxes.setdefault(str(path.parent / r["image"]), []).append(box)
    return boxes


def _classify(args) -> int:
    import numpy as np

    from ..data.images import load_image
    from ..dense.cloc import crop_and_encode, load_prompter, region_embeddings
    from ..errors import BadImage
    from ..zeroshot import class_weights, get_templates
    from .segment import _classes

    if bool(args.prompter) == bool(args.baseline):
        raise UsageError("give either --prompter DIR or --baseline crop")
    names = [c if isinstance(c, str) else c[0] for c in _classes(args)]
    table = _read_boxes(args.boxes)
    backbone = load_backbone(args)
    prompter = load_prompter(args.prompter, backbone=backbone) if args.prompter else None
    w = class_weights(backbone, names, get_templates(args.templates), progress=False)     # (C, D)
    rows = []
    for image_path, boxes in table.items():
        try:
            image = np.asarray(load_image(image_path).convert("RGB"))
        except (BadImage, OSError) as e:
            raise DataError(f"{image_path}: {e}") from None
        h, wd = image.shape[:2]
        side = np.array([wd, h, wd, h], np.float32)
        unit = (np.clip(np.asarray(boxes, np.float32), 0, side) / side)[None]                  # (1, K, 4)
        if prompter is not None:
            emb = region_embeddings(backbone, prompter, [image], unit)[0]                        # (K, D)
        else:
            emb = crop_and_encode(backbone, [image], unit)[0]
        probs = np.exp(backbone.logit_scale * emb @ w.T)
        probs /= probs.sum(1, keepdims=True)                                                  # (K, C)
        for box, p in zip(boxes, probs):
            rows.append({"image": image_path, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
                         "label": names[int(p.argmax())], "score": float(p.max())})
    write_rows(rows, args.format)
    return 0
