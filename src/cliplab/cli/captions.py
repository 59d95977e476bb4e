"""``cliplab captions rewrite``: add LaCLIP language rewrites to a caption table."""

from __future__ import annotations

HELP = "caption tables: add LaCLIP rewrites as extra phrasings"


def add_parser(sub) -> None:
    p = sub.add_parser("captions", help=HELP, description=(
        "Work on CSV/JSONL caption tables. 'rewrite' writes a JSONL table whose rows hold every image's "
        "captions followed by N meaning-preserving rewrites of each (LaCLIP, arXiv:2305.20088; rule-based: "
        "lead-ins, clause order, synonyms, colour placement, articles and plurals); training on it "
        "(cliplab train --data OUT) draws one phrasing per image per step."))
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = actions.add_parser("rewrite", help="add N rewrites of every caption (JSONL out)")
    r.add_argument("table", metavar="TABLE", help=".csv, .tsv or .jsonl with an image path and a caption column")
    r.add_argument("--out", required=True, help="the .jsonl table to write")
    r.add_argument("-n", "--n", type=int, default=4, help="rewrites per caption (default: 4, as LaCLIP)")
    r.add_argument("--seed", type=int, default=0, help="fixes the rewrites (default: 0)")
    r.add_argument("--image-key", default="filepath", help="image path column (default: filepath, or image/path...)")
    r.add_argument("--caption-key", default="caption", help="caption column (default: caption, or text...)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.rewrites import rewrite_table
    from ..errors import UsageError

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if not str(args.out).lower().endswith((".jsonl", ".ndjson")):
        raise UsageError(f"--out {args.out}: the rewritten table is JSONL; give a .jsonl path")
    stats = rewrite_table(args.table, args.out, n=args.n, seed=args.seed, image_key=args.image_key,
                          caption_key=args.caption_key)
    if not stats["images"]:
        from ..errors import DataError

        raise DataError(f"{args.table}: no usable row ({stats['skipped']} skipped); nothing was rewritten")
    print(f"{stats['images']} images, {stats['captions']} captions, {stats['rewrites']} rewrites added "
          f"({stats['skipped']} rows skipped) -> {args.out}")
    return 0
