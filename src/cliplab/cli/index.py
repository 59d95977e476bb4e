"""``cliplab index``: build a search index (``cliplab index build SRC --out IDX``) or show one.

SRC is an image folder (or files), embedded on the way through the feature cache, so an
interrupted build started again embeds only what is missing; or embeddings written by
``cliplab embed`` (``F.npy`` with its sidecar, ``F.parquet``, a folder of parquet shards).
"""

from __future__ import annotations

import sys

HELP = "build a FAISS search index of images or embeddings, or show one"


def add_parser(sub) -> None:
    from ..index.types import DEFAULT_BUDGET_MB, INDEX_TYPES
    from ._common import add_image_args, add_model_args, entries_help

    p = sub.add_parser("index", help=HELP,
                       description="Search indexes: `cliplab index build SRC --out IDX`, then "
                                   "`cliplab search IDX --text ...` or `cliplab serve --index IDX`.")
    p.set_defaults(run=run)
    commands = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    b = commands.add_parser("build", help="build an index from images or embeddings",
                            description="Build an index from an image folder (embedded with --model, "
                                        "through the feature cache), or from cliplab embed's output "
                                        "(F.npy with F.npy.json, F.parquet, or a folder of parquet shards).")
    b.add_argument("src", nargs="+", metavar="SRC",
                   help="image files/folders, or one .npy, .parquet or folder of parquet shards")
    b.add_argument("--out", required=True, help="index folder to write (an index there is replaced)")
    b.add_argument("--budget-mb", type=float, default=None,
                   help=f"memory the index may take, in MiB; chooses the index type "
                        f"(default: {DEFAULT_BUDGET_MB})")
    b.add_argument("--index-type", default="auto", choices=["auto", *INDEX_TYPES.names()],
                   help=f"auto (the rule of docs/search.md) or one of: {entries_help(INDEX_TYPES)}")
    b.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 against exact search that approximate indexes are tuned to "
                        "(default: 0.95)")
    b.add_argument("--cache",
                   help="feature cache folder (default: $CLIPLAB_CACHE or ~/.cache/cliplab/features)")
    b.add_argument("--no-cache", action="store_true", help="embed in memory, without the cache")
    add_model_args(b)
    add_image_args(b)
    b.set_defaults(run=run)
    i = commands.add_parser("info", help="show an index's manifest", description="Print an index's manifest.")
    i.add_argument("index", metavar="IDX")
    i.add_argument("--format", choices=["table", "json"], default="table")
    i.set_defaults(run=run)


def run(args) -> int:
    from ..errors import UsageError

    command = getattr(args, "index_command", None)
    if command == "build":
        return _build(args)
    if command == "info":
        return _info(args)
    raise UsageError("choose a sub-command: cliplab index build SRC --out IDX, or cliplab index info IDX")


def _build(args) -> int:
    import os
    from pathlib import Path

    from ..index import SearchIndex, embed_images, read_features
    from ._common import image_kwargs, load_backbone, report_skipped
    from .embed import _store

    from ..validation import check_number

    if args.budget_mb is not None:
        check_number("--budget-mb", args.budget_mb, minimum=0.0, strict_minimum=True)
    check_number("--target-recall", args.target_recall, minimum=0.0, maximum=1.0, strict_minimum=True)
    first = Path(args.src[0])
    embedded = len(args.src) == 1 and (first.suffix in (".npy", ".parquet") or (
        first.is_dir() and any(first.rglob("*.parquet"))))
    if embedded:
        col = read_features(first)
        print(f"read {len(col.paths)} x {col.features.shape[1]} embeddings of {col.model} from {first}",
              file=sys.stderr)
    else:
        bb = load_backbone(args)
        spec = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
        col = embed_images(args.src, bb, model=spec, store=_store(args, bb), **image_kwargs(args))
        report_skipped(col.skipped)
    idx = SearchIndex.build(col.features, col.paths, args.out, model=col.model, fingerprint=col.fingerprint,
                            metadata=col.metadata, budget_mb=args.budget_mb, index_type=args.index_type,
                            target_recall=args.target_recall)
    m = idx.manifest
    recall = ("exact" if m["search_value"] is None
              else f"recall@10 {m['recall_at_10']:.3f} at setting {m['search_value']}")
    print(f"wrote {args.out}: {len(idx)} x {idx.dim} {idx.index_type} index ({recall}; "
          f"about {m['memory_bytes'] / 2 ** 20:.1f} MB), model {idx.model}", file=sys.stderr)
    return 0


def _info(args) -> int:
    import json

    from ..index import SearchIndex
    from ._common import write_rows

    idx = SearchIndex.load(args.index)
    if args.format == "json":
        print(json.dumps(idx.manifest, indent=2))
    else:
        write_rows([{"field": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
                    for k, v in idx.manifest.items()], "table")
    return 0
