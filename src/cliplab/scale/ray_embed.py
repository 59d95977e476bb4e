"""Image embeddings at scale on Ray Data, resumable shard by shard (``cliplab embed --engine ray``).

The pipeline
------------
1. The driver lists the inputs once (:func:`list_sources`: image files and folders,
   WebDataset ``.tar`` shards, parquet tables of paths), in a deterministic order (folders
   sorted by path, shards and tables in their own order), and freezes the list in
   ``OUT/sources.parquet``.  Input ``i`` belongs to output shard ``i // shard_size``;
   ``shard_size`` is a multiple of ``batch_size``, so a model batch never straddles shards.
2. One Ray Data row is one model batch: ``batch_size`` consecutive inputs.  CPU tasks
   decode it (:func:`cliplab.data.images.load_image`) and run the PIL steps of the model's
   eval transform (resize, crop) into uint8 pixels at the model size; 4x smaller in the
   object store than float tensors.
3. Model actors (one per GPU when the cluster has GPUs) turn the pixels into features with
   :meth:`Backbone.encode_images`, one call per batch: ``ToTensor`` and ``Normalize`` are
   the same float32 operations as the single-process path, and the batches are the same
   batches, so the features equal ``cliplab embed`` bit for bit.
4. The driver collects the small feature rows and writes each shard as soon as all its
   batches are in: ``part-<n>.parquet`` (columns ``index``, ``path``, ``embedding``, the
   layout of ``cliplab embed --out F.parquet`` plus the input index) to a temporary file,
   flushed, fsync'd and renamed into place, and only then its marker ``part-<n>.done``
   (JSON: rows, skipped images with reasons), the same way.

Resuming
--------
A shard is finished exactly when its marker exists.  A run killed at any moment, and
started again with the same command, skips finished shards and recomputes the others from
scratch, so it ends with exactly the features of an uninterrupted run: nothing
duplicated (a shard is written whole or not at all, and never twice under two names),
nothing lost (a shard without marker is redone).  ``OUT/manifest.json`` records the
model fingerprint and every option that changes the features or the shard layout; a
rerun with another model or options is refused instead of mixing two runs.  One run at
a time writes to ``OUT`` (a lock file).

Where it runs
-------------
On a local Ray instance started here (``num_cpus`` CPUs, a small object store, no
dashboard) or on an existing cluster (``address="auto"`` or ``"ray://host:10001"``). On a
cluster every node needs cliplab installed and the inputs and the model at the same paths
(a shared file system); ``OUT`` need only be on the driver.  The throughput model and its
measurement are in docs/search.md (section "Scale: embedding on Ray Data").
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._progress import progress_bar
from ..data.images import DEFAULT_MAX_PIXELS, find_images, load_image
from ..data.records import Skipped
from ..data.sources import (IMAGE_COLUMNS, SkipLog, canonical_path, expand_shards, index_webdataset,
                            pick_column)
from ..errors import BadImage, CliplabError, DataError, UsageError
from ..data.sources import fsync_dir
from ..validation import check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["RayEmbedResult", "Source", "decode_pixels", "embed_ray", "list_sources", "read_embeddings"]

FORMAT = "cliplab-ray-embed/1"
"""``format`` of ``OUT/manifest.json``."""

DEFAULT_SHARD_SIZE = 8192
"""Inputs per output shard (rounded up to whole batches): the most work a crash loses."""

DEFAULT_OBJECT_STORE_MB = 256
"""Object store of a local Ray instance, MB (pixels in flight: ~9.6 MB per batch of 64 at 224 px)."""

_DECODE_MEMORY = 768 * 2**20
"""Memory reserved by a decoding task beyond its batch of pixels: a worker process with torch
imported (500-660 MB measured) and a large image being decoded."""

_PART_RE = re.compile(r"^part-(\d+)\.done$")
# Options recorded in the manifest: a rerun must agree on all of them.
_JOB_KEYS = ("fingerprint", "inputs", "image_key", "batch_size", "shard_size", "draft", "max_pixels",
             "n_items", "sources_sha1")


@dataclass(frozen=True)
class Source:
    """One input image: a file (``offset == -1``) or a member of a WebDataset shard."""

    label: str          # the name in the output: the path, or "shard.tar:key"
    path: str           # the file to read
    offset: int = -1    # byte offset of a shard member's data
    size: int = -1      # its length


@dataclass(frozen=True)
class RayEmbedResult:
    """What :func:`embed_ray` did.

    Attributes
    ----------
    out : Path
        The output folder.
    n_items : int
        Inputs listed.
    n_shards : int
        Output shards in all.
    n_resumed : int
        Shards already finished by an earlier run (not recomputed).
    n_features : int
        Feature rows in all the shards (kept images).
    skipped : list of Skipped
        Images left out (unreadable), with their input index and reason.
    listing_skipped : list of Skipped
        Samples left out while listing WebDataset shards (no image, damaged shard).
    """

    out: Path
    n_items: int
    n_shards: int
    n_resumed: int
    n_features: int
    skipped: list
    listing_skipped: list


# ------------------------------------------------------------------------ inputs
def list_sources(inputs, *, image_key: str = "filepath", skip_log: SkipLog | None = None) -> list[Source]:
    """The input images named by ``inputs``, in a deterministic order.

    Parameters
    ----------
    inputs : sequence of str or Path
        Each one is a parquet table of image paths (``.parquet``: column ``image_key``,
        relative paths taken from the table's folder), WebDataset shards (a ``.tar`` file,
        a glob or brace pattern ending in ``.tar``: image + caption samples, as
        :func:`~cliplab.data.sources.index_webdataset` reads them), or image files and
        folders (:func:`~cliplab.data.images.find_images`: folders sorted by path).
    image_key : str, default "filepath"
        Path column of parquet tables (the aliases of
        :data:`~cliplab.data.sources.IMAGE_COLUMNS` are tried for the default).
    skip_log : SkipLog, optional
        Receives the WebDataset samples left out while listing.

    Returns
    -------
    list of Source
        In the order of ``inputs``, each expanded in its own order.

    Raises
    ------
    UsageError
        A path that does not exist.
    DataError
        An unreadable table, a table without the path column, a missing or compressed shard.
    """
    skip_log = skip_log if skip_log is not None else SkipLog()
    out: list[Source] = []
    for given in inputs:
        text = os.fspath(given)
        if text.lower().endswith(".parquet"):
            out += _table_sources(Path(text), image_key)
        elif text.lower().endswith(".tar") or Path(text).suffix == "" and _is_shard_folder(text):
            for s in index_webdataset(expand_shards(text), skip_log=skip_log):
                out.append(Source(f"{s.shard}:{s.key}", str(s.shard), int(s.offset), int(s.size)))
        else:
            out += [Source(str(p), str(p)) for p in find_images([text])]
    return out


def _is_shard_folder(text: str) -> bool:
    """A folder holding ``.tar`` shards and no images: read as WebDataset."""
    p = Path(text)
    return p.is_dir() and any(p.glob("*.tar")) and not find_images([p])


def _table_sources(path: Path, image_key: str) -> list[Source]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError("reading a parquet table needs pyarrow: pip install 'cliplab[scale]'") from e
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        names = pq.read_schema(path).names
        column = pick_column(image_key, IMAGE_COLUMNS, names)
        if column is None:
            raise DataError(f"{path}: no column {image_key!r} in {names}; pass --image-key <column name>")
        values = pq.read_table(path, columns=[column]).column(0).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: cannot read the parquet table ({e})") from None
    out = []
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}: row {row}: {column} is not a path ({value!r})")
        p = str(canonical_path(value, path.parent))
        out.append(Source(p, p))
    return out


# ---------------------------------------------------------------------- workers
_HEADS: dict[str, tuple] = {}  # preprocess_cfg JSON -> (PIL steps, (H, W)), per worker process


def _pil_steps(preprocess_cfg: dict):
    """The PIL part of the eval transform (all but ``ToTensor, Normalize``) and the model size."""
    key = json.dumps(preprocess_cfg, sort_keys=True, default=str)
    if key not in _HEADS:
        from torchvision.transforms import Compose, Normalize, ToTensor

        from ..models.transforms import make_preprocess

        steps = make_preprocess(preprocess_cfg).transforms
        if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
            raise UsageError("the ray engine needs an eval transform ending in ToTensor, Normalize")
        size = preprocess_cfg.get("size", 224)
        _HEADS[key] = Compose(steps[:-2]), ((size, size) if isinstance(size, int) else tuple(size))
    return _HEADS[key]


def _read_member(path: str, offset: int, size: int, label: str) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise BadImage(label, f"cannot read shard ({e.strerror or e})") from None
    if len(data) != size:
        raise BadImage(label, f"truncated shard: {len(data)} of {size} bytes")
    return data


def decode_pixels(src: Source, preprocess_cfg: dict, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  draft_size: int | None = None) -> np.ndarray:
    """What a decoding task does to one input: uint8 pixels (H, W, 3) at the model size.

    :func:`~cliplab.data.images.load_image`, then the PIL steps of the eval transform of
    ``preprocess_cfg`` (all but ``ToTensor, Normalize``, which the model actor applies), as
    :meth:`Backbone.encode_images` prepares an image.

    Raises
    ------
    BadImage
        The image cannot be read or preprocessed (``source`` is ``src.label``).
    UsageError
        The transform does not end in ``ToTensor, Normalize`` or does not give the model size.
    """
    head, hw = _pil_steps(preprocess_cfg)
    item = src.path if src.offset < 0 else _read_member(src.path, src.offset, src.size, src.label)
    try:
        img = load_image(item, max_pixels=max_pixels, draft_size=draft_size)
    except BadImage as e:
        raise BadImage(src.label, e.reason) from None
    try:
        img = head(img)
    except (ValueError, MemoryError) as exc:  # as Backbone.encode_images: this image's failure
        raise BadImage(src.label, f"cannot preprocess a {img.width}x{img.height} image "
                                  f"({type(exc).__name__}: {exc})") from None
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)  # (H, W, 3)
    if arr.shape != (*hw, 3):
        raise UsageError(f"preprocessed images must be {(3, *hw)} (the model input); got {arr.shape}")
    return arr


def _decode_batch(row: dict, *, preprocess_cfg: dict, max_pixels, draft_size) -> dict:
    """Ray task: one batch of inputs -> uint8 pixels of the readable ones + skip reasons."""
    hw = _pil_steps(preprocess_cfg)[1]
    sources = [Source(*s) for s in json.loads(row["sources"])]
    pixels = np.zeros((len(sources), *hw, 3), np.uint8)  # (B, H, W, 3)
    kept, skipped = [], []
    for j, src in enumerate(sources):
        try:
            pixels[len(kept)] = decode_pixels(src, preprocess_cfg, max_pixels=max_pixels, draft_size=draft_size)
            kept.append(j)
        except BadImage as e:
            skipped.append((j, e.reason))
        except MemoryError:
            skipped.append((j, "out of memory decoding or preprocessing the image"))
    return {"shard": row["shard"], "start": row["start"], "sources": row["sources"],
            "kept": json.dumps(kept), "skipped": json.dumps(skipped),
            "pixels": pixels[:len(kept)].tobytes()}


class _Encoder:
    """Ray actor: loads the model once, encodes one batch of uint8 pixels per call."""

    def __init__(self, model: str, load_kwargs: dict, fingerprint: str, hw: tuple):
        import torch

        from ..models.loading import load

        if load_kwargs.get("device", "cpu") == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.backbone = load(model, **load_kwargs)
        if self.backbone.fingerprint != fingerprint:
            raise UsageError(f"{model}: this worker loaded other weights than the driver "
                             f"(fingerprint {self.backbone.fingerprint[:16]} != {fingerprint[:16]}); "
                             "every node must see the same model files")
        self.hw = tuple(hw)

    def __call__(self, row: dict) -> dict:
        n = len(json.loads(row["kept"]))
        pixels = np.frombuffer(row["pixels"], np.uint8).reshape(n, *self.hw, 3)  # (B, H, W, 3)
        if n:
            feats = self.backbone.encode_images(pixels, batch_size=n, progress=False, workers=0).features
        else:
            feats = np.zeros((0, self.backbone.embed_dim), np.float32)
        return {"shard": row["shard"], "start": row["start"], "sources": row["sources"],
                "kept": row["kept"], "skipped": row["skipped"],
                "features": np.ascontiguousarray(feats, np.float32).tobytes()}  # (B, D)


# ---------------------------------------------------------------------- outputs
def _atomic_write(path: Path, write) -> None:
    """``write(binary file)`` to a temporary file beside ``path``, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _part(out: Path, shard: int, suffix: str) -> Path:
    return out / f"part-{shard:05d}{suffix}"


