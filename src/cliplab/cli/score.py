"""``cliplab score``: CLIPScore, RefCLIPScore and misaligned words of image captions."""

from __future__ import annotations

from ..errors import DataError, UsageError
from ._common import add_model_args, load_backbone, report_skipped, write_rows

HELP = "score captions against their images (CLIPScore, RefCLIPScore, misaligned words)"


def add_parser(sub) -> None:
    p = sub.add_parser("score", help=HELP, description=(
        "Score each caption of a table against its image: CLIPScore (w = 2.5, 'A photo depicts ' prefix), "
        "RefCLIPScore with --references, and the CLIP4DM word attribution: the words flagged as "
        "misaligned and F-CLIPScore (0 = no misaligned word; more negative = worse)."))
    p.add_argument("images", metavar="IMAGES", help="folder the image paths of the tables are relative to")
    p.add_argument("--captions", required=True, metavar="CSV",
                   help="table (.csv, .tsv, .jsonl) with an image path column and a caption column; "
                        "one row per caption")
    p.add_argument("--references", metavar="CSV", help="table of reference captions (same form) for RefCLIPScore")
    p.add_argument("--image-key", default="filepath", help="image path column (default: filepath, or image/path...)")
    p.add_argument("--caption-key", default="caption", help="caption column (default: caption, or text...)")
    p.add_argument("--mode", choices=["most_negative", "threshold"], default="most_negative",
                   help="flag the most negative word (one error per caption), or every word below --eps")
    p.add_argument("--eps", type=float, default=-5e-5, help="threshold of --mode threshold (default: -5e-5)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--batch-size", type=int, default=64)
    add_model_args(p)
    p.set_defaults(run=run)


def _table(path, root, args, what):
    from ..data.sources import SkipLog, read_caption_table

    log = SkipLog()
    records = read_caption_table(path, image_key=args.image_key, caption_key=args.caption_key, root=root,
                                 skip_log=log)
    if not records:
        raise DataError(f"{path}: no usable rows in the {what} table" + (f" ({log.summary()})" if log else ""))
    return records


def run(args) -> int:
    from pathlib import Path

    from ..dense.misalignment import PREFIX, clip_score, ref_clip_score, word_attributions
    from ..validation import check_positive_int

    check_positive_int("--batch-size", args.batch_size)
    root = Path(args.images)
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder; IMAGES is the folder the tables' image paths are relative to")
    records = _table(args.captions, root, args, "captions")
    refs = None
    if args.references:
        refs = {str(r.image): r.captions for r in _table(args.references, root, args, "references")}
        missing = [str(r.image) for r in records if str(r.image) not in refs]
        if missing:
            raise DataError(f"{args.references}: no reference captions for {missing[0]}"
                            + (f" and {len(missing) - 1} more image(s)" if len(missing) > 1 else ""))
    backbone = load_backbone(args)
    enc = backbone.encode_images([r.image for r in records], batch_size=args.batch_size, on_error="skip")
    kept = [records[i] for i in enc.kept]
    pairs = [(r, c, f) for r, f in zip(kept, enc.features) for c in r.captions]
    if not pairs:
        report_skipped(enc.skipped)
        raise DataError("no image could be read; nothing to score")
    import numpy as np

    feats = np.stack([f for _, _, f in pairs])
    captions = [c for _, c, _ in pairs]
    text = backbone.encode_texts([PREFIX + c for c in captions], batch_size=256)
    cs = clip_score(feats, text)
    attr = word_attributions(backbone, feats, captions, batch_size=args.batch_size)
    if refs is not None:
        ref_feats = [backbone.encode_texts([PREFIX + c for c in refs[str(r.image)]]) for r, _, _ in pairs]
        rcs = ref_clip_score(feats, text, ref_feats)
    rows = []
    for k, ((rec, caption, _), a) in enumerate(zip(pairs, attr)):
        flagged = a.flagged(args.mode, args.eps)
        row = {"image": str(rec.image), "caption": caption, "clip_score": float(cs[k])}
        if refs is not None:
            row["ref_clip_score"] = float(rcs[k])
        row["f_clip_score"] = a.f_clip_score(args.mode, args.eps)
        row["misaligned"] = " ".join(a.words[i] for i in flagged)
        if args.format == "json":
            row["word_scores"] = {f"{i}:{w}": (None if np.isnan(s) else float(s))
                                  for i, (w, s) in enumerate(zip(a.words, a.scores))}
        rows.append(row)
    write_rows(rows, args.format)
    report_skipped(enc.skipped)
    return 0
