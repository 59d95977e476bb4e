"""Ranking-aware adapter vs zero-shot similarity ordering on ShapesWorld counting and size.

For ``shapes:count`` (target: objects in the image) and ``shapes:size`` (target: visible
object area), a :class:`cliplab.adapt.RankingAdapter` is trained on the first K train
scenes (towers frozen, fixed seeds) and scored on held-out test scenes with Kendall's tau,
Spearman's rho and NDCG@10 (:mod:`cliplab.eval.metrics`).  Zero-shot baseline: order by
the cosine similarity of each image to a text, both the adapter's instruction and a
descriptive caption ("a photo of many shapes.", "a photo of a large shape.").

Usage: python benchmarks/rank_shapes.py [--shots 16 64] [--tasks count size] [--n-test 300] [--epochs 30]
[--out FILE] [--picture PNG]
Writes benchmarks/results/rank_shapes.json and prints a one-line summary.  One thread.
``--picture``: test scenes in the zero-shot (caption) order and in the order of the adapter of
the smallest K, for the first task, every 30th scene of the order, with the true value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.adapt import RankingAdapter  # noqa: E402
from cliplab.data.shapes import shapes_task  # noqa: E402
from cliplab.eval.metrics import kendall_tau, ndcg_at_k, spearman  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rank_shapes.json"
#: task -> (target attribute, adapter instruction, descriptive zero-shot caption)
TASKS = {"count": ("count", "Rank the images by the number of shapes.", "a photo of many shapes."),
         "size": ("area", "Rank the images by the size of the shape.", "a photo of a large shape.")}


def _metrics(scores: np.ndarray, y: np.ndarray) -> dict:
    return {"kendall_tau": kendall_tau(scores, y), "spearman": spearman(scores, y),
            "ndcg@10": ndcg_at_k(y, scores, k=10)}


def _picture(path, images, y, orders: dict, key: str, every: int = 30, scale: int = 2) -> None:
    """One row per order: every ``every``-th image from the highest score down, its true value under it."""
    from PIL import Image, ImageDraw

    side = images[0].shape[0] * scale
    picks = {name: np.argsort(-s, kind="stable")[::every] for name, s in orders.items()}
    cols = max(len(p) for p in picks.values())
    sheet = Image.new("RGB", (cols * side, len(picks) * (side + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, idx) in enumerate(picks.items()):
        top = r * (side + 30)
        draw.text((4, top + 2), f"{name} (high to low; {key} under each)", fill="black")
        for c, i in enumerate(idx):
            sheet.paste(Image.fromarray(images[i]).resize((side, side), Image.NEAREST), (c * side, top + 14))
            draw.text((c * side + side // 2 - 8, top + 14 + side), f"{y[i]:g}", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--shots", type=int, nargs="+", default=[16, 64], help="training scenes (K)")
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="adapter seed (the world seed is 0)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--picture", help="write a PNG of the two orders of the first task")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bb = cliplab.load(args.model)
    rows, line = [], []
    for task in args.tasks:
        key, prompt, caption = TASKS[task]
        test = shapes_task(task, "test", args.n_test)
        y = np.asarray(test.attributes[key], dtype=float)
        x = bb.encode_images(test.items, progress=False).features                      # (N, D)
        for name, text in (("zero-shot: instruction", prompt), ("zero-shot: caption", caption)):
            m = _metrics(x @ bb.encode_texts([text])[0], y)
            rows.append({"task": task, "target": key, "method": name, "text": text, "shots": 0, **m})
        train = shapes_task(task, "train", max(args.shots))
        for k in args.shots:
            est = RankingAdapter(backbone=bb, epochs=args.epochs, random_state=args.seed, progress=False)
            est.fit(train.items[:k], np.asarray(train.attributes[key][:k], dtype=float), prompt=prompt)
            m = _metrics(est.predict(test.items), y)
            rows.append({"task": task, "target": key, "method": "ranking adapter", "text": prompt, "shots": k, **m,
                         "fit_seconds": round(est.fit_time_, 1), "trainable_parameters": est.n_trainable_})
            line.append(f"{task} K={k} tau {m['kendall_tau']:.3f}")
            if args.picture and task == args.tasks[0] and k == min(args.shots):
                zs = x @ bb.encode_texts([caption])[0]
                _picture(args.picture, test.items, y, {f"zero-shot '{caption}'": zs,
                                                       f"ranking adapter, K={k}": est.predict(test.items)}, key)
        for r in rows[-len(args.shots) - 2:]:
            print(f"  {r['task']:5s} {r['method']:22s} K={r['shots']:<3d} tau={r['kendall_tau']:+.3f} "
                  f"rho={r['spearman']:+.3f} ndcg@10={r['ndcg@10']:.3f}", file=sys.stderr)
    out = {"benchmark": "rank_shapes", "model": args.model, "fingerprint": bb.fingerprint,
           "version": cliplab.__version__, "n_test": args.n_test, "epochs": args.epochs, "seed": args.seed,
           "threads": 1, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"rank_shapes: {', '.join(line)}; {out['seconds']:.0f} s; results {args.out}")


if __name__ == "__main__":
    main()