def _sources_sha1(sources: list[Source]) -> str:
    import hashlib

    h = hashlib.sha1()
    for s in sources:
        h.update(f"{s.label}\0{s.path}\0{s.offset}\0{s.size}\n".encode())
    return h.hexdigest()


def _write_sources(path: Path, sources: list[Source]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({f.name: [getattr(s, f.name) for s in sources] for f in dataclasses.fields(Source)})
    _atomic_write(path, lambda f: pq.write_table(table, f))


def _read_sources(path: Path) -> list[Source]:
    import pyarrow.parquet as pq

    cols = pq.read_table(path).to_pydict()
    return [Source(*row) for row in zip(*(cols[f.name] for f in dataclasses.fields(Source)))]


def _write_shard(out: Path, shard: int, rows: list[dict], dim: int, meta: dict) -> tuple[int, list[Skipped]]:
    """Write one finished shard (parquet, then marker); return (feature rows, skipped)."""
    import pyarrow.parquet as pq

    from ..features import features_table

    index, paths, feats, skipped = [], [], [], []
    for row in sorted(rows, key=lambda r: r["start"]):
        sources = json.loads(row["sources"])
        kept = json.loads(row["kept"])
        index += [row["start"] + j for j in kept]
        paths += [sources[j][0] for j in kept]
        feats.append(np.frombuffer(row["features"], np.float32).reshape(len(kept), dim))
        skipped += [Skipped(row["start"] + j, sources[j][0], why) for j, why in json.loads(row["skipped"])]
    feats = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)  # (M, D)
    table = features_table(paths, feats, "image", {**meta, "shard": shard},
                           index=np.asarray(index, np.int64))
    _atomic_write(_part(out, shard, ".parquet"), lambda f: pq.write_table(table, f))
    marker = {"shard": shard, "rows": len(paths), "skipped": [dataclasses.asdict(s) for s in skipped]}
    _atomic_write(_part(out, shard, ".done"), lambda f: f.write(json.dumps(marker, indent=1).encode()))
    return len(paths), skipped


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finished(out: Path, n_shards: int) -> dict[int, dict]:
    """Markers of the finished shards (marker readable and its parquet present)."""
    done = {}
    for p in out.iterdir():
        m = _PART_RE.match(p.name)
        if m and int(m.group(1)) < n_shards:
            marker = _read_marker(p)
            if marker is not None and _part(out, int(m.group(1)), ".parquet").is_file():
                done[int(m.group(1))] = marker
    return done


