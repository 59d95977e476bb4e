"""Soft-NMS speed: the vectorised ``cliplab.ops.soft_nms`` against the reference loop.

The reference loop is :func:`cliplab.ops.soft_nms_loop`, the one-pair-at-a-time loop of the
authors' ``cpu_soft_nms`` run in Python.  Boxes are detection-like: jittered copies around
object centres (crowded clusters) mixed with uniform clutter.  The outputs must be identical
(same kept indices in the same order, scores within 1e-6).

Writes ``benchmarks/results/soft_nms.json`` and prints one line.

    python benchmarks/soft_nms.py [--n 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from cliplab.ops import soft_nms, soft_nms_loop


def detections(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 boxes (x1, y1, x2, y2) in a 640x480 image and scores: 3/4 in clusters."""
    rng = np.random.default_rng(seed)
    n_clustered = 3 * n // 4
    centres = rng.uniform([40, 40], [600, 440], (max(1, n // 10), 2))
    sizes = rng.uniform(20, 120, (len(centres), 2))
    k = rng.integers(0, len(centres), n_clustered)
    c = centres[k] + rng.normal(0, 0.1, (n_clustered, 2)) * sizes[k]
    wh = sizes[k] * rng.uniform(0.8, 1.25, (n_clustered, 2))
    clutter_c = rng.uniform(0, 640, (n - n_clustered, 2))
    clutter_wh = rng.uniform(10, 150, (n - n_clustered, 2))
    c, wh = np.r_[c, clutter_c], np.r_[wh, clutter_wh]
    boxes = np.c_[c - wh / 2, c + wh / 2].astype(np.float32)
    return boxes, rng.uniform(0.05, 1, n).astype(np.float32)


def best_time(fn, repeats: int) -> tuple[float, tuple]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    boxes, scores = detections(args.n)
    rows = {}
    for method in ("linear", "gaussian"):
        t_vec, (keep, s) = best_time(lambda: soft_nms(boxes, scores, method=method), args.repeats)
        t_loop, (keep_ref, s_ref) = best_time(lambda: soft_nms_loop(boxes, scores, method=method), 1)
        rows[method] = {
            "vectorised_ms": round(1e3 * t_vec, 2),
            "reference_loop_ms": round(1e3 * t_loop, 1),
            "speedup": round(t_loop / t_vec, 1),
            "kept": int(len(keep)),
            "identical_indices": bool(np.array_equal(keep, keep_ref)),
            "max_score_diff": float(np.abs(s - s_ref).max(initial=0.0)),
        }
    out = {
        "benchmark": "soft_nms",
        "n_boxes": args.n,
        "unit": "ms per call, best of repeats (one process, one thread)",
        "methods": rows,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }
    path = Path(__file__).parent / "results" / "soft_nms.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"soft_nms {args.n} boxes: " + ", ".join(
        f"{m} {r['vectorised_ms']:.1f} ms vs loop {r['reference_loop_ms']:.0f} ms ({r['speedup']:.0f}x, "
        f"identical={r['identical_indices']}, max diff {r['max_score_diff']:.1g})" for m, r in rows.items()))


if __name__ == "__main__":
    main()
