"""The main job: classify a fresh ShapesWorld test set zero-shot and write a report.

:func:`run_demo` renders ``n`` single-object test scenes, classifies them among all
colour x shape classes the model was trained on with the prompt
"a photo of a {colour} {shape}.", and writes to ``out_dir``:

- ``images/``: the rendered PNGs,
- ``predictions.csv``: path, true label, predicted label, probability, correct,
- ``report.md``: accuracy (overall, seen and held-out compositions) and the table,
- ``grid.png``: the images with their predicted labels (green right, red wrong).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .zeroshot import ZeroShotClassifier

logger = logging.getLogger("cliplab.demo")

PROMPT = "a photo of a {c}."


@dataclass
class DemoResult:
    rows: list[dict]
    accuracy: float
    accuracy_seen: float | None
    accuracy_heldout: float | None
    n_classes: int
    out_dir: Path


def demo_world(seed: int):
    """The ShapesWorld the bundled model was trained on, with seed ``seed``
    (:func:`cliplab.data.shapes.shapes_tiny_world`)."""
    from .data.shapes import shapes_tiny_world

    return shapes_tiny_world(seed=seed)


def run_demo(backbone, out_dir: str | Path = "demo-output", *, n: int = 48, seed: int = 2026,
             progress: bool | None = None) -> DemoResult:
    """Render, classify and report; returns the rows and accuracies."""
    from .data.shapes import task_classes, task_world

    world = task_world(demo_world(seed), "color-shape")
    world = world.replace(split_sizes={"test": max(n, world.split_sizes["test"])})  # as the eval datasets do
    classes = task_classes(world, "color-shape", "test")
    heldout = {f"{c} {s}" for c, s in world.heldout}
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, scenes = world.render_batch("test", range(n))                  # (N, H, W, 3)
    paths = []
    for img, sc in zip(images, scenes):
        paths.append(out / "images" / f"test_{sc.index:05d}.png")
        Image.fromarray(img).save(paths[-1])
    clf = ZeroShotClassifier(backbone, classes, templates=[PROMPT], progress=progress)
    labels, probs = clf.topk(backbone.encode_images(paths, progress=progress).features, k=1)
    rows = []
    for path, sc, lab, p in zip(paths, scenes, labels[:, 0], probs[:, 0]):
        truth = sc.objects[0].name
        rows.append({"image": str(path.relative_to(out)), "true": truth, "predicted": str(lab),
                     "prob": round(float(p), 4), "correct": truth == lab,
                     "composition": "held-out" if truth in heldout else "seen"})
    result = DemoResult(rows, _acc(rows), _acc([r for r in rows if r["composition"] == "seen"]),
                        _acc([r for r in rows if r["composition"] == "held-out"]), len(classes), out)
    _write_csv(out / "predictions.csv", rows)
    _write_report(out / "report.md", result, backbone)
    _write_grid(out / "grid.png", images, rows)
    return result


def _acc(rows) -> float | None:
    return float(np.mean([r["correct"] for r in rows])) if rows else None


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _write_report(path: Path, res: DemoResult, backbone) -> None:
    lines = [
        "# cliplab demo: zero-shot classification on ShapesWorld", "",
        f"Model `{backbone.name}` (fingerprint `{backbone.fingerprint[:12]}`), {len(res.rows)} "
        f"single-object test scenes, {res.n_classes} colour x shape classes, prompt \"{PROMPT}\".", "",
        "| split | accuracy |", "|---|---|",
        f"| all | {_pct(res.accuracy)} |",
        f"| seen compositions | {_pct(res.accuracy_seen)} |",
        f"| held-out compositions (never in training) | {_pct(res.accuracy_heldout)} |", "",
        "![predictions](grid.png)", "",
        "| image | true | predicted | prob | correct |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r['image']} | {r['true']} | {r['predicted']} | {r['prob']:.3f} | "
              f"{'yes' if r['correct'] else 'no'} |" for r in res.rows]
    path.write_text("\n".join(lines) + "\n")


def _write_grid(path: Path, images: np.ndarray, rows: list[dict], cols: int = 8, scale: int = 2) -> None:
    n, h, w, _ = images.shape
    cell_w, cell_h = w * scale, h * scale + 14
    grid = Image.new("RGB", (cols * cell_w, ((n + cols - 1) // cols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, r) in enumerate(zip(images, rows)):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        grid.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        draw.text((x + 2, y + h * scale + 1), r["predicted"][:22],
                  fill=(0, 130, 0) if r["correct"] else (200, 0, 0))
    grid.save(path)
