"""Index types and the rule that chooses one from a memory budget (autofaiss-style).

Three FAISS index types are registered in :data:`INDEX_TYPES` (``cliplab index build
--index-type``); ``auto`` (the default) applies this rule to N vectors of dimension D and
a memory budget of B bytes (``budget_mb``, default :data:`DEFAULT_BUDGET_MB`):

1. ``flat``, exact search (``IndexFlatIP``), when an exact query is cheap,
   N·D ≤ :data:`EXACT_MAX_MACS` = 2^24 multiply-adds per query (32,768 vectors of 512
   dims), and the vectors fit: N·(4D + 8) ≤ B.
2. ``hnsw``, a graph of M = 32 links per vector over the float vectors
   (``IndexHNSWFlat``), when N·(4D + 8M + 16) ≤ B.
3. ``ivfpq`` otherwise: 2^round(log2 √N) inverted lists, product-quantised codes of m
   bytes, m the largest of 64, 32, 16, 8, 4, 2, 1 that divides D with sub-vectors of at
   least 4 dims and N·(m + 8) + (lists + 2^bits)·4D ≤ B.  The r·k candidates the codes
   rank best (r = 10, 20 or 50) are re-scored exactly with the float vectors, read from
   disk (memory-mapped; not counted in B), so the codes only have to shortlist.
   A budget too small even for this is refused (:class:`~cliplab.errors.UsageError`).

The search setting of the approximate types (HNSW ``efSearch``; IVF ``nprobe`` and r) is
tuned at build time: the cheapest setting whose recall@10 against exact search reaches the
target (default 0.95) on up to 256 stored vectors used as queries, each query's own vector
left out of both result lists.  As autofaiss does, the memory budget chooses the
structure and the recall target its search setting; unlike autofaiss the recall is
measured, not predicted.

References
----------
autofaiss, ``autofaiss/indices/index_utils.py`` ``get_optimal_index_keys_v2`` (flat below
a size, IVF-Flat or IVF-PQ above, sized from a memory budget).
Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
Hierarchical Navigable Small World graphs", TPAMI 2018, arXiv:1603.09320.
Jégou, Douze & Schmid, "Product quantization for nearest neighbor search", TPAMI 2011.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["INDEX_TYPES", "IndexPlan", "choose_index_type", "plan_index", "DEFAULT_BUDGET_MB",
           "EXACT_MAX_MACS"]

#: Memory budget of ``auto`` when none is given, in MiB.
DEFAULT_BUDGET_MB = 4096
#: Largest N·D searched exactly by ``auto``: 2^24 multiply-adds per query.
EXACT_MAX_MACS = 2 ** 24
#: Links per vector of the HNSW graph.
HNSW_M = 32
#: Candidates per result that ``ivfpq`` may re-score exactly, tried in this order.
REFINE_FACTORS = (10, 20, 50)
#: Vectors per list a k-means centroid asks for in training (FAISS warns below 39).
TRAIN_PER_CENTROID = 64
#: Training sample size of ``ivfpq``: at least this many vectors when there are that many.
MIN_TRAIN = 100_000

INDEX_TYPES: Registry = Registry("index type")


def _faiss():
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexPlan:
    """An index type with its build parameters and its estimated memory in bytes."""

    kind: str
    params: dict = field(default_factory=dict)
    memory_bytes: int = 0


@INDEX_TYPES.register("flat", help="exact inner-product search (IndexFlatIP); small collections")
class FlatType:
    """Exact search: every query scores every vector."""

    supports_remove = True

    @staticmethod
    def chains(params: dict) -> list:
        return []

    @staticmethod
    def plan(n: int, dim: int, budget_bytes: float) -> IndexPlan | None:
        need = n * (4 * dim + 8)
        return IndexPlan("flat", {}, need) if need <= budget_bytes else None

    @staticmethod
    def make(dim: int, params: dict):
        faiss = _faiss()
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))

    @staticmethod
    def search_params(value, selector=None):
        faiss = _faiss()
        return faiss.SearchParameters(sel=selector) if selector is not None else None


@INDEX_TYPES.register("hnsw", help="HNSW graph over the float vectors (IndexHNSWFlat, M=32); fast and "
                                   "accurate when the vectors fit in memory")
class HNSWType:
    """Hierarchical navigable small-world graph; removal hides ids until a rebuild."""

    supports_remove = False

    @staticmethod
    def chains(params: dict) -> list:
        return [[16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]]

    @staticmethod
    def cost(setting, n: int, dim: int, params: dict) -> float:
        return float(setting)

    @staticmethod
    def plan(n: int, dim: int, budget_bytes: float) -> IndexPlan | None:
        need = n * (4 * dim + 8 * HNSW_M + 16)
        return IndexPlan("hnsw", {"M": HNSW_M, "ef_construction": 40}, need) if need <= budget_bytes else None

    @staticmethod
    def make(dim: int, params: dict):
        faiss = _faiss()
        graph = faiss.IndexHNSWFlat(dim, int(params.get("M", HNSW_M)), faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = int(params.get("ef_construction", 40))
        return faiss.IndexIDMap(graph)

    @staticmethod
    def search_params(value, selector=None):
        faiss = _faiss()
        p = faiss.SearchParametersHNSW(efSearch=int(value))
        if selector is not None:
            p.sel = selector
        return p


@INDEX_TYPES.register("ivfpq", help="inverted lists of product-quantised codes (IndexIVFPQ), "
                                    "candidates re-scored exactly; collections larger than memory")
class IVFPQType:
    """Inverted file with product quantisation; candidates re-scored with the float vectors."""

    supports_remove = True

    @staticmethod
    def plan(n: int, dim: int, budget_bytes: float) -> IndexPlan | None:
        nlist = 2 ** max(0, round(math.log2(math.sqrt(max(n, 1)))))
        n_train = min(n, max(TRAIN_PER_CENTROID * nlist, MIN_TRAIN))
        while nlist > 1 and 39 * nlist > n_train:                       # FAISS: >= 39 points per list
            nlist //= 2
        nbits = 8
        while nbits > 1 and 39 * 2 ** nbits > n_train:
            nbits -= 1
        for m in (64, 32, 16, 8, 4, 2, 1):
            if dim % m or (m > 1 and dim // m < 4):
                continue
            need = n * (m + 8) + (nlist + 2 ** nbits) * 4 * dim
            if need <= budget_bytes:
                return IndexPlan("ivfpq", {"nlist": nlist, "m": m, "nbits": nbits, "n_train": n_train}, need)
        return None

    @staticmethod
    def make(dim: int, params: dict):
        faiss = _faiss()
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, int(params["nlist"]), int(params["m"]), int(params["nbits"]),
                                 faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10                          # k-means iterations: lists, then codes
        index.pq.cp.niter = 10
        return index

    @staticmethod
    def chains(params: dict) -> list:
        nlist = int(params["nlist"])
        return [[(2 ** i, r) for i in range(int(math.log2(nlist)) + 1)] for r in REFINE_FACTORS]

    @staticmethod
    def cost(setting, n: int, dim: int, params: dict) -> float:
        nprobe, refine = setting                     # code bytes scanned + floats re-scored
        nlist, m = int(params["nlist"]), int(params["m"])
        return (nlist + nprobe * n / nlist) * m + refine * 10 * dim

    @staticmethod
    def search_params(value, selector=None):
        faiss = _faiss()
        p = faiss.SearchParametersIVF(nprobe=int(value[0]))
        if selector is not None:
            p.sel = selector
        return p


def plan_index(kind: str, n: int, dim: int, budget_bytes: float = math.inf) -> IndexPlan:
    """The plan of index type ``kind`` for ``n`` vectors of ``dim`` dims (parameters as in the
    module rule, the memory budget only sizes ``ivfpq``'s codes).

    Raises
    ------
    UsageError
        ``kind`` is not a registered index type, or ``ivfpq`` does not fit ``budget_bytes``.
    """
    plan = INDEX_TYPES.get(kind).plan(n, dim, math.inf if kind != "ivfpq" else budget_bytes)
    if plan is None:
        raise UsageError(f"{n} vectors of {dim} dims do not fit an {kind} index in "
                         f"{budget_bytes / 2 ** 20:.1f} MB; raise --budget-mb")
    return plan


def choose_index_type(n: int, dim: int, budget_mb: float | None = None) -> IndexPlan:
    """Apply the module rule: ``flat`` (small and fits), else ``hnsw`` (fits), else ``ivfpq``.

    Parameters
    ----------
    n, dim : int
        Number of vectors and their dimension.
    budget_mb : float, optional
        Memory the index may take, in MiB (default :data:`DEFAULT_BUDGET_MB`).

    Returns
    -------
    IndexPlan

    Raises
    ------
    UsageError
        Not even ``ivfpq`` with 1-byte codes fits the budget.

    Examples
    --------
    >>> choose_index_type(10_000, 512).kind
    'flat'
    >>> choose_index_type(1_000_000, 512).kind, choose_index_type(1_000_000, 512, 1024).kind
    ('hnsw', 'ivfpq')
    """
    budget = (DEFAULT_BUDGET_MB if budget_mb is None else budget_mb) * 2 ** 20
    if n * dim <= EXACT_MAX_MACS:
        plan = FlatType.plan(n, dim, budget)
        if plan is not None:
            return plan
    for kind in (HNSWType, IVFPQType):
        plan = kind.plan(n, dim, budget)
        if plan is not None:
            return plan
    least = IVFPQType.plan(n, dim, math.inf)
    smallest = n * 9 + (least.params["nlist"] + 2 ** least.params["nbits"]) * 4 * dim
    raise UsageError(f"{n} vectors of {dim} dims need at least {smallest / 2 ** 20:.1f} MB "
                     f"(1-byte codes); the budget is {budget / 2 ** 20:.1f} MB: raise --budget-mb")


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = 65_536) -> np.ndarray:
    """Ids (rows of ``vectors``) of the ``k`` largest inner products of each query, best first.

    ``vectors`` (N, D), ``queries`` (Q, D) float32; returns int64 (Q, min(k, N)).  Computed
    in chunks of ``chunk`` rows, so memory stays at Q·(chunk + k) scores.
    """
    k = min(k, len(vectors))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for s in range(0, len(vectors), chunk):
        scores = queries @ vectors[s:s + chunk].T                               # (Q, chunk)
        ids = np.broadcast_to(np.arange(s, s + scores.shape[1]), scores.shape)
        all_s = np.concatenate([best_s, scores], axis=1)
        all_i = np.concatenate([best_i, ids], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k] if all_s.shape[1] > k else \
            np.broadcast_to(np.arange(all_s.shape[1]), (len(queries), all_s.shape[1]))
        best_s = np.take_along_axis(all_s, top, 1)
        best_i = np.take_along_axis(all_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)
