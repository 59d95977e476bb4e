"""FeatureStore: image and text embeddings cached on disk, resumable after a crash.

A store lives in ``root/<fingerprint[:16]>/`` for one :class:`~cliplab.models.Backbone`
(its content fingerprint, so a different model or different weights get their own
folder).  Each image is keyed by its identity:

- a file path: its canonical path (:func:`cliplab.data.sources.canonical_path`: absolute,
  symbolic links, ``.`` and ``..`` resolved, so every spelling of one file is one key), its
  size and its ``mtime_ns`` (so an edited file is recomputed), hashed;
- an in-memory image (uint8 array, PIL image, bytes): a SHA-1 of its bytes and shape;

and each text by the SHA-1 of its UTF-8 bytes.

Writing is crash-safe.  Features are computed ``chunk_size`` items at a time and each
chunk is saved as soon as it is encoded, as ``chunks/chunk_<n>.npz``: written to a
temporary file in the same folder, flushed, fsync'd and renamed over the final name, so
a chunk file is either complete or absent.  A run killed at any moment (even with
SIGKILL) and started again reads the chunks already written and computes only the rest:
it ends with exactly the features of an uninterrupted run, none missing, none
duplicated, and nothing recomputed that was already written.

Images that cannot be decoded are recorded in the chunk with their reason, so they are
reported (:attr:`FeatureResult.skipped`) but not retried on the next call.

Examples
--------
>>> import cliplab                                             # doctest: +SKIP
>>> store = FeatureStore("cache", cliplab.load("shapes-tiny"))  # doctest: +SKIP
>>> res = store.image_features(["a.png", "b.jpg"])             # doctest: +SKIP
>>> res.features.shape, res.kept, res.skipped                  # doctest: +SKIP
((2, 128), array([0, 1]), [])
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ._progress import progress_bar
from .data.images import DEFAULT_MAX_PIXELS
from .data.records import EncodedImages, Skipped
from .data.sources import canonical_path, fsync_dir  # fsync_dir re-exported: the one folder flush
from .errors import BadImage, DataError, UsageError
from .validation import check_choice, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["FeatureResult", "FeatureStore", "image_features", "embed", "features_table"]

_CHUNK_RE = re.compile(r"^chunk_(\d+)\.npz$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True, eq=False)
class FeatureResult(EncodedImages):
    """What :meth:`FeatureStore.image_features` returns: an :class:`EncodedImages` plus counts.

    Attributes
    ----------
    features : ndarray of float32, shape (M, D)
        L2-normalised features of the kept items, in input order.
    kept : ndarray of int64, shape (M,)
        Input index of each row of ``features``.
    skipped : list of Skipped
        One record per item left out.
    n_computed : int
        Items encoded by this call (the others came from the cache).
    n_cached : int
        Items answered from the cache (features or a recorded skip).
    """

    n_computed: int = 0
    n_cached: int = 0


def _sha1(*parts: bytes) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def item_key(item) -> str:
    """The cache key of one image: a hex string.

    Paths are keyed by canonical path (:func:`~cliplab.data.sources.canonical_path`) +
    size + ``mtime_ns``; uint8 arrays, PIL images and bytes by a SHA-1 of their content
    and shape.

    Raises
    ------
    FileNotFoundError, OSError
        A path that cannot be ``stat``-ed.
    UsageError
        An unsupported item type.
    """
    if isinstance(item, (str, os.PathLike)):
        path = canonical_path(item)
        st = path.stat()
        return _sha1(b"path\0", os.fsencode(path), f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
    if isinstance(item, np.ndarray):
        arr = np.ascontiguousarray(item)
        return _sha1(b"array\0", f"{arr.dtype.str}{arr.shape}\0".encode(), arr.tobytes())
    if isinstance(item, Image.Image):
        arr = np.ascontiguousarray(np.asarray(item))
        return _sha1(b"pil\0", f"{item.mode}{arr.dtype.str}{arr.shape}\0".encode(), arr.tobytes())
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        return _sha1(b"bytes\0", f"{len(data)}\0".encode(), data)
    raise UsageError(f"FeatureStore caches paths, uint8 arrays, PIL images and bytes; "
                     f"got {type(item).__name__}")


def text_key(text: str) -> str:
    """The cache key of one text: ``"t"`` + SHA-1 of its UTF-8 bytes."""
    return "t" + _sha1(text.encode("utf-8"))


def _host() -> str:
    """This host's name reduced to ``[A-Za-z0-9]`` (at most 32), as temporary file names carry it."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _write_temp(folder: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file in ``folder``, flushed and fsync'd; return its path.

    The name (``.tmp-<host>-<pid>-<random>``) lets a later run on this host delete it
    once its writer is gone.  The caller renames it into place (or deletes it).
    """
    tmp = folder / f"{_TMP_PREFIX}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class FeatureStore:
    """Image and text features of one backbone, cached on disk in atomic chunks.

    Parameters
    ----------
    root : str or Path
        Cache folder; the store uses ``root/<backbone.fingerprint[:16]>/``.
    backbone : Backbone
        The model whose features are stored.
    chunk_size : int, default=256
        Items encoded and saved per chunk: the most work a crash can lose.
    progress : bool, optional
        Show a progress bar (default: on unless ``CLIPLAB_PROGRESS=0``).

    Attributes
    ----------
    path : Path
        ``root/<fingerprint[:16]>``; holds ``meta.json`` and ``chunks/``.
    n_features : int
        Distinct keys with stored features (images and texts).
    n_skipped : int
        Distinct image keys recorded as undecodable.

    Notes
    -----
    Chunks are never rewritten.  Opening the store reads every ``chunk_<n>.npz`` into an
    index (a key seen twice keeps its first features); temporary files left by a killed
    writer on this host are deleted.  New chunks are numbered after the highest existing
    one; if another process took that number first, the next free one is used.
    """

    def __init__(self, root, backbone, *, chunk_size: int = 256, progress: bool | None = None):
        self.root = Path(root)
        self.backbone = backbone
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.progress = progress
        self.path = self.root / backbone.fingerprint[:16]
        self._chunks = self.path / "chunks"
        self._chunks.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        self._features: dict[str, np.ndarray] = {}   # key -> (D,) row
        self._skips: dict[str, str] = {}             # key -> reason
        self._next = 0
        self._load()

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, features={self.n_features}, "
                f"skipped={self.n_skipped}, chunk_size={self.chunk_size})")

    @property
    def n_features(self) -> int:
        return len(self._features)

    @property
    def n_skipped(self) -> int:
        return len(self._skips)

    # ------------------------------------------------------------------ disk
    def _write_meta(self) -> None:
        meta_path = self.path / "meta.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: no fingerprint to check
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
            if meta.get("fingerprint") not in (None, self.backbone.fingerprint):
                raise UsageError(f"{self.path}: cache belongs to another model "
                                 f"(fingerprint {meta.get('fingerprint')!r}); use another root")
            return
        meta = {"model": str(getattr(self.backbone, "name", "model")),
                "fingerprint": self.backbone.fingerprint,
                "embed_dim": int(self.backbone.embed_dim),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = _write_temp(meta_path.parent, json.dumps(meta, indent=2).encode())
        try:
            os.replace(tmp, meta_path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(meta_path.parent)

    def _clean_temp_files(self) -> None:
        """Delete temporary files whose writer (on this host) is no longer running."""
        host = _host()
        for p in self._chunks.iterdir():
            m = re.match(rf"^{re.escape(_TMP_PREFIX)}([A-Za-z0-9]+)-(\d+)-", p.name)
            if m and m.group(1) == host and not _pid_alive(int(m.group(2))):
                logger.info("removing %s, left by an interrupted run", p)
                p.unlink(missing_ok=True)

    def _load(self) -> None:
        self._clean_temp_files()
        numbered = []
        for p in self._chunks.iterdir():
            m = _CHUNK_RE.match(p.name)
            if m:
                numbered.append((int(m.group(1)), p))
        numbered.sort()
        for n, p in numbered:
            self._read_chunk(p)
            self._next = max(self._next, n + 1)
        if numbered:
            logger.info("%s: %d chunks, %d features, %d skipped", self.path, len(numbered),
                        self.n_features, self.n_skipped)

    def _read_chunk(self, p: Path) -> None:
        try:
            with np.load(p, allow_pickle=False) as z:
                keys, feats = z["keys"], z["features"]
                skeys, reasons = z["skipped_keys"], z["skipped_reasons"]
        except Exception as exc:  # a chunk is renamed into place whole; this is outside damage
            logger.warning("%s: unreadable chunk ignored (%s); its items will be recomputed", p, exc)
            return
        for k, row in zip(keys.tolist(), feats):
            self._features.setdefault(k, row)
        for k, why in zip(skeys.tolist(), reasons.tolist()):
            self._skips.setdefault(k, why)

    def _save_chunk(self, keys: list[str], feats: np.ndarray, skipped: list[tuple[str, str]]) -> Path:
        """Write one chunk file (keys, features, skipped keys and reasons) and index it."""
        buf = io.BytesIO()
        np.savez(buf, keys=np.array(keys, dtype=str).reshape(-1),
                 features=_as_rows(feats, len(keys)),
                 skipped_keys=np.array([k for k, _ in skipped], dtype=str).reshape(-1),
                 skipped_reasons=np.array([r for _, r in skipped], dtype=str).reshape(-1))
        tmp = _write_temp(self._chunks, buf.getvalue())
        try:
            while True:
                final = self._chunks / f"chunk_{self._next:06d}.npz"
                self._next += 1
                try:
                    os.link(tmp, final)          # fails if another writer took the number
                except FileExistsError:
                    continue
                except OSError:                   # no hard links here: plain rename
                    if final.exists():
                        continue
                    os.replace(tmp, final)
                break
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self._chunks)
        for k, row in zip(keys, feats):
            self._features.setdefault(k, row)
        for k, why in skipped:
            self._skips.setdefault(k, why)
        logger.debug("%s: %d features, %d skipped", final.name, len(keys), len(skipped))
        return final

    # ---------------------------------------------------------------- images
    def image_features(self, items, *, batch_size: int = 64, workers: int | None = None,
                       draft: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       retry_skipped: bool = False) -> FeatureResult:
        """Features of ``items``, computing only those not in the store.

        Parameters
        ----------
        items : sequence of path, uint8 array (H, W, 3), PIL image or bytes
        batch_size, workers, max_pixels
            Passed to :meth:`Backbone.encode_images`.
        draft : bool, default=False
            JPEG draft decoding (see :meth:`Backbone.encode_images`); part of the key,
            so draft and exact features are cached separately.
        retry_skipped : bool, default=False
            Encode again the items recorded as undecodable (after fixing a file, a
            changed file is retried anyway since its key changes).

        Returns
        -------
        FeatureResult
        """
        if isinstance(items, (str, os.PathLike, bytes, Image.Image)) or (
                isinstance(items, np.ndarray) and items.ndim == 3):
            items = [items]
        items = list(items)
        suffix = b"\0draft" if draft else b""
        keys: list[str | None] = []
        unreadable: dict[int, str] = {}              # input index -> reason
        for i, item in enumerate(items):
            try:
                key = item_key(item)
            except OSError as exc:
                unreadable[i] = f"cannot read file ({exc.strerror or exc})"
                keys.append(None)
                continue
            keys.append(_sha1(key.encode(), suffix) if draft else key)

        todo: dict[str, int] = {}                    # missing key -> first input index
        n_cached = 0
        for i, k in enumerate(keys):
            if k is None or k in todo:
                continue
            if k in self._features or (k in self._skips and not retry_skipped):
                n_cached += 1
                continue
            todo[k] = i

        bar = progress_bar(total=len(items), progress=self.progress if todo else False,
                           desc="image features", unit="img", initial=len(items) - len(todo))
        with bar:
            pending = list(todo.items())
            for s in range(0, len(pending), self.chunk_size):
                part = pending[s:s + self.chunk_size]
                enc = self.backbone.encode_images(
                    [items[i] for _, i in part], batch_size=batch_size, progress=False,
                    on_error="skip", workers=workers, max_pixels=max_pixels, draft=draft)
                bad_pos = {b.index: b.reason for b in enc.skipped}
                kept_keys = [k for j, (k, _) in enumerate(part) if j not in bad_pos]
                bad_keys = [(part[j][0], why) for j, why in sorted(bad_pos.items())]
                if retry_skipped:
                    for k, _ in part:
                        self._skips.pop(k, None)
                self._save_chunk(kept_keys, enc.features, bad_keys)
                bar.update(len(part))

        rows, kept, skip_list = [], [], []
        for i, k in enumerate(keys):
            if k in self._features:
                rows.append(self._features[k])
                kept.append(i)
            else:
                why = unreadable[i] if k is None else self._skips.get(k, "not encoded")
                skip_list.append(Skipped.of(i, items[i], why))
        D = int(self.backbone.embed_dim)
        features = np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, D), np.float32)
        if skip_list:
            logger.warning("%d of %d images skipped (first: %s: %s)", len(skip_list), len(items),
                           skip_list[0].source, skip_list[0].reason)
        return FeatureResult(features, np.asarray(kept, dtype=np.int64), skip_list,
                             n_computed=len(todo), n_cached=n_cached)

    # ----------------------------------------------------------------- texts
    def text_features(self, texts, *, batch_size: int = 256) -> np.ndarray:
        """Features of ``texts`` (N, D) float32, computing only those not in the store."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise UsageError("text_features expects strings")
        keys = [text_key(t) for t in texts]
        todo: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._features and k not in todo:
                todo[k] = t
        pending = list(todo.items())
        bar = progress_bar(total=len(texts), progress=self.progress if pending else False,
                           desc="text features", unit="text", initial=len(texts) - len(pending))
        with bar:
            for s in range(0, len(pending), self.chunk_size):
                part = pending[s:s + self.chunk_size]
                feats = self.backbone.encode_texts([t for _, t in part], batch_size=batch_size,
                                                   progress=False)
                self._save_chunk([k for k, _ in part], feats, [])
                bar.update(len(part))
        if not keys:
            return np.zeros((0, int(self.backbone.embed_dim)), np.float32)
        return np.stack([self._features[k] for k in keys]).astype(np.float32, copy=False)


