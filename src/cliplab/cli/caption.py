"""``cliplab caption``: caption images with a trained caption head, or train one.

Two forms::

    cliplab caption IMAGES... --captioner DIR [--out FILE.csv|FILE.jsonl] [--beam N] [--model SPEC]
    cliplab caption --train DIR [--head captioner|lightcap] [--model SPEC] [--steps N]

The first captions image files and folders (searched recursively; shell globs expand to
files) with the head saved in ``DIR`` (:func:`cliplab.generative.captioner.load_captioner`;
the Backbone it was trained on is loaded from the spec it records, or from ``--model``,
whose fingerprint must match).  Images are decoded by the Backbone's image path
(``--workers``, ``--draft``, ``--max-pixels``).  Unreadable images are skipped, counted and
listed on stderr (``--strict`` stops at the first).  With ``--out`` the file is opened
first and each batch's captions are written as soon as they are decoded, so an interrupted
run (exit 130) keeps the finished ones; without it the captions are printed as a table.

The second trains a head on ShapesWorld captions through the Trainer, the Backbone frozen
(:func:`cliplab.generative.captioner.train_captioner`), and saves it in ``DIR``; the
Trainer's metrics and checkpoints (the head's weights only) go to ``DIR/train``.

Exit codes: 0 ok, 2 usage, 3 the captioner or its Backbone could not be loaded, 4 no
readable image or an unwritable output, 130 interrupted (finished captions kept in --out).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..errors import DataError, UsageError
from ._common import DEFAULT_MODEL, add_image_args, add_model_args, load_backbone, report_skipped, write_rows

HELP = "caption images with a trained caption head (or train one on ShapesWorld)"


def add_parser(sub) -> None:
    p = sub.add_parser("caption", help=HELP,
                       description="Caption images: cliplab caption IMAGES --captioner DIR. Train a head on "
                                   "ShapesWorld captions (the Backbone frozen): cliplab caption --train DIR "
                                   "[--head captioner|lightcap] [--model SPEC] [--steps N]. Captioning loads the "
                                   "Backbone the head records, or --model SPEC (its fingerprint must match), in "
                                   "the precision the head was trained in (--precision must match it). --batch-size defaults to "
                                   "64 when captioning (at most the number of images), 32 when training. With "
                                   "--out, each batch is written as it finishes. Exit codes: 0 ok, 2 usage, "
                                   "3 captioner or model not loadable, 4 no readable image or bad output, "
                                   "130 interrupted (finished captions kept).")
    p.add_argument("paths", nargs="*", metavar="IMAGE", help="image files or folders (searched recursively)")
    p.add_argument("--captioner", metavar="DIR", help="folder written by 'cliplab caption --train'")
    p.add_argument("--out", help="write the captions to FILE.csv or FILE.jsonl (default: a table on stdout)")
    p.add_argument("--beam", type=int, default=1,
                   help="beam width; 1 = greedy decoding (default: 1; at most 64 and the head's vocabulary)")
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
    p.set_defaults(run=run, batch_size=None, model=None, precision=None)


def run(args) -> int:
    from ..generative.captioner import MAX_BEAM
    from ..validation import check_positive_int

    check_positive_int("--beam", args.beam)
    if args.beam > MAX_BEAM:
        raise UsageError(f"--beam {args.beam} is too wide: at most {MAX_BEAM}")
    if args.batch_size is not None:
        check_positive_int("--batch-size", args.batch_size)
    if args.workers is not None:
        check_positive_int("--workers", args.workers, minimum=0)
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
        raise UsageError(f"--out must end in .csv or .jsonl, got {out}")
    from ..data.images import DEFAULT_MAX_PIXELS, find_images
    from ..generative.captioner import load_captioner, recorded_precision

    files = find_images(args.paths)
    if not files:
        raise DataError(f"no image files found under {', '.join(args.paths)}")
    if args.model:
        args.precision = args.precision or recorded_precision(args.captioner)
        head = load_captioner(args.captioner, load_backbone(args))
    else:
        head = load_captioner(args.captioner, device=args.device, precision=args.precision)
    head.check_beam(args.beam)
    captions = head.iter_captions(files, beam=args.beam, batch_size=args.batch_size or 64,
                                  on_error="raise" if args.strict else "skip", workers=args.workers,
                                  draft=args.draft,
                                  max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None))
    if out is None:
        rows, skipped = [], []
        try:
            for part in captions:
                rows.extend({"path": str(files[i]), "caption": c} for i, c in zip(part.kept, part.captions))
                skipped.extend(part.skipped)
        except KeyboardInterrupt:
            if rows:
                write_rows(rows, "table")
            raise
        if not rows:
            report_skipped(skipped)
            raise DataError(f"none of the {len(files)} image(s) could be read")
        write_rows(rows, "table")
    else:
        n, skipped = _write_incrementally(out, files, captions)
        if not n:
            report_skipped(skipped)
            raise DataError(f"none of the {len(files)} image(s) could be read")
        print(f"wrote {n} captions to {out}", file=sys.stderr)
    report_skipped(skipped)
    return 0


def _write_incrementally(out: Path, files, captions) -> tuple[int, list]:
    """Open ``out`` first, then write each batch of ``captions`` as it comes (flushed).

    An interrupted or failed run leaves the finished captions in ``out``; a run with no
    readable image removes the file it created.  Returns (captions written, skipped records).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    n, skipped = 0, []
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption"]) if out.suffix == ".csv" else None
        if writer is not None:
            writer.writeheader()
        try:
            for part in captions:
                rows = [{"path": str(files[i]), "caption": c} for i, c in zip(part.kept, part.captions)]
                if writer is not None:
                    writer.writerows(rows)
                else:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                f.flush()
                n += len(rows)
                skipped.extend(part.skipped)
        except BaseException as e:      # Ctrl-C or a bad image with --strict: keep what is finished
            if isinstance(e, KeyboardInterrupt) and n:
                print(f"interrupted: kept {n} finished caption(s) in {out}", file=sys.stderr)
            if not n:
                f.close()
                out.unlink(missing_ok=True)
            raise
    if not n:
        out.unlink(missing_ok=True)
    return n, skipped


def _train(args) -> int:
    from ..generative.captioner import caption_head, head_size, train_captioner
    from ..validation import check_positive_int

    check_positive_int("--steps", args.steps)
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.batch_size is not None and args.batch_size < 2:
        raise UsageError(f"--batch-size {args.batch_size}: training takes batches of at least 2 captions")
    cls = caption_head(args.head)
    args.model = args.model or DEFAULT_MODEL
    args.precision = args.precision or "fp32"
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