def _clean_temp_files(out: Path) -> None:
    """Temporary files of killed runs (the lock says no other run writes here)."""
    for p in out.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name:
            logger.info("removing %s, left by an interrupted run", p)
            p.unlink(missing_ok=True)


def _lock(out: Path):
    f = open(out / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"{out}: another run is writing this folder; wait for it or use another --out") from None
    return f


def _check_manifest(old: dict, new: dict, out: Path) -> None:
    if old.get("format") != FORMAT:
        raise UsageError(f"{out}: not a cliplab ray embedding folder (manifest format {old.get('format')!r})")
    for key in _JOB_KEYS:
        if old.get(key) != new.get(key):
            raise UsageError(f"{out} holds a run with another {key} ({old.get(key)!r}, now {new.get(key)!r}); "
                             "rerun it with the same model, inputs and options, or use another --out")


def read_embeddings(out) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The features of a finished :func:`embed_ray` run, in input order.

    Parameters
    ----------
    out : str or Path
        The run's output folder.

    Returns
    -------
    paths : list of str
        Source of each row (a path, or ``shard.tar:key``).
    index : ndarray of int64, shape (M,)
        Input index of each row (inputs that could not be read are absent).
    features : ndarray of float32, shape (M, D)
        L2-normalised.

    Raises
    ------
    DataError
        Not a run folder, or a shard is not finished (rerun the same command to finish it).
    """
    import pyarrow.parquet as pq

    out = Path(out)
    manifest = _read_marker(out / "manifest.json")
    if not manifest or manifest.get("format") != FORMAT:
        raise DataError(f"{out}: no cliplab ray embedding run here (manifest.json missing)")
    n_shards, dim = int(manifest["n_shards"]), int(manifest["dim"])
    missing = sorted(set(range(n_shards)) - set(_finished(out, n_shards)))
    if missing:
        raise DataError(f"{out}: {len(missing)} of {n_shards} shards not finished (first: {missing[0]}); "
                        "rerun the same command to finish them")
    paths, index, feats = [], [], []
    for shard in range(n_shards):
        t = pq.read_table(_part(out, shard, ".parquet"))
        paths += t.column("path").to_pylist()
        index.append(t.column("index").to_numpy())
        feats.append(t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim))
    return (paths, np.concatenate(index).astype(np.int64),
            np.concatenate(feats).astype(np.float32, copy=False))


# ------------------------------------------------------------------------ driver
def _start_ray(address: str | None, num_cpus: int | None, object_store_mb: int):
    try:
        import ray
    except ImportError as e:
        raise UsageError("--engine ray needs Ray Data: pip install 'cliplab[scale]'") from e
    if ray.is_initialized():
        return ray, False
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=int(object_store_mb) * 2**20, logging_level=logging.WARNING,
                 log_to_driver=False)
    return ray, True


def _unwrap(exc: BaseException) -> BaseException:
    """The cliplab error a Ray task raised, without Ray's wrapper (which holds the traceback)."""
    seen = exc
    for _ in range(8):
        if isinstance(seen, CliplabError) and not hasattr(seen, "cause"):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
        if seen is None:
            break
    return exc


