"""Open-vocabulary detection on crowded ShapesWorld scenes: Soft-NMS against NMS.

``shapes:det`` test scenes (256 px, 3-12 overlapping shapes; the shapes-tiny world) with
shapes-tiny, class queries "a photo of a {c}." for the ten ShapesWorld shapes.  Every
proposal is scored once by crop-and-encode (:func:`cliplab.dense.detect.score_regions`:
square crops of 3x the box's longer side, pixels outside the box blanked, which matches
the object scale of shapes-tiny's training images); then each suppression rule runs on
the same scores (:func:`cliplab.dense.detect.suppress`, 100 detections per image) and COCO
box AP is computed by pycocotools (:func:`cliplab.eval.coco.coco_box_ap`).

Two proposal sets:

- ``pipeline``: what ``cliplab detect`` does, dense (SCLIP class-map regions) + window
  proposals (sides 1/8, 1/4, 1/2 of the image, stride half a side);
- ``jittered truth``: 8 copies of every ground-truth box, each corner moved by
  N(0, (0.1 x side)^2) (seed 0): the duplicate detections of a localising detector, so that
  the suppression rule is what is measured.

Each table is given on all scenes and on the crowded ones (8 objects or more).  Scenes/s:
proposals + scores + linear Soft-NMS of the pipeline, one thread.

Usage: python benchmarks/detect_shapes.py [--n 48] [--model shapes-tiny]
Writes benchmarks/results/detect_shapes.json and docs/anomaly_detection/detect.png; prints a
one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.datasets import load_dataset  # noqa: E402
from cliplab.dense.detect import Detections, prepare_image, score_regions, suppress  # noqa: E402
from cliplab.dense.proposals import ProposalOptions, parse_proposals, propose  # noqa: E402
from cliplab.dense.segment import class_queries  # noqa: E402
from cliplab.dense.visualize import draw_detections  # noqa: E402
from cliplab.eval.coco import coco_box_ap, coco_ground_truth, coco_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "detect_shapes.json"
PICTURE = ROOT / "docs" / "anomaly_detection" / "detect.png"
TEMPLATES = ["a photo of a {c}."]
CONTEXT = 3.0
CROWDED = 8
RULES = {"Soft-NMS linear (N_t 0.3)": dict(nms="soft-linear", iou_thr=0.3),
         "Soft-NMS Gaussian (sigma 0.5)": dict(nms="soft-gaussian", sigma=0.5),
         "NMS (IoU 0.3)": dict(nms="hard", iou_thr=0.3),
         "NMS (IoU 0.5)": dict(nms="hard", iou_thr=0.5),
         "no suppression": dict(nms="none")}


def jittered_truth(data, copies: int = 8, scale: float = 0.1, seed: int = 0) -> list[np.ndarray]:
    """``copies`` noisy versions of every ground-truth box, clipped to the image: (K_i * copies, 4)."""
    rng = np.random.default_rng(seed)
    out = []
    for img, boxes in zip(data.items, data.boxes):
        h, w = img.shape[:2]
        b = np.repeat(boxes, copies, axis=0)
        side = b[:, 2:] - b[:, :2]                                                # (K, 2): w, h
        j = b + rng.normal(0, scale, b.shape) * np.concatenate([side, side], axis=1)
        j = np.clip(j, 0, [w, h, w, h])
        j[:, 2:] = np.maximum(j[:, 2:], j[:, :2] + 1)
        out.append(j.astype(np.float32))
    return out


def evaluate(data, boxes, probs, subsets: dict) -> dict:
    rows = {}
    for name, kw in RULES.items():
        dets = [Detections(*suppress(b, p, max_dets=100, **kw)) for b, p in zip(boxes, probs)]
        rows[name] = {}
        for sub, idx in subsets.items():
            d = data.subset(idx)
            m = coco_box_ap(coco_ground_truth(d), coco_results([dets[i] for i in idx]))
            rows[name][sub] = {k: round(m[k], 4) for k in ("AP", "AP50", "AP75", "AR@100")}
    return rows


def picture(data, dets, names, out: Path, top: int = 12) -> None:
    """Ground truth (left) and the ``top`` best detections (right) of scene 0."""
    img = data.items[0]
    truth = draw_detections(img, data.boxes[0], data.labels[0], np.ones(len(data.boxes[0])), names, width=1)
    d = dets[0]
    found = draw_detections(img, d.boxes[:top], d.labels[:top], d.scores[:top], names, width=1)
    canvas = Image.new("RGB", (2 * img.shape[1] + 8, img.shape[0]), "white")
    canvas.paste(truth, (0, 0))
    canvas.paste(found, (img.shape[1] + 8, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bb = cliplab.load(args.model)
    data = load_dataset("shapes:det", "test", n=args.n)
    names, queries, owner = class_queries(bb, list(data.classnames), TEMPLATES)
    n_obj = np.array([len(b) for b in data.boxes])
    subsets = {"all": np.arange(len(data)), f"crowded (>= {CROWDED} objects)": np.flatnonzero(n_obj >= CROWDED)}
    tensors = [prepare_image(bb, x)[1] for x in data.items]

    with torch.inference_mode():
        t0 = time.perf_counter()
        opts = ProposalOptions(templates=TEMPLATES)
        props = propose(bb, list(data.items), list(data.classnames), parse_proposals("dense+windows"), opts)
        t1 = time.perf_counter()
        probs = score_regions(bb, tensors, props, queries, owner, context=CONTEXT, batch_size=256)
        t2 = time.perf_counter()
        dets = [Detections(*suppress(b, p, nms="soft-linear"), classes=names) for b, p in zip(props, probs)]
        t3 = time.perf_counter()
        jit = jittered_truth(data)
        jprobs = score_regions(bb, tensors, jit, queries, owner, context=CONTEXT, batch_size=256)

    results = {
        "config": {"n": len(data), "model": args.model, "dataset": "shapes:det test", "templates": TEMPLATES,
                   "context": CONTEXT, "blank": True, "threads": args.threads, "max_dets": 100,
                   "score_thr": 0.05, "crowded_scenes": int(len(subsets[list(subsets)[1]])),
                   "objects_per_scene": round(float(n_obj.mean()), 2)},
        "pipeline": {"proposals_per_scene": round(float(np.mean([len(p) for p in props])), 1),
                     "seconds": {"proposals": round(t1 - t0, 2), "scores": round(t2 - t1, 2),
                                 "soft_nms": round(t3 - t2, 3)},
                     "scenes_per_s": round(len(data) / (t3 - t0), 3),
                     "rules": evaluate(data, props, probs, subsets)},
        "jittered_truth": {"proposals_per_scene": round(float(np.mean([len(p) for p in jit])), 1),
                           "rules": evaluate(data, jit, jprobs, subsets)},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    picture(data, dets, names, PICTURE)
    for setting in ("pipeline", "jittered_truth"):
        print(setting)
        for rule, subs in results[setting]["rules"].items():
            print(f"  {rule:32s} " + "  ".join(f"{s}: AP {100 * m['AP']:.1f} AP50 {100 * m['AP50']:.1f}"
                                               for s, m in subs.items()))
    crowd = list(subsets)[1]
    jr = results["jittered_truth"]["rules"]
    print(f"detect_shapes: {len(data)} scenes, {results['pipeline']['scenes_per_s']} scenes/s; jittered truth, "
          f"crowded AP: Soft-NMS linear {100 * jr['Soft-NMS linear (N_t 0.3)'][crowd]['AP']:.1f}, Gaussian "
          f"{100 * jr['Soft-NMS Gaussian (sigma 0.5)'][crowd]['AP']:.1f}, NMS "
          f"{100 * jr['NMS (IoU 0.3)'][crowd]['AP']:.1f}")


if __name__ == "__main__":
    main()
