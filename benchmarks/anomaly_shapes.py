"""Zero- and few-shot anomaly detection on a ShapesWorld inspection set, MVTec-style.

Builds an MVTec-style folder (``<category>/train/good``, ``test/good``, ``test/<defect>``,
``ground_truth/<defect>/<name>_mask.png``) of ShapesWorld inspection scenes: per category one
object (colour and shape) near the centre on the category's plain background, jittered in
position, size and colour; defective scenes carry one scratch, hole or stain with its mask.  Then runs
``cliplab.eval.anomaly.evaluate_anomaly`` with WinCLIP (zero-shot) and WinCLIP+ (1 and 4
shots) on the bundled ``shapes-tiny`` model, and saves a picture of maps.

Writes ``benchmarks/results/anomaly_shapes.json`` and ``docs/anomaly_detection/maps.png``.

AnomalyCLIP part (``--only anomalyclip``): prompts learned by ``train_anomalyclip`` on the
ShapesWorld inspection categories :data:`AUX_CATEGORIES` (300 steps, batch 8), then
AnomalyCLIP and WinCLIP zero-shot on an MVTec-style export of the *other* categories
:data:`HELDOUT_CATEGORIES` (``export_mvtec``: 10 normal and 10 per defect type each).
Writes ``benchmarks/results/anomalyclip_shapes.json`` and
``docs/anomaly_detection/anomalyclip_maps.png``.

    python benchmarks/anomaly_shapes.py [--n-test 20] [--folder DIR] [--only winclip|anomalyclip]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

CATEGORIES = (("red", "circle"), ("blue", "star"), ("green", "square"), ("yellow", "heart"))
#: Inspection categories AnomalyCLIP learns its prompts on, and those it is tested on (never seen).
AUX_CATEGORIES = ("circle", "square", "triangle", "star", "cross", "diamond")
HELDOUT_CATEGORIES = ("hexagon", "ring", "heart", "crescent")


def write_inspection_folder(root: Path, *, n_train: int = 8, n_good: int = 10, n_bad: int = 10, seed: int = 0,
                            categories=CATEGORIES, image_size: int = 64) -> Path:
    """An MVTec-style folder of ShapesWorld inspection scenes (see the module docstring)."""
    from PIL import Image

    from cliplab.data.shapes import ShapesWorld
    from cliplab.data.shapes.world import ObjectSpec, jitter_color

    world = ShapesWorld(seed=seed, image_size=image_size, defect_rate=1.0)
    S = image_size
    for c, (color, shape) in enumerate(categories):
        cat = root / f"{color}_{shape}"
        for split, n, defective in (("train", n_train, False), ("test", n_good, False), ("test", n_bad, True)):
            for i in range(n):
                rng = np.random.default_rng([seed, c, split == "test", defective, i])
                spec = ObjectSpec(shape, color, "large", S / 2 + rng.uniform(-3, 3), S / 2 + rng.uniform(-3, 3),
                                  S * rng.uniform(0.26, 0.3), jitter_color(color, rng))
                drng = np.random.default_rng([seed, c, 7, i]) if defective else None
                background_rng = np.random.default_rng([seed, c])   # one background colour per category
                scene = world.compose([spec], "plain", background_rng, drng)
                kind = scene.defects[0]["kind"] if defective else "good"
                folder = cat / split / ("good" if not defective else kind)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(scene.image).save(folder / f"{i:03d}.png")
                if defective:
                    gt = cat / "ground_truth" / kind
                    gt.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.uint8(scene.defects[0]["mask"]) * 255).save(gt / f"{i:03d}_mask.png")
    return root


def picture(backbone, root: Path, out: Path) -> None:
    """Test images, masks and WinCLIP / WinCLIP+ (4-shot) maps of one category."""
    from cliplab.data.anomaly_folder import read_anomaly_folder
    from cliplab.eval.anomaly import evaluate_category

    cat = read_anomaly_folder(root, ["blue_star"])[0]
    keep = [i for i, lab in enumerate(cat.labels) if lab == 1][:5]
    cat.test, cat.masks = [cat.test[i] for i in keep] + [cat.test[0]], [cat.masks[i] for i in keep] + [None]
    cat.labels, cat.defects = np.r_[np.ones(len(keep), int), 0], [cat.defects[i] for i in keep] + ["good"]
    _, zs, masks = evaluate_category(backbone, cat, method="winclip")
    _, fs, _ = evaluate_category(backbone, cat, method="winclip+", shots=4)
    _map_grid(cat, masks, [("WinCLIP", zs.maps), ("WinCLIP+ 4-shot", fs.maps)], out, column_width=1.6,
              height=6.6, dpi=80)


def _map_grid(cat, masks, rows, out: Path, *, column_width: float, height: float, dpi: int,
              image_size: int | None = None, compress: bool = False) -> None:
    """One column per test image of ``cat``: the image, its mask, then one anomaly map per ``rows`` entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(2 + len(rows), len(cat.test), figsize=(column_width * len(cat.test), height))
    for j, path in enumerate(cat.test):
        image = Image.open(path)
        axes[0, j].imshow(image.resize((image_size, image_size)) if image_size else image)
        axes[0, j].set_title(cat.defects[j].replace("_", " "), fontsize=8)
        axes[1, j].imshow(masks[j], cmap="gray")
        for i, (_, maps) in enumerate(rows, start=2):
            axes[i, j].imshow(maps[j], cmap="jet")
    for i, label in enumerate(["image", "mask", *(name for name, _ in rows)]):
        axes[i, 0].set_ylabel(label, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    if compress:  # a small PNG for the docs
        Image.open(out).convert("RGB").quantize(colors=128, method=Image.MEDIANCUT).save(out, optimize=True)


def anomalyclip_picture(backbone, root: Path, prompts: Path, out: Path) -> None:
    """One held-out category: a test image per defect type, masks, WinCLIP and AnomalyCLIP maps."""
    from cliplab.data.anomaly_folder import read_anomaly_folder
    from cliplab.eval.anomaly import evaluate_category

    cat = read_anomaly_folder(root, ["ring"])[0]
    keep = [cat.defects.index(d) for d in dict.fromkeys(cat.defects) if d != "good"] + [cat.defects.index("good")]
    cat.test, cat.masks = [cat.test[i] for i in keep], [cat.masks[i] for i in keep]
    cat.labels, cat.defects = cat.labels[keep], [cat.defects[i] for i in keep]
    _, wc, masks = evaluate_category(backbone, cat, method="winclip")
    _, ac, _ = evaluate_category(backbone, cat, method="anomalyclip", method_options={"prompts": prompts})
    _map_grid(cat, masks, [("WinCLIP", wc.maps), ("AnomalyCLIP", ac.maps)], out, column_width=1.5, height=6.2,
              dpi=72, image_size=128, compress=True)


def run_anomalyclip(bb, *, steps: int = 300, n_test: int = 10, seed: int = 0) -> dict:
    """AnomalyCLIP trained on AUX_CATEGORIES vs WinCLIP, both zero-shot on HELDOUT_CATEGORIES."""
    import time

    from cliplab.data.shapes.inspection import InspectionWorld, export_mvtec
    from cliplab.dense.anomaly.anomalyclip import train_anomalyclip
    from cliplab.eval.anomaly import evaluate_anomaly

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        prompts = train_anomalyclip(bb, AUX_CATEGORIES, steps=steps, out=Path(tmp) / "prompts", seed=seed,
                                    n_per_category=64, progress=False)
        train_s = time.perf_counter() - tic
        log = Path(tmp) / "prompts" / "train" / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        root = Path(tmp) / "heldout"
        export_mvtec(InspectionWorld(seed, categories=HELDOUT_CATEGORIES), root, n_train=4, n_test=n_test,
                     progress=False)
        for name, method, options in (("WinCLIP zero-shot", "winclip", None),
                                      ("AnomalyCLIP (prompts from the other categories)", "anomalyclip",
                                       {"prompts": prompts})):
            res = evaluate_anomaly(bb, root, method=method, method_options=options, progress=False)
            runs[name] = res
            m = res["mean"]
            print(f"{name:50s} image AUROC {m['image_auroc']:.3f} AP {m['image_ap']:.3f}  "
                  f"pixel AUROC {m['pixel_auroc']:.3f} AUPRO {m['pixel_aupro']:.3f}")
        anomalyclip_picture(bb, root, prompts, Path(__file__).parents[1] / "docs" / "anomaly_detection"
                            / "anomalyclip_maps.png")
    return {"benchmark": "anomalyclip_shapes", "model": "shapes-tiny", "train_categories": list(AUX_CATEGORIES),
            "test_categories": list(HELDOUT_CATEGORIES), "steps": steps, "batch_size": 8, "n_per_category": 64,
            "n_test_per_kind": n_test, "seed": seed, "train_seconds": round(train_s, 1),
            "loss_first": rows[0], "loss_last": rows[-1], "aupro_protocol": "mvtec", "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=20, help="good and defective test images per category")
    parser.add_argument("--folder", help="write the folder here (default: a temporary folder)")
    parser.add_argument("--only", choices=["winclip", "anomalyclip"], help="run only one part")
    args = parser.parse_args()

    import torch

    import cliplab
    from cliplab.eval.anomaly import evaluate_anomaly

    torch.set_num_threads(2)
    bb = cliplab.load("shapes-tiny")
    if args.only != "winclip":
        out = run_anomalyclip(bb)
        (Path(__file__).parent / "results" / "anomalyclip_shapes.json").write_text(json.dumps(out, indent=2) + "\n")
        if args.only == "anomalyclip":
            return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder or tmp)
        write_inspection_folder(root, n_good=args.n_test, n_bad=args.n_test)
        runs = {}
        for method, shots in (("winclip", 0), ("winclip+", 1), ("winclip+", 4)):
            res = evaluate_anomaly(bb, root, method=method, shots=shots, progress=False)
            runs[f"{method} {shots}-shot"] = res
            m = res["mean"]
            print(f"{method:8s} {shots}-shot: image AUROC {m['image_auroc']:.3f} AP {m['image_ap']:.3f}  "
                  f"pixel AUROC {m['pixel_auroc']:.3f} AUPRO {m['pixel_aupro']:.3f}")
        picture(bb, root, Path(__file__).parents[1] / "docs" / "anomaly_detection" / "maps.png")
    out = {"benchmark": "anomaly_shapes", "model": "shapes-tiny", "categories": ["_".join(c) for c in CATEGORIES],
           "n_train": 8, "n_test_good": args.n_test, "n_test_defective": args.n_test, "seed": 0,
           "aupro_protocol": "mvtec", "runs": runs}
    path = Path(__file__).parent / "results" / "anomaly_shapes.json"
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
