"""Quality of a model on the ShapesWorld test split (the bars of the bundled shapes-tiny).

Metrics, single-object test scenes of the shapes-tiny world (64 in-distribution colour x
shape classes; 8 held-out compositions never seen in training):

- 64-way colour x shape top-1 with "a photo of a {colour} {shape}.", on seen and on
  held-out compositions;
- 8-way shape ("a photo of a {shape}.") and 8-way colour ("a photo of a {colour} shape.");
- text->image and image->text R@1 / R@5 on 1,000 test pairs of 1-3 object scenes
  (each image paired with its full-attribute caption);

and, with ``--curves metrics.csv``, a PNG of the training curves.

Usage: python benchmarks/shapes_tiny_quality.py [--model shapes-tiny] [--n 2000]
           [--curves runs/shapes-tiny/metrics.csv --plot training_curves.png]
Writes benchmarks/results/shapes_tiny_quality.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

import cliplab
from cliplab.data.shapes import COLORS, shapes_tiny_world, task_world

RESULTS = Path(__file__).parent / "results"


def accuracy(bb, images, truth, classes, prompts) -> np.ndarray:
    """Per-image correctness of zero-shot classification among ``classes``."""
    clf = cliplab.ZeroShotClassifier(bb, classes, templates=prompts)
    feats = bb.encode_images(images).features
    return clf.predict(feats) == np.asarray(truth)


def recall_at(sim: np.ndarray, ks=(1, 5)) -> dict:
    """R@k for a square similarity matrix whose diagonal holds the true pairs."""
    rank = (sim > np.diag(sim)[:, None]).sum(1)           # (N,) how many beat the true pair
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


def evaluate(bb, n: int = 2000, n_pairs: int = 1000, seed: int = 0) -> dict:
    world = task_world(shapes_tiny_world(seed), "color-shape")
    shapes = list(world.shapes_of("train"))
    heldout = {f"{c} {s}" for c, s in world.heldout}
    images, scenes = world.render_batch("test", range(n))              # (N, 64, 64, 3)
    objs = [sc.objects[0] for sc in scenes]
    names = [o.name for o in objs]
    correct = accuracy(bb, images, names, [f"{c} {s}" for s in shapes for c in COLORS],
                       ["a photo of a {c}."])
    held = np.array([nm in heldout for nm in names])
    out = {"model": bb.name, "fingerprint": bb.fingerprint, "n_test": n,
           "colour_shape_64way_seen": float(correct[~held].mean()),
           "colour_shape_64way_heldout": float(correct[held].mean()),
           "n_seen": int((~held).sum()), "n_heldout": int(held.sum()),
           "shape_8way": float(accuracy(bb, images, [o.shape for o in objs], shapes,
                                        ["a photo of a {c}."]).mean()),
           "colour_8way": float(accuracy(bb, images, [o.color for o in objs], list(COLORS),
                                         ["a photo of a {c} shape."]).mean())}
    multi = task_world(world, "retrieval")  # 1-3 objects
    imgs, scs = multi.render_batch("test", range(n_pairs))
    sim = bb.encode_images(imgs).features @ bb.encode_texts([sc.captions[0] for sc in scs]).T   # (N, N)
    out["retrieval_pairs"] = n_pairs
    out["image_to_text"] = recall_at(sim)
    out["text_to_image"] = recall_at(sim.T)
    return out


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(metrics_csv)))
    step = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(step, [float(r["loss"]) for r in rows])
    axes[0].set(xlabel="step", ylabel="InfoNCE loss", yscale="log", title="training loss")
    ev = [(int(r["step"]), float(r["eval_acc"])) for r in rows if r.get("eval_acc")]
    if ev:
        axes[1].plot(*zip(*ev), marker="o")
    axes[1].set(xlabel="step", ylabel="accuracy", ylim=(0, 1),
                title="64-way zero-shot accuracy (512 val scenes)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--n", type=int, default=2000, help="single-object test scenes")
    ap.add_argument("--curves", type=Path, help="metrics.csv of the training run")
    ap.add_argument("--plot", type=Path, default=Path("training_curves.png"))
    args = ap.parse_args()
    res = evaluate(cliplab.load(args.model), n=args.n)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shapes_tiny_quality.json").write_text(json.dumps(res, indent=2))
    if args.curves:
        plot_curves(args.curves, args.plot)
    print(f"{res['model']}: 64-way seen {100 * res['colour_shape_64way_seen']:.1f}%, "
          f"held-out {100 * res['colour_shape_64way_heldout']:.1f}%, shape {100 * res['shape_8way']:.1f}%, "
          f"colour {100 * res['colour_8way']:.1f}%, t2i R@1/5 {res['text_to_image']['R@1']:.3f}/"
          f"{res['text_to_image']['R@5']:.3f}, i2t R@1/5 {res['image_to_text']['R@1']:.3f}/"
          f"{res['image_to_text']['R@5']:.3f}")


if __name__ == "__main__":
    main()
