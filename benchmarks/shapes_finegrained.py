"""Fine-grained and ordinal ShapesWorld tasks: how the bundled model does where CLIP is weak.

Zero-shot top-1 (``cliplab.eval.tasks.zeroshot_classification``, each task's own template
``"a photo of {c}."``) on ``shapes:count``, ``shapes:size``, ``shapes:size-order`` and
``shapes:relation``; per-image multiple choice among the four relation captions with the
actual shapes (``attributes["captions"]``); the MMVP pair score on ``shapes:pairs``
(``cliplab.eval.metrics.pair_accuracy``, per detail); and text-driven ranking: Kendall's
tau between the image's similarity to ``"a photo of many shapes"`` / ``"a photo of a large
shape"`` and the true count / object area (``cliplab.eval.metrics.rank_correlation``).

Usage: python benchmarks/shapes_finegrained.py [--model shapes-tiny] [--n 500] [--out FILE]
Writes benchmarks/results/shapes_finegrained.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.shapes import shapes_task  # noqa: E402
from cliplab.data.shapes.finegrained import PAIR_DETAILS  # noqa: E402
from cliplab.eval.metrics import pair_accuracy, rank_correlation  # noqa: E402
from cliplab.eval.results import make_result, write_results  # noqa: E402
from cliplab.eval.tasks import TaskResult, zeroshot_classification  # noqa: E402
from cliplab.features import image_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "shapes_finegrained.json"
RANKING = {"count": ("a photo of many shapes.", "count"), "size": ("a photo of a large shape.", "area")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--n", type=int, default=500, help="test scenes per task (pairs: n/2 pairs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    bb = cliplab.load(args.model)
    records, line = [], []
    for task in ("count", "size", "size-order", "relation"):
        data = shapes_task(task, "test", args.n, seed=args.seed)
        res = zeroshot_classification(bb, data, progress=False)
        metrics = dict(res.metrics)
        metrics["chance"] = 1.0 / len(data.classnames)
        if task in RANKING:
            text, key = RANKING[task]
            x, _, _ = image_features(bb, data.items, progress=False)
            score = x @ bb.encode_texts([text], progress=False)[0]                  # (N,)
            metrics[f"kendall_tau({key}, sim('{text}'))"] = rank_correlation(score, data.attributes[key])
        if task == "relation":
            x, _, _ = image_features(bb, data.items, progress=False)
            caps = data.attributes["captions"]
            t = bb.encode_texts([c for cs in caps for c in cs], progress=False).reshape(len(caps), 4, -1)
            pick = np.einsum("nd,nkd->nk", x, t).argmax(1)
            metrics["acc1 (choice among 4 captions with the shapes)"] = float((pick == data.labels).mean())
        records.append(make_result(TaskResult("zeroshot_classification", data.name, metrics, res.details,
                                              res.timings), model_spec=args.model, fingerprint=bb.fingerprint))
        line.append(f"{task} {metrics['acc1']:.3f}")
        print(f"  {data.name}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()), file=sys.stderr)
    pairs = shapes_task("pairs", "test", args.n // 2, seed=args.seed)
    x, _, _ = image_features(bb, pairs.items, progress=False)
    t = bb.encode_texts([c[0] for c in pairs.captions], progress=False)
    per = pairs.attributes
    metrics = {"pair_accuracy": pair_accuracy(x, t, per["pair"]), "chance": 0.25}
    for detail in PAIR_DETAILS:
        on = np.asarray(per["detail"]) == detail
        metrics[f"pair_accuracy[{detail}]"] = pair_accuracy(x[on], t[on], np.asarray(per["pair"])[on])
    records.append(make_result(TaskResult("pair_accuracy", pairs.name, metrics, {"n_pairs": args.n // 2}),
                               model_spec=args.model, fingerprint=bb.fingerprint))
    print(f"  {pairs.name}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()), file=sys.stderr)
    line.append(f"pairs {metrics['pair_accuracy']:.3f}")
    write_results(args.out, records)
    print(f"shapes_finegrained: zero-shot top-1 {', '.join(line)}; {time.perf_counter() - t0:.0f} s; "
          f"results {args.out}")


if __name__ == "__main__":
    main()