def _as_rows(feats, n: int) -> np.ndarray:
    """``feats`` as a float32 (n, D) array; a chunk with only skipped items holds (0, 0)."""
    arr = np.asarray(feats, dtype=np.float32)
    return arr.reshape(n, -1) if n else arr.reshape(0, arr.shape[-1] if arr.ndim == 2 else 0)


def image_features(backbone, items, *, store=None, batch_size: int = 64, progress=None):
    """Image features of ``items``, skipping unreadable ones, through ``store`` when given.

    Returns ``(features (M, D) float32, kept int array (M,), skipped list of dict)``;
    with a FeatureStore the features come from (and go to) its cache.
    """
    if store is not None:
        r = store.image_features(items, batch_size=batch_size)
        skipped = [dataclasses.asdict(s) for s in r.skipped]
        return np.asarray(r.features, np.float32), np.asarray(r.kept, np.int64), skipped
    res = backbone.encode_images(items, batch_size=batch_size, progress=progress, on_error="skip")
    return res.features, res.kept, [dataclasses.asdict(s) for s in res.skipped]


def embed(backbone, items, *, kind: str = "image", store: FeatureStore | None = None, strict: bool = False,
          **image_kwargs) -> FeatureResult:
    """L2-normalised features of images or texts, through ``store`` when given (``cliplab embed``).

    Parameters
    ----------
    backbone : Backbone
    items : sequence
        Image sources (paths, arrays, bytes...) or texts.
    kind : {"image", "text"}, default "image"
    store : FeatureStore, optional
        The cache to read and fill; ``None`` computes in memory.
    strict : bool, default False
        Raise on the first unreadable image instead of skipping it.
    **image_kwargs
        ``batch_size``, ``workers``, ``draft``, ``max_pixels`` of :meth:`Backbone.encode_images`.

    Returns
    -------
    FeatureResult
        ``features`` (M, D) float32, ``kept`` (M,), ``skipped`` (images only), and
        ``n_cached``: how many items the store answered.

    Raises
    ------
    BadImage
        ``strict`` and an image cannot be read.
    DataError
        No image could be read (names the first).
    """
    check_choice("kind", kind, ("image", "text"))
    if kind == "text":
        feats = store.text_features(items) if store is not None else backbone.encode_texts(items)
        feats = np.asarray(feats, np.float32)
        return FeatureResult(feats, np.arange(len(feats), dtype=np.int64), [], n_computed=len(feats))
    if store is not None:
        res = store.image_features(items, **image_kwargs)
        if strict and res.skipped:
            raise BadImage(res.skipped[0].source, res.skipped[0].reason)
    else:
        enc = backbone.encode_images(items, on_error="raise" if strict else "skip", **image_kwargs)
        res = FeatureResult(enc.features, enc.kept, enc.skipped, n_computed=len(enc.kept))
    if items and len(res.skipped) == len(items):
        first = res.skipped[0]
        raise DataError(f"none of the {len(res.skipped)} image(s) could be read; nothing was written "
                        f"(first: {first.source}: {first.reason})")
    return res


