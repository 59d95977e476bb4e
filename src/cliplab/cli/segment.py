"""``cliplab segment``: training-free open-vocabulary segmentation of images (see :mod:`cliplab.dense`)."""

from __future__ import annotations

from ..dense import DENSE_METHODS
from ..errors import DataError, UsageError
from ._common import add_model_args, load_backbone, write_rows

HELP = "segment images into free-text classes (MaskCLIP, SCLIP, ClearCLIP...)"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "segment", help=HELP,
        description="Segment images into free-text classes with a training-free dense method. Writes, per "
                    "image, a class-index PNG (pixel value = class index) and a coloured overlay into --out, "
                    "with legend.png and classes.txt. A PATH may be a folder (searched recursively).")
    p.add_argument("paths", nargs="+", metavar="PATH")
    lab = p.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", help='comma-separated classes; synonyms of one class joined by "|", '
                                      'e.g. "cat,dog|puppy,red car"')
    lab.add_argument("--labels-file", help="file with one class per line (synonyms joined by |)")
    p.add_argument("--method", default="sclip", choices=DENSE_METHODS, metavar="METHOD",
                   help="dense method: vanilla, maskclip, sclip, clearclip, ... (default: sclip; the "
                        "registered ones are listed in docs/segmentation.md)")
    p.add_argument("--window", type=int, help="sliding-window side in pixels (default: resize the whole "
                                              "image to the model input); 0 = the model input size")
    p.add_argument("--stride", type=int, help="sliding-window step in pixels (default: window / 2)")
    p.add_argument("--size", type=int, help="with --window: resize images to this short side first")
    p.add_argument("--background", help='background queries, comma-separated (a class "background" is '
                                        'put first, index 0), e.g. "background" or "sky,wall,floor"')
    p.add_argument("--prob-thd", type=float, default=0.0,
                   help="pixels whose top probability is below this get class 0 (background)")
    p.add_argument("--templates", default="openai-80",
                   help="template set (default, openai-7, openai-80), a file, or a string with {c}")
    p.add_argument("--head", metavar="DIR",
                   help="--method clip-dinoiser: trained heads (a folder written by "
                        "cliplab.dense.clip_dinoiser.train_clip_dinoiser); without it the model's own patch "
                        "correlations pool the features")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    add_model_args(p)
    p.set_defaults(run=run)


def _classes(args) -> list:
    from ..zeroshot import read_labels

    lines = args.labels.split(",") if args.labels is not None else read_labels(args.labels_file)
    classes = []
    for line in lines:
        syn = [s.strip() for s in line.split("|") if s.strip()]
        if syn:
            classes.append(syn if len(syn) > 1 else syn[0])
    if not classes:
        raise UsageError('no labels given: pass --labels "a,b,c" or a non-empty --labels-file')
    return classes


def run(args) -> int:
    from ..data.images import find_images
    from ..dense import segment
    from ..dense.visualize import save_segmentation

    classes = _classes(args)
    files = find_images(args.paths)
    if not files:
        raise DataError(f"no image files found under {', '.join(args.paths)}")
    if args.stride is not None and args.window is None:
        raise UsageError("--stride needs --window")
    if args.size is not None and args.window is None:
        raise UsageError("--size needs --window (without it each image is resized to the model input)")
    if args.head is not None and args.method != "clip-dinoiser":
        raise UsageError("--head is for --method clip-dinoiser")
    options = {"head": args.head} if args.head is not None else {}
    backbone = load_backbone(args)
    window = True if args.window == 0 else args.window
    background = [b.strip() for b in args.background.split(",") if b.strip()] if args.background else None
    res = segment(backbone, files, classes, method=args.method, window=window, stride=args.stride,
                  size=args.size, background=background, prob_thd=args.prob_thd, templates=args.templates,
                  batch_size=args.batch_size, **options)
    rows = save_segmentation(res, files, args.out)
    write_rows([{"path": str(f), "mask": str(r["mask"]), "classes": ", ".join(r["classes"])}
                for f, r in zip(files, rows)], "table")
    return 0
