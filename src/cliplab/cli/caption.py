"""``cliplab caption``: caption images with a trained caption head, or train one.

Two forms::

    cliplab caption IMAGES... --captioner DIR [--out FILE.csv|FILE.jsonl] [--beam N]
    cliplab caption --train DIR [--head captioner|lightcap] [--model SPEC] [--steps N]

The first captions image files and folders (searched recursively; shell globs expand to
files) with the head saved in ``DIR`` (:func:`cliplab.generative.captioner.load_captioner`;
the Backbone it was trained on is loaded from the spec it records).  Unreadable images are
skipped, counted and listed on stderr (``--strict`` stops at the first).  Without ``--out``
the captions are printed as a table.

The second trains a head on ShapesWorld captions through the Trainer, the Backbone frozen
(:func:`cliplab.generative.captioner.train_captioner`), and saves it in ``DIR``; the
Trainer's metrics go to ``DIR/train``.

Exit codes: 0 ok, 2 usage, 3 the captioner or its Backbone could not be loaded, 4 no
readable image or an unwritable output.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..errors import DataError, UsageError
from ._common import add_image_args, add_model_args, report_skipped, write_rows

HELP = "caption images with a trained caption head (or train one on ShapesWorld)"


def add_parser(sub) -> None:
    p = sub.add_parser("caption", help=HELP,
                       description="Caption images: cliplab caption IMAGES --captioner DIR. Train a head on "
                                   "ShapesWorld captions (the Backbone frozen): cliplab caption --train DIR "
                                   "[--head captioner|lightcap] [--model SPEC] [--steps N]; the model options are "
                                   "for --train (captioning loads the Backbone the head records). --batch-size "
                                   "defaults to 64 when captioning, 32 when training. Exit codes: 0 ok, "
                                   "2 usage, 3 captioner or model not loadable, 4 no readable image or bad output.")
    p.add_argument("paths", nargs="*", metavar="IMAGE", help="image files or folders (searched recursively)")
    p.add_argument("--captioner", metavar="DIR", help="folder written by 'cliplab caption --train'")
    p.add_argument("--out", help="write the captions to FILE.csv or FILE.jsonl (default: a table on stdout)")
    p.add_argument("--beam", type=int, default=1, help="beam width; 1 = greedy decoding (default: 1)")
    t = p.add_argument_group("training (--train DIR)")
    t.add_argument("--train", metavar="DIR", help="train a caption head on ShapesWorld and save it in DIR")
    t.add_argument("--head", default="captioner",
                   help="caption head to train: captioner (decoder over the patch tokens, default) or "
                        "lightcap (LightCap: CLIP concepts + modulated grid features, light decoder)")
    t.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    t.add_argument("--seed", type=int, default=0, help="seeds the weights, the ShapesWorld and the batches")
    add_model_args(p)
    add_image_args(p)
    p.set_defaults(run=run, batch_size=None)


def run(args) -> int:
    from ..validation import check_positive_int

    check_positive_int("--beam", args.beam)
    if args.train:
        if args.paths or args.captioner or args.out:
            raise UsageError("--train DIR trains a head; give IMAGES, --captioner and --out only when captioning")
        return _train(args)
    if not args.captioner:
        raise UsageError("give --captioner DIR (a head written by 'cliplab caption --train DIR'), or --train DIR")
    if not args.paths:
        raise UsageError("give the IMAGES to caption (files or folders)")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".csv", ".jsonl"):
        raise UsageError(f"--out must end in .csv or .jsonl, got {out.name}")
    from ..data.images import DEFAULT_MAX_PIXELS, find_images
    from ..generative.captioner import load_captioner

    files = find_images(args.paths)
    if not files:
        raise DataError(f"no image files found under {', '.join(args.paths)}")
    head = load_captioner(args.captioner, device=args.device)
    res = head.caption(files, beam=args.beam, batch_size=args.batch_size or 64,
                       on_error="raise" if args.strict else "skip", workers=args.workers or 0,
                       max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None))
    rows = [{"path": str(files[i]), "caption": c} for i, c in zip(res.kept, res.captions)]
    if not rows:
        report_skipped(res.skipped)
        raise DataError(f"none of the {len(files)} image(s) could be read")
    if out is None:
        write_rows(rows, "table")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8", newline="") as f:
            if out.suffix == ".csv":
                w = csv.DictWriter(f, fieldnames=["path", "caption"])
                w.writeheader()
                w.writerows(rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} captions to {out}", file=sys.stderr)
    report_skipped(res.skipped)
    return 0


def _train(args) -> int:
    from ..generative.captioner import caption_head, head_size, train_captioner
    from ..validation import check_positive_int
    from ._common import load_backbone

    check_positive_int("--steps", args.steps)
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    cls = caption_head(args.head)
    bb = load_backbone(args)
    head = cls.build(bb, seed=args.seed)
    out = Path(args.train)
    train_captioner(head, steps=args.steps, batch_size=args.batch_size or 32, lr=args.lr,
                    warmup_steps=min(20, args.steps // 10), seed=args.seed, out_dir=out / "train")
    head.save(out)
    size = head_size(head)
    print(f"trained a {args.head} head ({size['params']:,} parameters, {size['mb']:.2f} MB) on {bb.name} "
          f"for {args.steps} steps; saved to {out}", file=sys.stderr)
    return 0
