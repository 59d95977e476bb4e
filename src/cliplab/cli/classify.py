"""``cliplab classify``: zero-shot classification of images (files or folders)."""

from __future__ import annotations

from ..errors import DataError, UsageError
from ._common import add_image_args, add_model_args, image_kwargs, load_backbone, report_skipped, write_rows

HELP = "classify images zero-shot into free-text labels"


def add_parser(sub) -> None:
    p = sub.add_parser("classify", help=HELP,
                       description="Classify images zero-shot. A PATH may be a folder (searched recursively).")
    p.add_argument("paths", nargs="+", metavar="PATH")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog,red car"')
    lab.add_argument("--labels-file", help="file with one class name per line (or a JSON list)")
    p.add_argument("--adapter", metavar="DIR",
                   help="classify with a few-shot adapter made by 'cliplab adapt' (its classes replace --labels)")
    p.add_argument("--templates", default="default",
                   help="template set (default, openai-7, openai-80), a file, or a string with {c}")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    add_model_args(p)
    add_image_args(p)
    p.set_defaults(run=run)


def parse_labels(args) -> list[str]:
    from ..zeroshot import read_labels

    if args.labels is not None:
        labels = [s.strip() for s in args.labels.split(",") if s.strip()]
        if not labels:
            raise UsageError("no labels given: pass --labels \"a,b,c\" or a non-empty --labels-file")
        return labels
    labels = read_labels(args.labels_file)
    if not labels:
        raise DataError(f"{args.labels_file}: the labels file has no labels; write one class name per line")
    return labels


def run(args) -> int:
    from ..data.images import find_images
    from ..validation import check_positive_int
    from ..zeroshot import ZeroShotClassifier, classify_images

    check_positive_int("--top-k", args.top_k)
    given = args.labels is not None or args.labels_file is not None
    if args.adapter and given:
        raise UsageError("--adapter brings its own classes; drop --labels/--labels-file")
    if not args.adapter and not given:
        raise UsageError("give the classes: --labels \"a,b,c\", --labels-file FILE or --adapter DIR")
    labels = None if args.adapter else parse_labels(args)
    files = find_images(args.paths)
    if not files:
        raise DataError(f"no image files found under {', '.join(args.paths)}")
    backbone = load_backbone(args)
    if args.adapter:
        from ..adapt.fewshot import load_fitted

        clf, names = load_fitted(args.adapter, backbone)
    else:
        clf, names = ZeroShotClassifier(backbone, labels, templates=args.templates), None
    res = classify_images(clf, files, classnames=names, k=args.top_k, strict=args.strict, **image_kwargs(args))
    rows = []
    for path, n, pr in zip(res.items, res.labels, res.probs):
        if args.format == "json":
            rows.append({"path": str(path), "predictions": [
                {"label": str(a), "prob": float(b)} for a, b in zip(n, pr)]})
        elif args.format == "csv":
            rows.extend({"path": str(path), "rank": r + 1, "label": str(a), "prob": round(float(b), 6)}
                        for r, (a, b) in enumerate(zip(n, pr)))
        else:
            row = {"path": str(path), "label": str(n[0]), "prob": float(pr[0])}
            for r in range(1, len(n)):
                row[f"#{r + 1}"] = f"{n[r]} ({pr[r]:.3f})"
            rows.append(row)
    write_rows(rows, args.format)
    report_skipped(res.skipped)
    return 0
