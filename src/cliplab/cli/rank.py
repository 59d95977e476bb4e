"""``cliplab rank``: order images by a text ("how many objects"), zero-shot or with a trained
ranking adapter; ``--fit`` trains one (:mod:`cliplab.adapt.ranking`)."""

from __future__ import annotations

import sys

from ..errors import DataError, UsageError
from ._common import add_image_args, add_model_args, image_kwargs, load_backbone, report_skipped, write_rows

HELP = "order images by a text (zero-shot similarity or a trained ranking adapter); --fit trains one"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rank", help=HELP,
        description="Rank IMAGES (files or folders) from most to least: without --adapter by the "
                    "similarity of each image to the --by text (zero-shot), with --adapter by the scores "
                    "of a ranking adapter.  'cliplab rank --fit DATASET --target NAME --out DIR' trains a "
                    "ranking adapter on the per-example values NAME of DATASET (e.g. shapes:count with "
                    "target count) and saves it for --adapter.")
    p.add_argument("paths", nargs="*", metavar="IMAGES")
    p.add_argument("--by", help="what to rank by: zero-shot, the text the images are compared with; with "
                                "--fit, the instruction the adapter reads (default 'Rank the images by TARGET.')")
    p.add_argument("--adapter", metavar="DIR", help="rank with a ranking adapter made by 'cliplab rank --fit'")
    p.add_argument("--top", type=int, metavar="K", help="print only the first K images")
    p.add_argument("--format", choices=["table", "json"], default="table")
    g = p.add_argument_group("training (--fit)")
    g.add_argument("--fit", metavar="DATASET", help="train a ranking adapter on the train split of DATASET "
                                                    "(shapes:count, shapes:size, or a CSV with a numeric column)")
    g.add_argument("--target", help="per-example value to rank by (e.g. count, area, radius)")
    g.add_argument("--out", help="adapter folder to write")
    g.add_argument("--n", type=int, default=32, help="training images (default: 32)")
    g.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    g.add_argument("--random-state", type=int, default=0, help="seed of the training (default: 0)")
    add_model_args(p)
    add_image_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..validation import check_positive_int

    check_positive_int("--top", args.top, allow_none=True)
    if args.fit:
        if args.paths or args.adapter:
            raise UsageError("--fit trains an adapter; rank images in a second call with --adapter DIR")
        if not args.target or not args.out:
            raise UsageError("--fit needs --target NAME (the value to rank by) and --out DIR")
        return _fit(args)
    if args.target or args.out:
        raise UsageError("--target and --out go with --fit DATASET")
    if not args.paths:
        raise UsageError("give the images to rank (files or folders)")
    if bool(args.adapter) == bool(args.by):
        raise UsageError("give --by TEXT (zero-shot) or --adapter DIR (it brings its own instruction), not both"
                         if args.adapter else "give --by TEXT (what to rank by) or --adapter DIR")
    return _rank(args)


def _fit(args) -> int:
    import numpy as np

    from ..adapt.ranking import RankingAdapter, save_ranker
    from ..data.datasets import load_dataset
    from ..eval.metrics import kendall_tau
    from ..validation import check_positive_int

    check_positive_int("--n", args.n, minimum=2)
    check_positive_int("--epochs", args.epochs)
    data = load_dataset(args.fit, "train", n=args.n, seed=0)
    attrs = getattr(data, "attributes", None) or {}
    if args.target not in attrs:
        raise DataError(f"{args.fit} has no per-example value {args.target!r}; it has: "
                        f"{', '.join(sorted(attrs)) or 'none'}")
    try:
        y = np.asarray(attrs[args.target], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{args.fit}: the values of {args.target!r} are not numbers") from None
    bb = load_backbone(args)
    prompt = args.by or f"Rank the images by {args.target}."
    est = RankingAdapter(backbone=bb, epochs=args.epochs, random_state=args.random_state)
    est.fit(data.items, y, prompt=prompt)
    tau = kendall_tau(est.predict(data.items), y)
    save_ranker(est, args.out, model_spec=str(args.model), dataset=args.fit, target=args.target,
                n_train=len(y), random_state=args.random_state, train_kendall_tau=round(tau, 4),
                trainable_parameters=est.n_trainable_, fit_seconds=round(est.fit_time_, 2))
    print(f"trained a ranking adapter on {len(y)} images of {args.fit} (target {args.target}, "
          f"prompt {prompt!r}; training Kendall tau {tau:.3f}); wrote {args.out}", file=sys.stderr)
    return 0


def _rank(args) -> int:
    import numpy as np

    from ..data.images import find_images

    files = find_images(args.paths)
    if not files:
        raise DataError(f"no image files found under {', '.join(args.paths)}")
    bb = load_backbone(args)
    if args.adapter:
        from ..adapt.fewshot import images_at_model_size
        from ..adapt.ranking import load_ranker

        est = load_ranker(args.adapter, bb)
        images, kept = images_at_model_size(bb, files)
        skipped = len(files) - len(kept)
        if skipped:
            print(f"skipped {skipped} unreadable image(s)", file=sys.stderr)
        scores = est.predict(images) if len(kept) else np.zeros(0)
        by = est.prompt_
    else:
        enc = bb.encode_images(files, **image_kwargs(args))
        report_skipped(enc.skipped)
        kept = enc.kept
        scores = enc.features @ bb.encode_texts([args.by])[0]              # (M,) cosine similarity
        by = args.by
    if len(kept) == 0:
        raise DataError("none of the images could be read")
    order = np.argsort(-scores, kind="stable")[: args.top]
    rows = [{"rank": r + 1, "score": float(scores[i]), "image": str(files[kept[i]])} for r, i in enumerate(order)]
    if args.format == "json":
        write_rows(rows, "json")
    else:
        print(f"ranked by: {by}")
        write_rows(rows, "table")
    return 0