def embed_ray(inputs, out, *, model: str = "shapes-tiny", load_kwargs: dict | None = None,
              batch_size: int = 64, shard_size: int = DEFAULT_SHARD_SIZE, draft: bool = False,
              max_pixels: int | None = DEFAULT_MAX_PIXELS, image_key: str = "filepath",
              address: str | None = None, num_cpus: int | None = None,
              object_store_mb: int = DEFAULT_OBJECT_STORE_MB, actors: int | None = None,
              gpus_per_actor: float | None = None, progress: bool | None = None) -> RayEmbedResult:
    """Embed images with Ray Data into parquet shards under ``out``, resuming a previous run.

    Parameters
    ----------
    inputs : sequence of str or Path
        Image files and folders, WebDataset shards, parquet tables of paths
        (:func:`list_sources`).  A rerun reads the list frozen by the first run.
    out : str or Path
        Output folder: ``manifest.json``, ``sources.parquet``, ``part-<n>.parquet`` and
        ``part-<n>.done``.
    model : str, default "shapes-tiny"
        Model spec, loaded by the driver (for its fingerprint) and by every actor.
    load_kwargs : dict, optional
        Other arguments of :func:`cliplab.models.loading.load` (``precision``, ``arch``...);
        ``device`` is chosen per actor (``cuda`` when it holds a GPU, else ``cpu``).
    batch_size : int, default 64
        Images per model call, as in ``cliplab embed``.
    shard_size : int, default :data:`DEFAULT_SHARD_SIZE`
        Inputs per output shard, rounded up to a multiple of ``batch_size``.
    draft, max_pixels
        As in :meth:`Backbone.encode_images`.
    image_key : str, default "filepath"
        Path column of parquet tables.
    address : str, optional
        An existing Ray cluster (``"auto"``, ``"ray://head:10001"``); default: start a local
        instance (stopped at the end).  An instance already started in this process is used.
    num_cpus : int, optional
        CPUs of a local instance (default: all).
    object_store_mb : int, default 256
        Object store of a local instance.
    actors : int, optional
        Model actors (default: one per GPU of the cluster, else 1).
    gpus_per_actor : float, optional
        Default 1 when the cluster has GPUs, else 0 (CPU actors).
    progress : bool, optional
        Progress bar over the images (``CLIPLAB_PROGRESS``).

    Returns
    -------
    RayEmbedResult

    Raises
    ------
    UsageError
        Ray not installed, ``out`` holds another run (other model, inputs or options) or is
        being written by another run, bad option values.
    DataError
        No input image, unreadable tables or shards; none of the images could be read.
    ModelLoadError
        The model cannot be loaded.
    """
    from ..models.loading import load

    batch_size = check_positive_int("batch_size", batch_size)
    shard_size = batch_size * math.ceil(check_positive_int("shard_size", shard_size) / batch_size)
    load_kwargs = {k: v for k, v in (load_kwargs or {}).items() if k != "device"}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        _clean_temp_files(out)
        backbone = load(model, device="cpu", **load_kwargs)
        manifest_path, sources_path = out / "manifest.json", out / "sources.parquet"
        old = _read_marker(manifest_path) if manifest_path.exists() else None
        listing = SkipLog()
        if old is not None and sources_path.is_file():
            sources = _read_sources(sources_path)
            logger.info("%s: resuming a run of %d inputs", out, len(sources))
        else:
            sources = list_sources(inputs, image_key=image_key, skip_log=listing)
            if not sources:
                raise DataError(f"no image found in {', '.join(map(str, inputs))}")
        manifest = {"format": FORMAT, "model": backbone.name, "fingerprint": backbone.fingerprint,
                    "dim": int(backbone.embed_dim), "kind": "image",
                    "inputs": [os.path.abspath(os.fspath(p)) for p in inputs], "image_key": image_key,
                    "batch_size": batch_size, "shard_size": shard_size, "draft": bool(draft),
                    "max_pixels": max_pixels, "n_items": len(sources),
                    "n_shards": math.ceil(len(sources) / shard_size), "sources_sha1": _sources_sha1(sources),
                    "listing_skipped": [dataclasses.asdict(s) for s in listing.to_list()]}
        if old is not None:
            _check_manifest(old, manifest, out)
            manifest["listing_skipped"] = old.get("listing_skipped", [])
        else:
            _write_sources(sources_path, sources)
            _atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        n_shards, dim = manifest["n_shards"], manifest["dim"]
        done = _finished(out, n_shards)
        todo = [s for s in range(n_shards) if s not in done]
        meta = {"model": backbone.name, "fingerprint": backbone.fingerprint, "kind": "image", "dim": dim}
        preprocess_cfg = dict(backbone.preprocess_cfg)
        hw = _pil_steps(preprocess_cfg)[1]
        del backbone
        n_written, skipped = 0, []
        if todo:
            job = _Job(out, sources, shard_size, batch_size, dim, meta, preprocess_cfg, hw, model, load_kwargs,
                       draft, max_pixels)
            n_written, skipped = _run(job, todo, address=address, num_cpus=num_cpus,
                                      object_store_mb=object_store_mb, actors=actors,
                                      gpus_per_actor=gpus_per_actor, progress=progress)
        for marker in done.values():
            n_written += int(marker["rows"])
            skipped += [Skipped(**s) for s in marker["skipped"]]
        skipped.sort(key=lambda s: s.index)
        if sources and len(skipped) == len(sources):
            raise DataError(f"none of the {len(sources)} image(s) could be read "
                            f"(first: {skipped[0].source}: {skipped[0].reason})")
        return RayEmbedResult(out, len(sources), n_shards, len(done), n_written, skipped,
                              [Skipped(**s) for s in manifest["listing_skipped"]])
    finally:
        lock.close()


