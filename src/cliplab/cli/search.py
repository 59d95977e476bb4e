"""``cliplab search IDX --text "..." | --image q.png``: the nearest items of an index.

The query is embedded with the index's model (``--model`` to point elsewhere at the same
weights); another model is refused (exit 2), as its features are not comparable.
"""

from __future__ import annotations

HELP = "search an index by text or by image"


def add_parser(sub) -> None:
    from ._common import add_model_args

    p = sub.add_parser("search", help=HELP,
                       description="Search an index built by `cliplab index build`: the K items "
                                   "closest to a text or to an image, with scores and paths.")
    p.add_argument("index", metavar="IDX", help="index folder")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="query text")
    q.add_argument("--image", help="query image file")
    p.add_argument("--k", type=int, default=10, help="number of results (default: 10)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    add_model_args(p)
    p.set_defaults(model=None, run=run)   # default: the model recorded in the index


def run(args) -> int:
    import json

    from ..errors import ModelLoadError
    from ..index import SearchIndex
    from ..validation import check_positive_int
    from ._common import load_backbone, write_rows

    check_positive_int("--k", args.k)
    idx = SearchIndex.load(args.index)
    try:
        bb = load_backbone(args, args.model or idx.model)
    except ModelLoadError as e:
        if args.model:
            raise
        raise type(e)(f"{e} (the model the index records; give --model SPEC of the same weights)") from None
    idx.check_model(bb)
    if args.text is not None:
        query = bb.encode_texts([args.text], progress=False)
    else:
        query = bb.encode_images([args.image], progress=False).features
    hits = idx.search(query, k=args.k)[0]
    rows = [{"rank": r, "score": h.score, "id": h.id, "path": h.path} for r, h in enumerate(hits, 1)]
    if args.format == "json":
        print(json.dumps([{**row, "metadata": h.metadata} for row, h in zip(rows, hits)], indent=2))
    else:
        write_rows(rows, "table")
    return 0
