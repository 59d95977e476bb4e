"""``cliplab captions rewrite|compress``: LaCLIP rewrites, or Nano-Capsulator capsules of long captions."""

from __future__ import annotations

from ._common import add_model_args

HELP = "caption tables: add LaCLIP rewrites, or compress long captions to fit the text tower"


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
    c = actions.add_parser("compress", help="rewrite captions longer than the text tower's context as short capsules",
                           description=(
        "Rewrite every caption longer than the model's context (77 tokens for OpenAI CLIP, 32 for shapes-tiny) "
        "into a capsule: the caption's own sentences, possibly without function words, chosen to keep its "
        "embedding (Nano-Capsulator, arXiv:2402.18700; a greedy search instead of a fine-tuned LLM, see "
        "cliplab.generative.capsulator). Shorter captions are kept as they are. Writes a JSONL table with "
        "the capsules in 'caption' and the originals in 'original'."))
    c.add_argument("table", metavar="TABLE", help=".csv, .tsv or .jsonl with an image path and a caption column")
    c.add_argument("--out", required=True, help="the .jsonl table to write")
    c.add_argument("--budget", type=int, default=None,
                   help="most tokens of a capsule, start and end included (default: the model's context)")
    c.add_argument("--image-key", default="filepath", help="image path column (default: filepath, or image/path...)")
    c.add_argument("--caption-key", default="caption", help="caption column (default: caption, or text...)")
    add_model_args(c)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.rewrites import rewrite_table
    from ..errors import UsageError

    if args.action == "compress":
        return _compress(args)
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


#: Below this many tokens (start and end included) a capsule holds a few words only.
MIN_USEFUL_BUDGET = 10


def _compress(args) -> int:
    import json
    import sys
    from pathlib import Path

    from ..data.sources import SkipLog, read_caption_table
    from ..errors import DataError, UsageError
    from ..generative.capsulator import Capsulator
    from ._common import load_backbone

    if not str(args.out).lower().endswith((".jsonl", ".ndjson")):
        raise UsageError(f"--out {args.out}: the compressed table is JSONL; give a .jsonl path")
    out = Path(args.out)
    if out.is_dir():
        raise DataError(f"--out {out}: is a folder; give a .jsonl file path")
    try:                                                   # before the work, not after it
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out {out}: cannot create its folder ({e.strerror or e})") from None
    skipped = SkipLog()
    records = read_caption_table(args.table, image_key=args.image_key, caption_key=args.caption_key,
                                 skip_log=skipped)
    for s in skipped.to_list()[:5]:
        print(f"skipped {s.source}: {s.reason}", file=sys.stderr)
    if not records:
        raise DataError(f"{args.table}: no usable row ({skipped.count} skipped); nothing was compressed")
    bb = load_backbone(args)
    cap = Capsulator(bb, budget=args.budget)
    if cap.budget < MIN_USEFUL_BUDGET:
        print(f"warning: --budget {cap.budget} leaves room for only a few words per capsule", file=sys.stderr)
    texts = list(dict.fromkeys(t for rec in records for t in rec.captions))
    long = [t for t in texts if cap.n_tokens(t) > cap.budget]
    capsules = dict(zip(long, cap.fit(texts).compress(long))) if long else {}
    with open(out, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({"filepath": str(rec.image), "caption": [capsules.get(t, t) for t in rec.captions],
                                "original": list(rec.captions)}) + "\n")
    print(f"{len(records)} images, {len(texts)} distinct captions, {len(long)} longer than {cap.budget} tokens "
          f"compressed ({skipped.count} rows skipped) -> {out}")
    if cap.n_cut_:
        print(f"{cap.n_cut_} caption(s) had no sentence or phrase within {cap.budget} tokens and were cut to "
              "their first tokens instead", file=sys.stderr)
    return 0
