"""A search index over image (or text) embeddings: FAISS for the vectors, SQLite for the rest.

An index is a folder:

- ``manifest.json``: model name and fingerprint, dimension, index type and its
  parameters, the tuned search setting and its measured recall, counts;
- ``index.faiss``: the FAISS index (ids are cliplab ids);
- ``vectors.f32``: the L2-normalised float32 vectors, row ``i`` holding id ``i`` (for
  exact re-scoring by ``ivfpq``, and for rebuilds);
- ``items.sqlite``: id → path and metadata (:class:`~cliplab.index.items.ItemTable`).

Which FAISS index is built, and how its search setting is tuned, is the rule of
:mod:`cliplab.index.types`.  An index remembers the model that made its vectors and
refuses queries of another dimension; :meth:`SearchIndex.check_model` refuses a model
whose fingerprint differs.

Examples
--------
>>> import numpy as np
>>> from cliplab.index import SearchIndex
>>> x = np.random.default_rng(0).standard_normal((100, 8)).astype("float32")
>>> idx = SearchIndex.build(x, [f"img{i}.png" for i in range(100)], "idx-doctest",   # doctest: +SKIP
...                         model="shapes-tiny", fingerprint="f" * 64)
>>> idx.search(x[:1], k=3)[0][0].path                                                # doctest: +SKIP
'img0.png'
"""

from __future__ import annotations

import datetime
import json
import logging
import mmap
import os
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._progress import progress_bar
from ..errors import DataError, UsageError
from ..validation import check_choice, check_number, check_positive_int
from .items import ItemTable
from .types import DEFAULT_BUDGET_MB, INDEX_TYPES, IndexPlan, choose_index_type, exact_top_k, plan_index

logger = logging.getLogger(__name__)

__all__ = ["Hit", "SearchIndex"]

FORMAT = 1
MANIFEST, FAISS_FILE, VECTORS, ITEMS = "manifest.json", "index.faiss", "vectors.f32", "items.sqlite"
_ADD_CHUNK = 65_536      # vectors written and added per step
_TUNE_QUERIES = 256      # stored vectors used as queries to tune the search setting
_TUNE_K = 10


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, its inner product with the query, path and metadata."""

    id: int
    score: float
    path: str
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _faiss():
    import faiss

    return faiss


def _normalised(features, what: str = "features", dim: int | None = None) -> np.ndarray:
    """``features`` as C-contiguous float32 (N, D) rows of unit L2 norm (a copy)."""
    x = np.asarray(features)
    if x.ndim == 1 and what == "queries":
        x = x[None, :]
    if x.ndim != 2:
        raise UsageError(f"{what} must be a 2-D array (N, D), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise UsageError(f"{what} have {x.shape[1]} dims, the index {dim}: embed them with the "
                         f"index's model")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(x).all():
        raise DataError(f"{what}: row {int(np.flatnonzero(~np.isfinite(x).all(1))[0])} is not finite")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if len(x) and (norms == 0).any():
        raise DataError(f"{what}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros")
    x /= np.maximum(norms, 1e-30)
    return x


def _check_items(n: int, paths, metadata) -> tuple[list[str], list[dict]]:
    paths = [os.fspath(p) if isinstance(p, os.PathLike) else str(p) for p in paths]
    if len(paths) != n:
        raise UsageError(f"{n} feature rows but {len(paths)} paths")
    if metadata is None:
        metadata = [{} for _ in range(n)]
    metadata = list(metadata)
    if len(metadata) != n:
        raise UsageError(f"{n} feature rows but {len(metadata)} metadata records")
    if not all(m is None or isinstance(m, dict) for m in metadata):
        raise UsageError("metadata must be a list of dicts (or None)")
    return paths, [m or {} for m in metadata]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _install(tmp: Path, out: Path) -> None:
    """Move the finished index folder ``tmp`` to ``out``, replacing an index already there."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
            raise UsageError(f"{out}: exists and is not a cliplab index; choose another --out")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


