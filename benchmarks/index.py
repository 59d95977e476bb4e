"""Search index at scale: recall@10 against exact search and query time on one thread.

1,000,000 x 512 synthetic clustered embeddings (by default): 2,000 cluster centres, each
point its centre plus a displacement in a 16-dimensional subspace of its own cluster plus
a little isotropic noise, L2-normalised (neighbours differ along a few directions, as
those of real image embeddings do, rather than in every one of the 512).  Queries are
fresh points of the same clusters, not in the index.  The index is built by
``SearchIndex.build`` with the memory budget given (``auto`` applies the rule of
``cliplab.index.types``); its search setting is tuned at build time on stored vectors,
then measured here on the fresh queries: recall@10 against exact search, and the time of
one query at a time on one thread (``faiss.omp_set_num_threads(1)``), including the
exact re-scoring and the SQLite look-up of paths, as wall time and as the thread's CPU time
(the same on an idle machine; on a shared one the CPU time is what the query costs).
Exact search (FAISS ``IndexFlatIP``, one thread) on the same queries is timed for comparison.

Writes ``benchmarks/results/index.json`` and prints one line.

    python benchmarks/index.py [--n 1000000] [--dim 512] [--budget-mb 512] [--queries 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def clustered(n: int, dim: int, *, clusters: int = 2000, sub_dim: int = 16, spread: float = 1.0,
              noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, callable]:
    """``n`` unit vectors (float32) and a function drawing fresh ones from the same clusters.

    Centres have norm about 1; a point's displacement in its cluster's subspace has norm
    about ``spread``, its isotropic noise about ``noise``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) / np.sqrt(dim)       # (C, D), norm ~1
    bases = rng.standard_normal((clusters, sub_dim, dim), dtype=np.float32) / np.sqrt(dim)  # (C, S, D)

    def draw(m: int, gen: np.random.Generator) -> np.ndarray:
        lab = gen.integers(0, clusters, m)
        x = np.empty((m, dim), np.float32)
        for c in np.unique(lab):                                   # one matrix product per cluster
            rows = np.flatnonzero(lab == c)
            z = gen.standard_normal((len(rows), sub_dim), dtype=np.float32) * (spread / np.sqrt(sub_dim))
            eps = gen.standard_normal((len(rows), dim), dtype=np.float32) * (noise / np.sqrt(dim))
            x[rows] = centres[c] + z @ bases[c] + eps
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return draw(n, rng), draw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budget-mb", type=float, default=512)
    parser.add_argument("--index-type", default="auto")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--exact-queries", type=int, default=20, help="queries timed on exact search")
    parser.add_argument("--workdir", default=None, help="where the index is written (default: a temp folder)")
    args = parser.parse_args()

    import faiss

    from cliplab.index import SearchIndex
    from cliplab.index.types import exact_top_k

    t0 = time.perf_counter()
    x, draw = clustered(args.n, args.dim)
    queries = draw(args.queries, np.random.default_rng(12345))
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    truth = exact_top_k(x, queries, 10)                                         # (Q, 10)
    truth_s = time.perf_counter() - t0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cliplab-index-bench-"))
    out = work / "idx"
    try:
        t0 = time.perf_counter()
        idx = SearchIndex.build(x, [f"img/{i:07d}.jpg" for i in range(args.n)], out, model="synthetic",
                                fingerprint="0" * 64, budget_mb=args.budget_mb, index_type=args.index_type,
                                progress=False)
        build_s = time.perf_counter() - t0
        build_threads = faiss.omp_get_max_threads()
        disk = {p.name: p.stat().st_size for p in out.iterdir()}

        faiss.omp_set_num_threads(1)
        idx.search(queries[:5], k=10)                                            # warm the page cache
        times, cpu, got = [], [], []
        for q in queries:
            t, c = time.perf_counter(), time.thread_time()
            hits = idx.search(q[None], k=10)[0]
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
            got.append([h.id for h in hits])
        recall = float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth.tolist())]))
        ms, cpu_ms = np.array(times) * 1e3, np.array(cpu) * 1e3

        flat = faiss.IndexFlatIP(args.dim)
        flat.add(x)
        exact_times = []
        for q in queries[:args.exact_queries]:
            t, c = time.perf_counter(), time.thread_time()
            flat.search(q[None], 10)
            exact_times.append((time.perf_counter() - t, time.thread_time() - c))
        del flat
        exact_ms, exact_cpu_ms = (float(v) * 1e3 for v in np.median(exact_times, axis=0))
        load = os.getloadavg()[0]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    m = idx.manifest
    result = {
        "benchmark": "index",
        "data": {"n": args.n, "dim": args.dim,
                 "generator": "2000 clusters: centre norm ~1, displacement ~1 in a 16-dim subspace of "
                              "each, isotropic noise ~0.05",
                 "queries": args.queries, "queries_in_index": False},
        "index": {"type": m["index_type"], "params": m["params"], "budget_mb": args.budget_mb,
                  "search_setting": m["search_value"], "tuned_recall_at_10": round(m["recall_at_10"], 4),
                  "estimated_memory_mb": round(m["memory_bytes"] / 2 ** 20, 1),
                  "files_mb": {k: round(v / 2 ** 20, 1) for k, v in disk.items()}},
        "build_s": round(build_s, 1),
        "build_threads": build_threads,
        "recall_at_10": round(recall, 4),
        "query_ms_one_thread": {"median": round(float(np.median(ms)), 3), "mean": round(float(ms.mean()), 3),
                                "p99": round(float(np.percentile(ms, 99)), 3)},
        "query_cpu_ms_one_thread": {"median": round(float(np.median(cpu_ms)), 3),
                                    "mean": round(float(cpu_ms.mean()), 3),
                                    "p99": round(float(np.percentile(cpu_ms, 99)), 3)},
        "exact_query_ms_one_thread": round(exact_ms, 2),
        "exact_query_cpu_ms_one_thread": round(exact_cpu_ms, 2),
        "load_average_1min_at_end": round(load, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "data_mb": round(x.nbytes / 2 ** 20, 0),
        "generate_s": round(gen_s, 1), "ground_truth_s": round(truth_s, 1),
        "targets": {"recall_at_10": 0.95, "query_ms": 5.0},
        "met": {"recall": bool(recall >= 0.95), "wall_ms": bool(np.median(ms) < 5.0),
                "cpu_ms": bool(np.median(cpu_ms) < 5.0)},
        "faiss": faiss.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }
    path = Path(__file__).parent / "results" / "index.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"index {args.n:,} x {args.dim}: {m['index_type']} {m['params']} setting {m['search_value']}: "
          f"recall@10 {recall:.3f}, {np.median(ms):.2f} ms/query median (p99 {np.percentile(ms, 99):.2f}; "
          f"CPU {np.median(cpu_ms):.2f}) on one thread vs exact {exact_ms:.1f} ms (CPU {exact_cpu_ms:.1f}); "
          f"build {build_s:.0f} s on {build_threads} threads, "
          f"index ~{m['memory_bytes'] / 2 ** 20:.0f} MB, peak RSS {result['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