@dataclass(frozen=True)
class _Job:
    """What the pipeline computes: the frozen inputs, the shard layout, the model and its options."""

    out: Path
    sources: list
    shard_size: int
    batch_size: int
    dim: int
    meta: dict            # schema metadata of the shards
    preprocess_cfg: dict
    hw: tuple             # model input (H, W)
    model: str
    load_kwargs: dict
    draft: bool
    max_pixels: int | None


def _run(job: _Job, todo: list[int], *, address, num_cpus, object_store_mb, actors, gpus_per_actor,
         progress) -> tuple[int, list[Skipped]]:
    """Run the Ray Data pipeline over the unfinished shards ``todo``; write each as it completes."""
    sources, shard_size, batch_size, hw = job.sources, job.shard_size, job.batch_size, job.hw
    ray, started = _start_ray(address, num_cpus, object_store_mb)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        n_gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if n_gpus else 0.0
        if actors is None:
            actors = max(1, int(n_gpus // gpus_per_actor)) if gpus_per_actor else 1
        actors = check_positive_int("actors", actors)
        rows, need = [], {}
        for s in todo:
            lo, hi = s * shard_size, min((s + 1) * shard_size, len(sources))
            need[s] = math.ceil((hi - lo) / batch_size)
            for b in range(lo, hi, batch_size):
                part = [dataclasses.astuple(x) for x in sources[b:min(b + batch_size, hi)]]
                rows.append({"shard": s, "start": b, "sources": json.dumps(part)})
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 10_000))
        # Decoding tasks reserve the memory of a batch of pixels (plus room to decode large
        # images); this also keeps Ray Data from fusing them into the model actors (operators
        # with different resource needs are not fused): CPU tasks decode while the actors encode.
        ds = ds.map(_decode_batch, num_cpus=1, memory=_DECODE_MEMORY + batch_size * hw[0] * hw[1] * 3,
                    fn_kwargs={"preprocess_cfg": job.preprocess_cfg, "max_pixels": job.max_pixels,
                               "draft_size": int(hw[0]) if job.draft else None})
        kwargs = {**job.load_kwargs, "device": "cuda" if gpus_per_actor else "cpu"}
        ds = ds.map(_Encoder, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                    num_gpus=gpus_per_actor,
                    fn_constructor_kwargs={"model": job.model, "load_kwargs": kwargs,
                                           "fingerprint": job.meta["fingerprint"], "hw": hw})
        logger.info("%d shards (%d batches) to embed with %d actor(s), %g GPU each",
                    len(todo), len(rows), actors, gpus_per_actor)
        pending: dict[int, list] = {}
        n_written, skipped = 0, []
        total = sum(min((s + 1) * shard_size, len(sources)) - s * shard_size for s in todo)
        with progress_bar(total=total, progress=progress, desc="ray embed", unit="img") as bar:
            try:
                for row in ds.iter_rows():
                    s = int(row["shard"])
                    pending.setdefault(s, []).append(row)
                    bar.update(len(json.loads(row["sources"])))
                    if len(pending[s]) == need[s]:
                        n, skip = _write_shard(job.out, s, pending.pop(s), job.dim, job.meta)
                        n_written += n
                        skipped += skip
            except Exception as e:
                inner = _unwrap(e)
                if inner is not e:
                    raise inner from None
                raise
        if pending:  # every batch comes back exactly once; anything else is a bug, not user error
            raise RuntimeError(f"shards {sorted(pending)} incomplete after the pipeline ended")
        return n_written, skipped
    finally:
        if started:
            ray.shutdown()
