"""``cliplab embed``: write image or text embeddings to .npy or .parquet.

Features go through a :class:`~cliplab.features.FeatureStore` (``--cache``, default as
``cliplab eval``), saved chunk by chunk as they are computed: an interrupted run, even a
killed one, started again computes only what the first run had not saved and writes
exactly the features an uninterrupted run writes.  ``--no-cache`` computes in memory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..data.text import read_lines
from ..errors import DataError, UsageError
from ._common import add_image_args, add_model_args, image_kwargs, load_backbone, report_skipped

HELP = "embed images or texts into L2-normalised features"

_CHUNK = 256  # items per saved chunk, rounded to whole batches


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help=HELP,
                       description="Embed images (files or folders) or texts. Writes F.npy with a "
                                   "F.npy.json sidecar (paths/texts, model, fingerprint), or F.parquet.")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--texts", help="embed the lines of this text file instead of images")
    p.add_argument("--out", required=True, help="output file: .npy or .parquet")
    p.add_argument("--cache", help="feature cache folder; a run started again after an interruption "
                                   "computes only what is missing (default: $CLIPLAB_CACHE or "
                                   "~/.cache/cliplab/features)")
    p.add_argument("--no-cache", action="store_true", help="compute features in memory, without the cache")
    add_model_args(p)
    add_image_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.images import find_images
    from ..features import embed

    out = Path(args.out)
    if out.suffix not in (".npy", ".parquet"):
        raise UsageError(f"--out must end in .npy or .parquet, got {out.name}")
    if bool(args.texts) == bool(args.paths):
        raise UsageError("give image PATHs or --texts FILE (exactly one of them)")
    if args.texts:
        items, kind = read_lines(args.texts, what="texts file", comments=False), "text"
        if not items:
            raise DataError(f"{args.texts}: the texts file has no non-empty lines")
    else:
        items, kind = find_images(args.paths), "image"
        if not items:
            raise DataError(f"no image files found under {', '.join(args.paths)}")
    bb = load_backbone(args)
    store = _store(args, bb)
    res = embed(bb, items, kind=kind, store=store, strict=args.strict,
                **(image_kwargs(args) if kind == "image" else {}))
    if kind == "image" and res.n_cached:
        print(f"{res.n_cached} of {len(items)} image features read from the cache {store.path}",
              file=sys.stderr)
    feats, skipped = res.features, res.skipped
    items = [str(items[i]) for i in res.kept]
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": bb.name, "fingerprint": bb.fingerprint, "kind": kind, "dim": int(feats.shape[1]),
            "skipped": [{"source": s.source, "reason": s.reason} for s in skipped]}
    if out.suffix == ".npy":
        _atomic(out, lambda f: np.save(f, feats))
        _atomic(Path(str(out) + ".json"),
                lambda f: f.write(json.dumps({**meta, "items": items}, indent=1).encode()))
    else:
        _atomic(out, lambda f: _write_parquet(f, items, feats, kind, meta))
    print(f"wrote {feats.shape[0]} x {feats.shape[1]} {kind} embeddings to {out}", file=sys.stderr)
    report_skipped(skipped)
    return 0


def _store(args, backbone):
    """The FeatureStore of ``--cache`` (``None`` with ``--no-cache``)."""
    if args.no_cache:
        return None
    from ..features import FeatureStore
    from .eval import default_cache

    batch = max(1, int(getattr(args, "batch_size", 64) or 64))
    return FeatureStore(args.cache or default_cache(), backbone,
                        chunk_size=batch * max(1, _CHUNK // batch))


def _atomic(path: Path, write) -> None:
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it over
    ``path``: an interrupted run never leaves a half-written output."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_parquet(out, items, feats: np.ndarray, kind: str, meta: dict) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError("writing .parquet needs pyarrow: pip install 'cliplab[parquet]' (or use .npy)") from e
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    table = pa.table({"path" if kind == "image" else "text": items, "embedding": col})
    table = table.replace_schema_metadata({"cliplab": json.dumps(meta)})
    pq.write_table(table, out)
