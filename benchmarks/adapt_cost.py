"""Fit cost of the feature adapters: GDA and Tip-Adapter at ImageNet scale.

Synthetic L2-normalised features: ``--classes`` (1,000) classes x ``--shots`` (16)
training features of ``--dim`` (512) dimensions, a validation split of ``--val`` (4) per
class and text weights near the class centres; seeded.  Each adapter is fit with that
validation split (so its hyper-parameter search is part of the time), ``--repeats`` times;
the median fit time is reported.  Target: GDA fit under 2 s.  Tip-Adapter runs the
reference's 200 x 20 (beta, alpha) grid.

Usage: python benchmarks/adapt_cost.py [--repeats 3] [--quick]
Writes benchmarks/results/adapt_cost.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import sklearn

from cliplab.adapt import GDA, TipAdapter

RESULTS = Path(__file__).parent / "results"
TARGET_GDA_S = 2.0


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def synthetic(classes: int, shots: int, val: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(classes, dim)))                              # (C, D)

    def draw(k):
        y = np.repeat(np.arange(classes), k)
        return unit(centres[y] + 1.5 * rng.normal(size=(len(y), dim)) / np.sqrt(dim)), y

    (x, y), (xv, yv) = draw(shots), draw(val)
    text = unit(centres + rng.normal(size=(classes, dim)) / np.sqrt(dim))       # (C, D)
    return x, y, xv, yv, text


def time_fit(make, x, y, xv, yv, repeats: int) -> dict:
    times, est = [], None
    for _ in range(repeats):
        est = make()
        t0 = time.perf_counter()
        est.fit(x, y, X_val=xv, y_val=yv)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "val_accuracy": est.val_score_}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--val", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="100 classes, 1 repeat (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.classes, args.repeats = 100, 1
    x, y, xv, yv, text = synthetic(args.classes, args.shots, args.val, args.dim)
    gda = time_fit(lambda: GDA(text_weights=text), x, y, xv, yv, args.repeats)
    tip = time_fit(lambda: TipAdapter(text_weights=text), x, y, xv, yv, args.repeats)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__, "sklearn": sklearn.__version__},
              "setup": {"classes": args.classes, "shots": args.shots, "val_per_class": args.val,
                        "dim": args.dim, "repeats": args.repeats},
              "gda": gda, "tip_adapter": tip, "target_gda_s": TARGET_GDA_S,
              "gda_meets_target": gda["median_s"] < TARGET_GDA_S}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adapt_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.shots} shots x {args.classes} classes x {args.dim} dims: GDA fit {gda['median_s']:.2f} s "
          f"(target < {TARGET_GDA_S:.0f} s: {'met' if result['gda_meets_target'] else 'MISSED'}), "
          f"Tip-Adapter fit {tip['median_s']:.2f} s (200x20 grid); median of {args.repeats}")


if __name__ == "__main__":
    main()
