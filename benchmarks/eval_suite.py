"""Wall time of ``cliplab eval --suite shapes``: cold (empty feature cache) and warm.

Runs the suite twice as a user would, each time in a fresh process: first with an
empty cache folder (every image and prompt is encoded), then with the same folder
(features come from the cache; dataset rendering, text prompts not yet cached and the
scikit-learn fits still run).  Reports both wall times and their ratio, and checks that
the two runs give the same metrics.

Usage: python benchmarks/eval_suite.py [--model shapes-tiny] [--suite shapes]
Writes benchmarks/results/eval_suite.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cliplab.eval.results import read_results

RESULTS = Path(__file__).parent / "results"


def run_suite(model: str, suite: str, cache: Path, out: Path) -> float:
    env = {**os.environ, "CLIPLAB_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "cliplab.cli.main", "eval", "--suite", suite, "--model", model,
           "--cache", str(cache), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"suite failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def _same(a, b) -> bool:
    """Equal, counting NaN (acc5 with fewer than 5 classes) equal to NaN."""
    return a == b or (a != a and b != b)


def stage_seconds(records: list[dict]) -> dict:
    total: dict[str, float] = {}
    for r in records:
        for k, v in r["cliplab"]["timings"].items():
            total[k] = round(total.get(k, 0.0) + v, 3)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--suite", default="shapes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cold_s = run_suite(args.model, args.suite, tmp / "cache", tmp / "cold")    # one file per evaluation
        warm_s = run_suite(args.model, args.suite, tmp / "cache", tmp / "warm")
        cold, warm = read_results(tmp / "cold"), read_results(tmp / "warm")
    diffs = {f"{c['dataset']} {c['task']} {k}": [v, w["metrics"].get(k)]
             for c, w in zip(cold, warm) for k, v in c["metrics"].items() if not _same(v, w["metrics"].get(k))}
    same = not diffs
    res = {"model": args.model, "suite": args.suite,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "cold_s": round(cold_s, 2), "warm_s": round(warm_s, 2), "cold_over_warm": round(cold_s / warm_s, 2),
           "same_metrics": same, "metric_diffs": diffs, "stages_cold_s": stage_seconds(cold), "stages_warm_s": stage_seconds(warm),
           "metrics": {f"{r['dataset']} {r['task']}": r["metrics"] for r in cold}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_suite.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"eval --suite {args.suite} --model {args.model}: cold {cold_s:.1f} s, warm {warm_s:.1f} s, "
          f"{res['cold_over_warm']:.2f}x faster warm, metrics identical: {same}")


if __name__ == "__main__":
    main()
