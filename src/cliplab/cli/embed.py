"""``cliplab embed``: write image or text embeddings to .npy or .parquet.

Features go through a :class:`~cliplab.features.FeatureStore` (``--cache``, default as
``cliplab eval``), saved chunk by chunk as they are computed: an interrupted run, even a
killed one, started again computes only what the first run had not saved and writes
exactly the features an uninterrupted run writes.  ``--no-cache`` computes in memory.

``--engine ray`` spreads the work over a Ray cluster (a local one by default, an existing
one with ``--address``): ``--out`` is then a folder of parquet shards with completion
markers, resumable shard by shard (:mod:`cliplab.scale.ray_embed`).
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
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: Ray Data, decoding on CPU workers and encoding "
                        "in model actors; --out is then a folder of parquet shards, and a rerun of the same "
                        "command finishes an interrupted run (pip install 'cliplab[scale]')")
    g = p.add_argument_group("ray engine")
    g.add_argument("--address", help="existing Ray cluster ('auto', 'ray://head:10001'); default: a local instance")
    g.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    g.add_argument("--object-store-mb", type=int, default=256, help="object store of the local Ray instance "
                                                                     "(default: 256)")
    g.add_argument("--actors", type=int, help="model actors (default: one per GPU, else 1)")
    g.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0; "
                                                        "actors pick their device, --device is not used")
    g.add_argument("--shard-size", type=int, default=8192,
                   help="images per output shard, rounded up to whole batches (default: 8192)")
    g.add_argument("--image-key", default="filepath", help="path column of parquet tables given as PATH "
                                                           "(default: filepath, or an alias such as path)")
    add_model_args(p)
    add_image_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.images import find_images
    from ..features import embed

    if args.engine == "ray":
        return _run_ray(args)
    if args.address:
        raise UsageError("--address needs --engine ray")
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


def _run_ray(args) -> int:
    from ..scale.ray_embed import embed_ray

    if args.texts:
        raise UsageError("--engine ray embeds images; embed --texts with the local engine")
    if not args.paths:
        raise UsageError("give image PATHs (folders, files, WebDataset .tar shards or a .parquet of paths)")
    if args.cache or args.no_cache:
        raise UsageError("--cache/--no-cache are for the local engine; the ray engine resumes from the "
                         "shard markers in --out")
    if Path(args.out).suffix in (".npy", ".parquet"):
        raise UsageError(f"with --engine ray, --out is a folder of parquet shards, not {Path(args.out).name}")
    kw = image_kwargs(args)
    res = embed_ray(args.paths, args.out, model=args.model, batch_size=kw["batch_size"], draft=kw["draft"],
                    max_pixels=kw["max_pixels"], image_key=args.image_key, shard_size=args.shard_size,
                    load_kwargs=dict(precision=args.precision, arch=args.arch, config=args.config,
                                     quick_gelu=args.quick_gelu, heads=args.heads,
                                     trust_pickle=args.trust_pickle),
                    address=args.address, num_cpus=args.num_cpus, object_store_mb=args.object_store_mb,
                    actors=args.actors, gpus_per_actor=args.gpus_per_actor)
    if args.strict and res.skipped:
        s = res.skipped[0]
        raise DataError(f"{s.source}: {s.reason} ({len(res.skipped)} unreadable image(s); the shards "
                        f"in {res.out} hold the others)")
    if res.n_resumed:
        print(f"{res.n_resumed} of {res.n_shards} shards were finished by an earlier run", file=sys.stderr)
    print(f"wrote {res.n_features} image embeddings in {res.n_shards} parquet shards to {res.out}",
          file=sys.stderr)
    report_skipped(res.listing_skipped + res.skipped)
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
    from ..features import features_table

    table = features_table(items, feats, kind, meta)  # raises the install hint without pyarrow
    import pyarrow.parquet as pq

    pq.write_table(table, out)
