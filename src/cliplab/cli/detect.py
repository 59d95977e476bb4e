"""``cliplab detect``: training-free open-vocabulary detection of images (see :mod:`cliplab.dense.detect`)."""

from __future__ import annotations

from ..errors import DataError, UsageError
from ._common import add_model_args, entries_help, load_backbone, write_rows

HELP = "detect free-text classes in images (proposals, CLIP region scores, Soft-NMS); COCO JSON + drawn boxes"

NMS = ("soft-linear", "soft-gaussian", "hard", "none")


def add_parser(sub) -> None:
    from ..dense.proposals import PROPOSALS

    p = sub.add_parser(
        "detect", help=HELP,
        description="Detect free-text classes in images without training: class-agnostic proposals (dense "
                    "class maps, sliding windows), each cropped and scored by the model against the prompts, "
                    "then Soft-NMS or NMS per class. Writes into --out: detections.json (COCO results: "
                    "image_id, category_id, bbox [x, y, w, h], score), coco.json (the images and categories "
                    "those ids refer to; pycocotools reads both: COCO('coco.json').loadRes('detections.json')) "
                    "and <image>_boxes.png with the boxes drawn. A PATH may be a folder (searched recursively).")
    p.add_argument("paths", nargs="+", metavar="PATH")
    lab = p.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", help='comma-separated classes; synonyms of one class joined by "|", '
                                      'e.g. "cat,dog|puppy,red car"')
    lab.add_argument("--labels-file", help="file with one class per line (synonyms joined by |)")
    p.add_argument("--proposals", default="dense+windows", metavar="METHODS",
                   help=f"proposal methods joined by '+': {entries_help(PROPOSALS)} (default: dense+windows)")
    p.add_argument("--nms", default="soft-linear", choices=NMS,
                   help="per-class suppression: Soft-NMS linear (default) or Gaussian, hard NMS, or none")
    p.add_argument("--iou-thr", type=float, default=0.3, help="N_t of linear Soft-NMS and hard NMS (default 0.3)")
    p.add_argument("--sigma", type=float, default=0.5, help="Gaussian Soft-NMS: s * exp(-IoU^2 / sigma) "
                                                            "(default 0.5)")
    p.add_argument("--score-thr", type=float, default=0.05, help="drop detections scoring below this "
                                                                 "(default 0.05)")
    p.add_argument("--max-dets", type=int, default=100, help="detections kept per image (default 100)")
    p.add_argument("--context", type=float, default=1.5, help="crop side / the proposal's longer side "
                                                              "(default 1.5)")
    p.add_argument("--window-scales", default="0.125,0.25,0.5",
                   help="window proposals: sides as fractions of the short side (default 0.125,0.25,0.5)")
    p.add_argument("--dense-method", default="sclip", help="dense proposals: the dense method (default sclip; "
                                                           "cliplab segment --help lists them)")
    p.add_argument("--background", help='background queries, comma-separated: they compete with the classes '
                                        'and are never detected, e.g. "background,sky,wall"')
    p.add_argument("--templates", default="openai-80",
                   help="template set (default, openai-7, openai-80), a file, or a string with {c}")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--batch-size", type=int, default=256, help="crops per forward pass")
    add_model_args(p)
    p.set_defaults(run=run)


def _scales(text: str) -> tuple:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--window-scales takes comma-separated numbers, got {text!r}") from None
    if not scales:
        raise UsageError("--window-scales is empty")
    return scales


def run(args) -> int:
    import json
    from pathlib import Path

    from ..data.images import find_images, load_image
    from ..dense.detect import detect
    from ..dense.visualize import draw_detections
    from ..eval.coco import coco_results
    from .segment import _classes

    classes = _classes(args)
    files = find_images(args.paths)
    if not files:
        raise DataError(f"no image files found under {', '.join(args.paths)}")
    scales = _scales(args.window_scales)
    background = [b.strip() for b in args.background.split(",") if b.strip()] if args.background else None
    backbone = load_backbone(args)
    dets = detect(backbone, files, classes, method=args.proposals, nms=args.nms, score_thr=args.score_thr,
                  iou_thr=args.iou_thr, sigma=args.sigma, max_dets=args.max_dets, context=args.context,
                  window_scales=scales, dense_method=args.dense_method, background=background,
                  templates=args.templates, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = dets[0].classes
    images, rows, seen = [], [], set()
    for i, (f, det) in enumerate(zip(files, dets), start=1):
        img = load_image(f)
        stem = f.stem if f.stem not in seen else f"{f.stem}-{i}"
        seen.add(stem)
        images.append({"id": i, "file_name": str(f), "width": img.width, "height": img.height})
        draw_detections(img, det.boxes, det.labels, det.scores, names).save(out / f"{stem}_boxes.png")
        top = ", ".join(f"{names[y]} {s:.2f}" for y, s in zip(det.labels[:3], det.scores[:3]))
        rows.append({"path": str(f), "detections": len(det), "best": top, "picture": str(out / f"{stem}_boxes.png")})
    coco = {"info": {"description": "cliplab detect"}, "images": images, "annotations": [],
            "categories": [{"id": c + 1, "name": n} for c, n in enumerate(names)]}
    (out / "coco.json").write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")
    (out / "detections.json").write_text(json.dumps(coco_results(dets)) + "\n", encoding="utf-8")
    write_rows(rows, "table")
    return 0