class SearchIndex:
    """Nearest-neighbour search over L2-normalised embeddings, by inner product (cosine).

    Build with :meth:`build`, open with :meth:`load`; not constructed directly.

    Attributes
    ----------
    path : Path
        The index folder.
    model : str
        The model that made the vectors (a spec ``cliplab.load`` accepts, when known).
    fingerprint : str
        Its content fingerprint (:attr:`cliplab.models.Backbone.fingerprint`).
    dim : int
        D, the dimension of the vectors.
    index_type : str
        ``flat``, ``hnsw`` or ``ivfpq`` (:data:`~cliplab.index.types.INDEX_TYPES`).
    manifest : dict
        The whole manifest.

    Notes
    -----
    Ids are the rows of ``vectors.f32``: :meth:`add` gives new items the next ids,
    :meth:`remove` leaves holes, and :meth:`rebuild` numbers the remaining items
    0..N-1 again (in id order).  Searches and updates may come from several threads.
    """

    def __init__(self, path: Path, manifest: dict, index, items: ItemTable):
        self.path = path
        self.manifest = manifest
        self._index = index
        self._items = items
        self._lock = threading.RLock()
        self._vectors = self._map_vectors()
        self._selector = None
        hidden = items.hidden()
        if len(hidden):
            self._hide(hidden)

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index_type(self) -> str:
        return self.manifest["index_type"]

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def __repr__(self) -> str:
        return (f"SearchIndex({str(self.path)!r}, {len(self)} x {self.dim}, type={self.index_type!r}, "
                f"model={self.model!r})")

    # ----------------------------------------------------------------- build / load
    @classmethod
    def build(cls, features, paths, out, *, model: str, fingerprint: str, metadata=None,
              budget_mb: float | None = None, progress: bool | None = None, index_type: str = "auto",
              target_recall: float = 0.95, seed: int = 0) -> "SearchIndex":
        """Build an index of ``features`` in the folder ``out`` and open it.

        Parameters
        ----------
        features : array-like of float, shape (N, D)
            Embeddings; L2-normalised here (a copy, the input is not changed).
        paths : sequence of str, length N
            What each row is (an image path, or a text); returned in :class:`Hit`.
        out : str or Path
            The index folder, written whole to a temporary folder beside it and then
            moved into place (replacing an index there; any other existing folder with
            files is refused).
        model, fingerprint : str
            The model that made ``features`` (a spec ``cliplab.load`` accepts) and its
            fingerprint; queries are checked against them.
        metadata : sequence of dict, optional
            JSON-serialisable metadata per row, stored in SQLite.
        budget_mb : float, optional
            Memory the index may take, in MiB (default 4096); chooses the index type
            (:func:`~cliplab.index.types.choose_index_type`).
        progress : bool, optional
            Progress bar while vectors are added.
        index_type : {"auto", "flat", "hnsw", "ivfpq"}, default "auto"
            ``auto`` applies the rule; a name forces that type.
        target_recall : float, default 0.95
            Recall@10 against exact search that the tuned search setting must reach.
        seed : int, default 0
            Seeds the training sample and the tuning queries.

        Returns
        -------
        SearchIndex

        Raises
        ------
        UsageError
            Wrong shapes or lengths, an unknown index type, a budget too small, or
            ``out`` is a folder that holds something else.
        DataError
            No rows, or a row that is not finite or is all zeros.
        """
        check_choice("index_type", index_type, ("auto", *INDEX_TYPES.names()))
        check_number("target_recall", target_recall, minimum=0.0, maximum=1.0, strict_minimum=True)
        if budget_mb is not None:
            check_number("budget_mb", budget_mb, minimum=0.0, strict_minimum=True)
        x = np.asarray(features)
        if x.ndim != 2 or not len(x):
            raise DataError(f"nothing to index: features of shape {x.shape}; need (N, D) with N >= 1")
        paths, metadata = _check_items(len(x), paths, metadata)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_folder(tmp, x, paths, metadata, model=str(model), fingerprint=str(fingerprint),
                          budget_mb=budget_mb, index_type=index_type, target_recall=target_recall,
                          seed=seed, progress=progress)
            _install(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(out)

    @classmethod
    def load(cls, path) -> "SearchIndex":
        """Open the index folder ``path``.

        Raises
        ------
        DataError
            ``path`` is not an index folder, or a file of it is missing, unreadable or
            inconsistent with the manifest.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such index folder (build one with `cliplab index build SRC "
                            f"--out {folder}`)")
        if not (folder / MANIFEST).is_file():
            raise DataError(f"{folder}: not a cliplab index (no {MANIFEST})")
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            for key, kind in (("format", int), ("model", str), ("fingerprint", str), ("dim", int),
                              ("index_type", str), ("count", int), ("ntotal", int), ("next_id", int)):
                if not isinstance(manifest.get(key), kind) or isinstance(manifest[key], bool):
                    raise ValueError(f"{key!r} missing or not {'an integer' if kind is int else 'a string'}")
        except (OSError, ValueError) as e:
            raise DataError(f"{folder / MANIFEST}: corrupt manifest ({e})") from None
        if manifest["format"] != FORMAT:
            raise DataError(f"{folder}: index format {manifest['format']!r}, this cliplab reads {FORMAT}")
        if manifest["index_type"] not in INDEX_TYPES:
            raise DataError(f"{folder}: unknown index type {manifest['index_type']!r}")
        try:
            index = _faiss().read_index(str(folder / FAISS_FILE))
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"{folder / FAISS_FILE}: unreadable FAISS index ({first[:200]})") from None
        if index.ntotal != manifest["ntotal"] or index.d != manifest["dim"]:
            raise DataError(f"{folder}: {FAISS_FILE} holds {index.ntotal} x {index.d}, the manifest says "
                            f"{manifest['ntotal']} x {manifest['dim']} (an update was interrupted; build "
                            f"the index again)")
        items = ItemTable(folder / ITEMS)
        if items.count() != manifest["count"]:
            raise DataError(f"{folder}: {ITEMS} holds {items.count()} items, the manifest says "
                            f"{manifest['count']} (an update was interrupted; build the index again)")
        return cls(folder, manifest, index, items)

    def _map_vectors(self) -> np.memmap | np.ndarray:
        file = self.path / VECTORS
        rows = int(self.manifest["next_id"])
        size = file.stat().st_size if file.is_file() else -1
        if size < rows * self.dim * 4:
            raise DataError(f"{file}: {max(size, 0)} bytes, {rows} vectors of {self.dim} dims need "
                            f"{rows * self.dim * 4}")
        if rows == 0:
            return np.zeros((0, self.dim), np.float32)
        vectors = np.memmap(file, dtype=np.float32, mode="r", shape=(rows, self.dim))
        advise = getattr(getattr(vectors, "_mmap", None), "madvise", None)
        if advise is not None and hasattr(mmap, "MADV_RANDOM"):
            advise(mmap.MADV_RANDOM)      # re-scoring reads scattered rows: no read-ahead around each
        return vectors

    # ----------------------------------------------------------------------- search
    def check_model(self, backbone) -> None:
        """Refuse a model other than the index's (by fingerprint).

        Parameters
        ----------
        backbone : Backbone, or str
            The model that will embed the queries, or its fingerprint.

        Raises
        ------
        UsageError
            ``index built with model X (fingerprint ...), not Y (fingerprint ...)``.
        """
        fp = backbone if isinstance(backbone, str) else getattr(backbone, "fingerprint", None)
        if fp != self.fingerprint:
            name = getattr(backbone, "name", "another model")
            raise UsageError(f"index built with model {self.model} (fingerprint {self.fingerprint[:12]}), "
                             f"not {name} (fingerprint {str(fp)[:12]}); search it with --model "
                             f"{self.model} or build an index with this model")

    def search(self, queries, k: int = 10) -> list[list[Hit]]:
        """The ``k`` stored items of largest inner product with each query, best first.

        Parameters
        ----------
        queries : array-like of float, shape (Q, D) or (D,)
            Query embeddings of the index's model; L2-normalised here.
        k : int, default 10

        Returns
        -------
        list of Q lists of Hit
            Fewer than ``k`` hits when the index holds fewer items.

        Raises
        ------
        UsageError
            ``queries`` is not (Q, D) with the index's D, or ``k`` is not a positive integer.
        DataError
            A query is not finite or is all zeros.
        """
        k = check_positive_int("k", k)
        q = _normalised(queries, "queries", self.dim)
        with self._lock:
            k_eff = min(k, len(self))
            if not len(q) or not k_eff:
                return [[] for _ in range(len(q))]
            scores, ids = self._search_ids(q, k_eff, self.manifest.get("search_value"))
            found = self._items.lookup(ids[ids >= 0])
        return [[Hit(int(i), float(s), *found[int(i)]) for s, i in zip(srow, irow) if int(i) in found]
                for srow, irow in zip(scores, ids)]

    def _search_ids(self, q: np.ndarray, k: int, value) -> tuple[np.ndarray, np.ndarray]:
        """Scores and ids (Q, k), best first; id -1 where fewer were found."""
        kind = INDEX_TYPES.get(self.index_type)
        params = kind.search_params(value, self._selector) if (value is not None or self._selector) else None
        if self.index_type != "ivfpq":
            scores, ids = self._index.search(q, k, params=params)
            return scores, ids
        depth = max(k, _TUNE_K) * int(value[1])            # as many candidates as tuning had, at least
        _, cand = self._index.search(q, depth, params=params)                       # (Q, depth)
        return _rescore(self._vectors, q, cand, k)

    # ---------------------------------------------------------------------- updates
    def add(self, features, paths, metadata=None) -> np.ndarray:
        """Add rows to the index (saved at once); returns their new ids (int64).

        ``features`` (M, D) of the index's model, L2-normalised here; ``ivfpq`` keeps its
        trained lists (:meth:`rebuild` retrains, and re-chooses the type for the new size).

        Raises
        ------
        UsageError, DataError
            As :meth:`build`.
        """
        x = _normalised(features, "features", self.dim)
        paths, metadata = _check_items(len(x), paths, metadata)
        if not len(x):
            return np.zeros(0, np.int64)
        with self._lock:
            start = int(self.manifest["next_id"])
            ids = np.arange(start, start + len(x), dtype=np.int64)
            with open(self.path / VECTORS, "r+b") as f:
                f.truncate(start * self.dim * 4)           # drop rows of an interrupted add
                f.seek(0, os.SEEK_END)
                f.write(x.tobytes())
                f.flush()
                os.fsync(f.fileno())
            self._index.add_with_ids(x, ids)
            self._items.insert(ids, paths, metadata)
            self.manifest.update(next_id=start + len(x), count=len(self) + len(x),
                                 ntotal=int(self._index.ntotal))
            self._save()
            self._vectors = self._map_vectors()
        return ids

    def remove(self, which) -> int:
        """Remove items by id (ints) or path (strs); returns how many were removed.

        ``flat`` and ``ivfpq`` drop them from FAISS; ``hnsw`` cannot, and hides them
        from searches until :meth:`rebuild`.

        Raises
        ------
        UsageError
            An id or path that is not in the index (nothing is removed then).
        """
        which = [which] if isinstance(which, (str, int, np.integer)) else list(which)
        by_path = [w for w in which if isinstance(w, str)]
        by_id = [int(w) for w in which if not isinstance(w, str)]
        with self._lock:
            found = self._items.ids_of_paths(by_path)
            missing = [p for p in by_path if p not in found]
            present = set(self._items.lookup(by_id))
            missing += [str(i) for i in by_id if i not in present]
            if missing:
                raise UsageError(f"not in the index: {', '.join(missing[:5])}"
                                 f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
            ids = np.array(sorted(present | {i for v in found.values() for i in v}), np.int64)
            if not len(ids):
                return 0
            supports = INDEX_TYPES.get(self.index_type).supports_remove
            if supports:
                self._index.remove_ids(ids)
            self._items.delete(ids, hide=not supports)
            if not supports:
                self._hide(self._items.hidden())
            self.manifest.update(count=len(self) - len(ids), ntotal=int(self._index.ntotal))
            self._save()
        return len(ids)

    def rebuild(self, *, budget_mb: float | None = None, progress: bool | None = None) -> None:
        """Build the index again from its stored vectors, in place.

        The type is chosen again for the current size (unless the index was built with a
        forced type), ``ivfpq`` is retrained, hidden items are dropped and ids are
        renumbered 0..N-1 in their old order.

        Parameters
        ----------
        budget_mb : float, optional
            A new memory budget (default: the one the index was built with).
        progress : bool, optional
        """
        with self._lock:
            rows = self._items.all_rows()
            if not rows:
                raise DataError(f"{self.path}: the index is empty; nothing to rebuild")
            ids = np.array([r[0] for r in rows], np.int64)
            x = np.memmap(self.path / VECTORS, dtype=np.float32, mode="r",       # read in order
                          shape=(int(self.manifest["next_id"]), self.dim))[ids]
            budget = self.manifest.get("budget_mb") if budget_mb is None else budget_mb
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                _write_folder(tmp, x, [r[1] for r in rows], [r[2] for r in rows], model=self.model,
                              fingerprint=self.fingerprint, budget_mb=budget,
                              index_type=self.manifest.get("requested_type", "auto"),
                              target_recall=float(self.manifest.get("target_recall", 0.95)),
                              seed=int(self.manifest.get("seed", 0)), progress=progress)
                del x
                self._items.close()
                self._vectors = None
                _install(tmp, self.path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            new = SearchIndex.load(self.path)
            self.manifest, self._index, self._items = new.manifest, new._index, new._items
            self._vectors, self._selector = new._vectors, new._selector

    def _hide(self, ids: np.ndarray) -> None:
        faiss = _faiss()
        self._hidden_ids = np.ascontiguousarray(ids, dtype=np.int64)   # the selector points into it
        self._selector = (faiss.IDSelectorNot(faiss.IDSelectorBatch(self._hidden_ids))
                          if len(self._hidden_ids) else None)

    def _save(self) -> None:
        faiss = _faiss()
        tmp = self.path / f".{FAISS_FILE}.tmp-{os.getpid()}"
        try:
            faiss.write_index(self._index, str(tmp))
            os.replace(tmp, self.path / FAISS_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        _write_json(self.path / MANIFEST, self.manifest)


def _rescore(vectors, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of the candidate ids ``cand`` (Q, C) and the best ``k`` of them."""
    valid = cand >= 0
    safe = np.where(valid, cand, 0)
    order = np.argsort(safe, axis=None)                                # read the file in order
    rows = np.empty((safe.size, q.shape[1]), np.float32)
    rows[order] = vectors[safe.reshape(-1)[order]]
    scores = np.einsum("qcd,qd->qc", rows.reshape(*cand.shape, -1), q)     # (Q, C)
    scores = np.where(valid, scores, -np.inf)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, top, 1)
    ids = np.where(np.isfinite(best), np.take_along_axis(cand, top, 1), -1)
    return best.astype(np.float32), ids.astype(np.int64)


