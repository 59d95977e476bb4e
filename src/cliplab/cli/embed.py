"""``cliplab embed``: write image or text embeddings to .npy or .parquet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..data.text import read_lines
from ..errors import DataError, UsageError
from ._common import add_image_args, add_model_args, all_unreadable, image_kwargs, load_backbone, report_skipped


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed images or texts into L2-normalised features",
                       description="Embed images (files or folders) or texts. Writes F.npy with a "
                                   "F.npy.json sidecar (paths/texts, model, fingerprint), or F.parquet.")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--texts", help="embed the lines of this text file instead of images")
    p.add_argument("--out", required=True, help="output file: .npy or .parquet")
    add_model_args(p)
    add_image_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.images import find_images

    out = Path(args.out)
    if out.suffix not in (".npy", ".parquet"):
        raise UsageError(f"--out must end in .npy or .parquet, got {out.name}")
    if bool(args.texts) == bool(args.paths):
        raise UsageError("give image PATHs or --texts FILE (exactly one of them)")
    if args.texts:
        items = read_lines(args.texts, what="texts file", comments=False)
        if not items:
            raise DataError(f"{args.texts}: the texts file has no non-empty lines")
        bb = load_backbone(args)
        feats, skipped, kind = bb.encode_texts(items), [], "text"
    else:
        files = find_images(args.paths)
        if not files:
            raise DataError(f"no image files found under {', '.join(args.paths)}")
        bb = load_backbone(args)
        if args.strict:
            feats, skipped = bb.encode_images(files, **image_kwargs(args)), []
        else:
            feats, skipped = bb.encode_images(files, on_error="skip", **image_kwargs(args))
        if len(skipped) == len(files):
            raise all_unreadable(skipped)
        bad = {s.index for s in skipped}
        items, kind = [str(f) for i, f in enumerate(files) if i not in bad], "image"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": bb.name, "fingerprint": bb.fingerprint, "kind": kind, "dim": int(feats.shape[1]),
            "skipped": [{"source": s.source, "reason": s.reason} for s in skipped]}
    if out.suffix == ".npy":
        np.save(out, feats)
        Path(str(out) + ".json").write_text(json.dumps({**meta, "items": items}, indent=1))
    else:
        _write_parquet(out, items, feats, kind, meta)
    print(f"wrote {feats.shape[0]} x {feats.shape[1]} {kind} embeddings to {out}", file=sys.stderr)
    report_skipped(skipped)
    return 0


def _write_parquet(out: Path, items, feats: np.ndarray, kind: str, meta: dict) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError("writing .parquet needs pyarrow: pip install 'cliplab[parquet]' (or use .npy)") from e
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    table = pa.table({"path" if kind == "image" else "text": items, "embedding": col})
    table = table.replace_schema_metadata({"cliplab": json.dumps(meta)})
    pq.write_table(table, out)