def features_table(items, feats: np.ndarray, kind: str, meta: dict, *, index=None):
    """Features as the pyarrow table that ``cliplab embed --out F.parquet`` writes.

    Parameters
    ----------
    items : sequence of str
        Image sources (column ``path``) or texts (column ``text``), one per row.
    feats : ndarray of float32, shape (M, D)
        Column ``embedding``, a fixed-size list of D float32.
    kind : {"image", "text"}
    meta : dict
        JSON-able; stored as the schema metadata ``cliplab``.
    index : ndarray of int64, shape (M,), optional
        Input index of each row, as a first column ``index`` (parquet shards of
        ``cliplab embed --engine ray``).

    Returns
    -------
    pyarrow.Table

    Raises
    ------
    UsageError
        pyarrow is not installed.
    """
    try:
        import pyarrow as pa
    except ImportError as e:
        raise UsageError("writing .parquet needs pyarrow: pip install 'cliplab[parquet]' (or use .npy)") from e
    feats = np.ascontiguousarray(feats, np.float32)                       # (M, D)
    col = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])
    cols = {} if index is None else {"index": pa.array(np.asarray(index, np.int64))}
    table = pa.table({**cols, "path" if kind == "image" else "text": list(items), "embedding": col})
    return table.replace_schema_metadata({"cliplab": json.dumps(meta)})
