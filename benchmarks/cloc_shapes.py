"""CLOC region embeddings against crop-and-encode on ShapesWorld dense scenes.

A Prompter (:mod:`cliplab.dense.cloc`) is trained on the frozen shapes-tiny Backbone with
the region-text contrastive loss and the grounding loss, through the Trainer, on the
``train`` split of the dense world (256 px scenes of 3-12 overlapping objects, K = 4 boxes
and captions "a {colour} {shape}" per scene and step; tokens taken at ``--size`` px).
Held-out ``test`` scenes, every ground-truth box:

- **region classification**: argmax over the split's shapes of the cosine between the
  region embedding and the class query "a photo of a {shape}." (the template of the
  segmentation benchmark; not tuned);
- **text -> region grounding**: for each object's caption "a {colour} {shape}", pick the
  scene box whose region embedding is closest; correct when the picked object has the
  same caption (two identical objects are both right).  Chance is the mean share of such
  objects in a scene.  For the Prompter also its grounding head: the regressed box's
  best-overlapping scene box, and the mean IoU with the right box.

Methods: ``cloc`` (trained Prompter), ``cloc-init`` (the Prompter at its defined init: the
mean-pooled tokens, the same for every box), ``crop`` (each box cropped as a square from
the 256 px scene, resized to 64 px, encoded), ``crop-1.5x`` (with 1.5x context, ViLD),
``roi-mean`` (mean of the projected frozen patch tokens inside the box, the paper's
RoI-pooling ablation, at ``--size`` px).

Usage: python benchmarks/cloc_shapes.py [--steps 400] [--size 128] [--n-train 200] [--n-test 100]
Writes benchmarks/results/cloc_shapes.json; prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.shapes.dense import dense_scenes, dense_world  # noqa: E402
from cliplab.dense.cloc import (  # noqa: E402
    Prompter,
    crop_and_encode,
    ground,
    region_caption,
    region_embeddings,
    roi_mean_embeddings,
    train_cloc,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cloc_shapes.json"
TEMPLATE = "a photo of a {}."


def test_scenes(n: int, seed: int):
    """Images (256 px), padded boxes (N, K, 4) normalised, valid (N, K), shapes and captions."""
    world = dense_world(seed=seed)
    scenes = list(dense_scenes(world, "test", n))
    K = max(len(s.objects) for s in scenes)
    boxes = np.zeros((n, K, 4), dtype=np.float32)
    valid = np.zeros((n, K), dtype=bool)
    shapes, captions = [], []
    for i, s in enumerate(scenes):
        S = s.image.shape[0]
        for j, o in enumerate(s.objects):
            boxes[i, j] = np.asarray(o.box, dtype=np.float32) / S
            valid[i, j] = True
        shapes.append([o.shape for o in s.objects])
        captions.append([region_caption(o.color, o.shape) for o in s.objects])
    return [s.image for s in scenes], boxes, valid, shapes, captions, list(world.shapes_of("test"))


def classification_accuracy(emb, valid, shapes, classes, class_feats) -> float:
    right = total = 0
    for i in range(len(emb)):
        pred = (emb[i][valid[i]] @ class_feats.T).argmax(1)
        right += sum(classes[p] == s for p, s in zip(pred, shapes[i]))
        total += len(shapes[i])
    return right / total


def grounding_accuracy(emb, valid, captions, caption_feats) -> float:
    right = total = 0
    for i in range(len(emb)):
        regions = emb[i][valid[i]]                                     # (n_i, D)
        for j, cap in enumerate(captions[i]):
            pick = int((regions @ caption_feats[cap]).argmax())
            right += captions[i][pick] == cap
            total += 1
    return right / total


def chance_grounding(captions) -> float:
    shares = [sum(c == d for d in caps) / len(caps) for caps in captions for c in caps]
    return float(np.mean(shares))


def iou(a, b) -> np.ndarray:
    """IoU of boxes a (4,) with boxes b (n, 4)."""
    x0, y0 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x1, y1 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


def head_grounding(pred, boxes, valid, captions) -> tuple[float, float]:
    right = total = 0
    ious = []
    for i in range(len(pred)):
        b = boxes[i][valid[i]]
        for j, cap in enumerate(captions[i]):
            o = iou(pred[i, j], b)
            right += captions[i][int(o.argmax())] == cap
            ious.append(o[j])
            total += 1
    return right / total, float(np.mean(ious))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--size", type=int, default=128, help="input side of the Prompter's tokens")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    bb = cliplab.load(args.model)
    images, boxes, valid, shapes, captions, classes = test_scenes(args.n_test, args.seed)
    class_feats = bb.encode_texts([TEMPLATE.format(c) for c in classes])
    unique = sorted({c for caps in captions for c in caps})
    caption_feats = dict(zip(unique, bb.encode_texts(unique)))

    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        prompter = train_cloc(bb, args.steps, run, n_scenes=args.n_train, image_size=args.size,
                              batch_size=args.batch_size, lr=args.lr, seed=args.seed, progress=False)
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    train_s = time.perf_counter() - tic

    methods = {
        "cloc": lambda: region_embeddings(bb, prompter, images, boxes, progress=False),
        "cloc-init": lambda: region_embeddings(bb, Prompter.from_backbone(bb, image_size=args.size), images, boxes,
                                               progress=False),
        "crop": lambda: crop_and_encode(bb, images, boxes),
        "crop-1.5x": lambda: crop_and_encode(bb, images, boxes, enlarge=1.5),
        "roi-mean": lambda: roi_mean_embeddings(bb, images, boxes, image_size=args.size),
    }
    results = {}
    for name, fn in methods.items():
        t = time.perf_counter()
        emb = fn()
        results[name] = {"region_accuracy": classification_accuracy(emb, valid, shapes, classes, class_feats),
                         "grounding_accuracy": grounding_accuracy(emb, valid, captions, caption_feats),
                         "seconds": time.perf_counter() - t}
    K = boxes.shape[1]
    texts = [caps + [caps[0]] * (K - len(caps)) for caps in captions]      # pad to K per image
    acc, miou = head_grounding(ground(bb, prompter, images, texts), boxes, valid, captions)
    results["cloc"].update({"head_grounding_accuracy": acc, "head_mean_iou": miou})

    out = {"model": args.model, "steps": args.steps, "size": args.size, "n_train_scenes": args.n_train,
           "n_test_scenes": args.n_test, "n_test_regions": int(valid.sum()), "batch_size": args.batch_size,
           "lr": args.lr, "seed": args.seed, "threads": args.threads, "train_seconds": train_s,
           "classes": classes, "template": TEMPLATE, "chance": {"region_accuracy": 1 / len(classes),
                                                               "grounding_accuracy": chance_grounding(captions)},
           "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "methods": results,
           "command": f"python benchmarks/cloc_shapes.py --steps {args.steps} --size {args.size} "
                      f"--n-train {args.n_train} --n-test {args.n_test}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(" | ".join(f"{k}: cls {v['region_accuracy']:.3f} grd {v['grounding_accuracy']:.3f}"
                     for k, v in results.items()) + f" | train {train_s:.0f}s")


if __name__ == "__main__":
    main()