def _write_folder(folder: Path, features, paths, metadata, *, model: str, fingerprint: str,
                  budget_mb, index_type: str, target_recall: float, seed: int, progress) -> dict:
    """Write vectors, items, the FAISS index and the manifest of a new index into ``folder``."""
    n, dim = int(features.shape[0]), int(features.shape[1])
    with open(folder / VECTORS, "wb") as f:                       # normalised, chunk by chunk
        for s in range(0, n, _ADD_CHUNK):
            f.write(_normalised(features[s:s + _ADD_CHUNK]).tobytes())
    x = np.memmap(folder / VECTORS, dtype=np.float32, mode="r", shape=(n, dim))
    items = ItemTable(folder / ITEMS, create=True)
    try:
        items.insert(range(n), paths, metadata)
    finally:
        items.close()
    if index_type == "auto":
        plan = choose_index_type(n, dim, budget_mb)
    else:
        budget = (DEFAULT_BUDGET_MB if budget_mb is None else budget_mb) * 2 ** 20
        plan = plan_index(index_type, n, dim, budget)
    logger.info("%d x %d vectors: %s index %s, about %.1f MB", n, dim, plan.kind, plan.params,
                plan.memory_bytes / 2 ** 20)
    index = _make_index(plan, x, seed=seed, progress=progress)
    value, recall = _tune(index, plan, x, target_recall, seed=seed)
    manifest = {"format": FORMAT, "model": model, "fingerprint": fingerprint, "dim": dim,
                "index_type": plan.kind, "params": plan.params, "count": n, "ntotal": int(index.ntotal),
                "next_id": n, "search_value": value, "recall_at_10": recall, "target_recall": target_recall,
                "requested_type": index_type, "budget_mb": budget_mb, "memory_bytes": int(plan.memory_bytes),
                "seed": seed, "faiss_version": _faiss().__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _faiss().write_index(index, str(folder / FAISS_FILE))
    _write_json(folder / MANIFEST, manifest)
    return manifest


def _make_index(plan: IndexPlan, x: np.ndarray, *, seed: int, progress):
    """Create, train (``ivfpq``) and fill the FAISS index of ``plan`` with rows ``x`` (ids = rows)."""
    n, dim = x.shape
    index = INDEX_TYPES.get(plan.kind).make(dim, plan.params)
    if not index.is_trained:
        n_train = int(plan.params.get("n_train", n))
        pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, n_train), replace=False))
        index.train(np.ascontiguousarray(x[pick]))
    with progress_bar(total=n, progress=progress if n > _ADD_CHUNK else False,
                      desc=f"index ({plan.kind})", unit="vec") as bar:
        for s in range(0, n, _ADD_CHUNK):
            part = np.ascontiguousarray(x[s:s + _ADD_CHUNK])
            index.add_with_ids(part, np.arange(s, s + len(part), dtype=np.int64))
            bar.update(len(part))
    return index


