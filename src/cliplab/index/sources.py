"""What an index is built from: embeddings on disk, or images embedded on the way.

- ``F.npy`` with the ``F.npy.json`` sidecar that ``cliplab embed --out F.npy`` writes
  (``items``, ``model``, ``fingerprint``, ``dim``);
- ``F.parquet`` as ``cliplab embed --out F.parquet`` writes it (a ``path`` or ``text``
  column, an ``embedding`` list column, the model and fingerprint in the schema metadata
  under ``cliplab``), or a folder of such parquet shards; other columns become metadata;
- image files and folders, embedded through a :class:`~cliplab.features.FeatureStore`:
  an interrupted build, started again, reads back every chunk already embedded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.images import find_images
from ..errors import DataError, UsageError
from ..features import embed

logger = logging.getLogger(__name__)

__all__ = ["Collection", "read_features", "embed_images"]


@dataclass
class Collection:
    """Embeddings with what each row is, ready for :meth:`SearchIndex.build`.

    Attributes
    ----------
    features : ndarray of float32, shape (N, D)
    paths : list of str, length N
    metadata : list of dict, length N
    model, fingerprint : str
        The model that made the features.
    skipped : list of Skipped
        Images that could not be read (image sources only).
    """

    features: np.ndarray
    paths: list
    metadata: list
    model: str
    fingerprint: str
    skipped: list = field(default_factory=list)


def read_features(path) -> Collection:
    """Read embeddings written by ``cliplab embed``: ``.npy`` + sidecar, ``.parquet``, or a
    folder of parquet shards.

    Raises
    ------
    UsageError
        Not one of these, or parquet without pyarrow installed.
    DataError
        A missing or malformed sidecar, column or schema metadata.
    """
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.rglob("*.parquet"))
        if not shards:
            raise DataError(f"{path}: no .parquet files in this folder")
        return _read_parquet(shards)
    if not path.is_file():
        raise UsageError(f"{path}: no such file or directory")
    if path.suffix == ".npy":
        return _read_npy(path)
    if path.suffix == ".parquet":
        return _read_parquet([path])
    raise UsageError(f"{path}: expected a .npy (with its .npy.json sidecar), a .parquet, or a folder")


def _read_npy(path: Path) -> Collection:
    side = Path(str(path) + ".json")
    if not side.is_file():
        raise DataError(f"{path}: no sidecar {side.name} (cliplab embed writes it, with the paths and "
                        f"the model); without it the rows have no paths")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        items, model, fp = meta["items"], meta["model"], meta["fingerprint"]
    except KeyError as e:
        raise DataError(f"{side}: not a cliplab embed sidecar (no {e} field)") from None
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{side}: not a cliplab embed sidecar ({e.__class__.__name__}: {e})") from None
    try:
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if feats.ndim != 2 or len(feats) != len(items):
        raise DataError(f"{path}: {feats.shape} array, the sidecar lists {len(items)} items")
    kind = meta.get("kind", "image")
    return Collection(feats, [str(i) for i in items], [{} if kind == "image" else {"kind": kind}
                                                        for _ in items], str(model), str(fp))


def _read_parquet(files: list[Path]) -> Collection:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError("reading .parquet needs pyarrow: pip install 'cliplab[parquet]'") from e
    feats, paths, metadata, model = [], [], [], None
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises its own errors for any damage
            raise DataError(f"{file}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
        raw = (table.schema.metadata or {}).get(b"cliplab")
        try:
            meta = json.loads(raw)
            this = (str(meta["model"]), str(meta["fingerprint"]))
        except (TypeError, ValueError, KeyError):
            raise DataError(f"{file}: no cliplab model metadata in the schema (write it with "
                            f"`cliplab embed --out F.parquet`)") from None
        if model is not None and this != model:
            raise DataError(f"{file}: embeddings of model {this[0]} ({this[1][:12]}), the other shards "
                            f"are of {model[0]} ({model[1][:12]})")
        model = this
        key = "path" if "path" in table.column_names else "text" if "text" in table.column_names else None
        if key is None or "embedding" not in table.column_names:
            raise DataError(f"{file}: needs a 'path' (or 'text') column and an 'embedding' column")
        emb = table.column("embedding").combine_chunks()
        try:
            arr = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), np.float32)
            feats.append(arr.reshape(len(table), -1))
        except (ValueError, AttributeError) as e:
            raise DataError(f"{file}: 'embedding' is not a column of equal-length float lists "
                            f"({e})") from None
        paths.extend(str(p) for p in table.column(key).to_pylist())
        rest = [c for c in table.column_names if c not in (key, "embedding")]
        cols = {c: table.column(c).to_pylist() for c in rest}
        metadata.extend({c: cols[c][i] for c in rest} for i in range(len(table)))
    if len({f.shape[1] for f in feats}) > 1:
        raise DataError(f"shards of different widths: {sorted({f.shape[1] for f in feats})}")
    return Collection(np.concatenate(feats), paths, metadata, model[0], model[1])


def embed_images(sources, backbone, *, model: str | None = None, store=None, progress=None,
                 **image_kwargs) -> Collection:
    """Find the images under ``sources`` (files or folders) and embed them.

    Parameters
    ----------
    sources : path or list of paths
    backbone : Backbone
    model : str, optional
        The spec recorded in the index for ``backbone`` (default its name).
    store : FeatureStore, optional
        Cache the features there, chunk by chunk (what makes an interrupted build resumable).
    **image_kwargs
        ``batch_size``, ``workers``, ``draft``, ``max_pixels``.

    Returns
    -------
    Collection
        Paths are absolute, so a service started elsewhere finds the files.

    Raises
    ------
    DataError
        No image files under ``sources``, or none could be read.
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    items = find_images(sources)
    if not items:
        raise DataError(f"no image files found under {', '.join(map(str, sources))}")
    if store is None and progress is not None:
        image_kwargs["progress"] = progress
    res = embed(backbone, items, kind="image", store=store, **image_kwargs)
    paths = [os.path.abspath(items[i]) for i in res.kept]
    return Collection(np.asarray(res.features, np.float32), paths, [{} for _ in paths],
                      model or backbone.name, backbone.fingerprint, list(res.skipped))