def _tune(index, plan: IndexPlan, x: np.ndarray, target: float, *, seed: int) -> tuple:
    """The cheapest search setting of ``plan`` reaching ``target`` recall@10, and its recall.

    Each chain of settings (:meth:`chains` of the index type) is tried in order until one
    reaches the target; the cheapest of those (:meth:`cost`) wins, else the last setting of
    the last chain.  Up to 256 stored vectors are the queries; each one's own id is dropped
    from both the exact and the approximate result lists (leave-one-out).
    Exact indexes: ``(None, 1.0)``.
    """
    kind = INDEX_TYPES.get(plan.kind)
    chains = kind.chains(plan.params)
    n, dim = x.shape
    k = min(_TUNE_K, n - 1)
    if not chains or k < 1:
        return None, 1.0
    rng = np.random.default_rng(seed + 1)
    qids = np.sort(rng.choice(n, size=min(_TUNE_QUERIES, n), replace=False))
    q = np.ascontiguousarray(x[qids])
    truth = _drop_self(exact_top_k(x, q, k + 1), qids, k)
    reached, recall = [], 0.0
    for chain in chains:
        for setting in chain:
            if plan.kind == "ivfpq":
                _, cand = index.search(q, (k + 1) * setting[1], params=kind.search_params(setting))
                _, got = _rescore(x, q, cand, k + 1)
            else:
                _, got = index.search(q, k + 1, params=kind.search_params(setting))
            got = _drop_self(got, qids, k)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(truth.tolist(), got.tolist())]))
            if recall >= target:
                reached.append((kind.cost(setting, n, dim, plan.params), setting, recall))
                break
    if not reached:
        logger.warning("%s: recall@%d %.3f at the largest search setting %s, below the target %.2f",
                       plan.kind, k, recall, chains[-1][-1], target)
        return _plain(chains[-1][-1]), recall
    _, setting, recall = min(reached, key=lambda r: r[0])
    logger.info("%s: search setting %s reaches recall@%d %.3f", plan.kind, setting, k, recall)
    return _plain(setting), recall


def _plain(setting):
    """A search setting as JSON stores it: an int or a list of ints."""
    return [int(v) for v in setting] if isinstance(setting, (tuple, list)) else int(setting)


def _drop_self(ids: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    """Each row of ``ids`` without its query's own id, cut to ``k``."""
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, own) in enumerate(zip(ids, qids)):
        kept = row[row != own][:k]
        out[r, :len(kept)] = kept
    return out
