"""Training-free open-vocabulary segmentation on ShapesWorld dense scenes.

Every registered dense method (vanilla, MaskCLIP, SCLIP, ClearCLIP, ...) with shapes-tiny, on
256 px scenes of 3-6 objects, in three settings: one resize of the whole scene to the model
input (64 px), 64 px windows at stride 64 (4 x 4 windows) and at stride 32 (7 x 7, overlap
averaged).  Classes: background (index 0; queries "background" and the four background
kinds of ShapesWorld) and the shapes of the shapes-tiny world; templates "a photo of a
{c}." (the model's training captions are not CLIP's ImageNet prompts).  ``prob_thd`` (pixels
below it go to background) is chosen per method and setting on validation scenes (the
world's train split), never on test; mIoU as mmsegmentation computes it
(``cliplab.eval.metrics.mean_iou``) and scenes per second (with the chosen ``prob_thd``
applied to the returned probabilities, which is what ``segment(prob_thd=...)`` does).

CLIP-DINOiser (``clip-dinoiser``) needs trained heads: when it is among ``--methods`` the
script first trains them (``cliplab.dense.clip_dinoiser.train_clip_dinoiser``, shapes-tiny as
both CLIP and guide, ``--dinoiser-steps`` steps on ``--dinoiser-images`` train-split scenes after
the validation ones, fixed seed), then reports three rows: the trained heads, the heads with the
background step (``apply_found``), and pooling with the guide's own correlations (no heads, the
reference's ``DinoCLIP`` teacher).

Also the sliding-window throughput check: model-only forward (``model.visual``) on the same
number of windows, batched the same way, against ``segment`` with vanilla at stride 32.

And the weakly supervised CAM comparison (``--parts cam``): pseudo-masks from image-level
labels (the classes present in each scene's ground truth) on ``shapes:seg`` test scenes,
plain patch-text CAMs against ExCEL's training-free CAMs
(:func:`cliplab.dense.excel.cam_pseudo_masks`), with each ExCEL component added alone;
model input 128 px (the 64 px model's positional embedding interpolated; 128 was chosen over
64 on train-split scenes), template "a photo of a {c}.", background prompt "background",
default generated description bank.

Dataset: ``--dataset scenes`` (default) builds the scenes here from ShapesWorld's
object masks (:func:`shapes_scenes`); any other value is a dataset spec given to
``cliplab.data.datasets.load_dataset`` (for example ``shapes:seg``), which must return images,
class maps (``masks``) and ``classnames`` -- the only place to change is :func:`load_data`.

Usage: python benchmarks/segment_shapes.py [--n 40] [--model shapes-tiny] [--dataset scenes]
    [--methods maskclip,clip-dinoiser] [--settings "single resize"] [--parts methods,throughput,cam]
    [--out PATH] [--no-pictures]
Updates benchmarks/results/segment_shapes.json (or --out; rows of the parts run replace theirs)
and the overlay pictures in docs/segmentation/; prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.shapes import shapes_tiny_world  # noqa: E402
from cliplab.dense import DENSE_METHODS, segment  # noqa: E402
from cliplab.dense.excel import cam_pseudo_masks  # noqa: E402
from cliplab.dense.visualize import legend, overlay, palette  # noqa: E402
from cliplab.eval.metrics import mean_iou  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "segment_shapes.json"
PICTURES = ROOT / "docs" / "segmentation"
TEMPLATE = "a photo of a {c}."
BACKGROUND = ["background", "plain background", "gradient background", "striped background", "noisy background"]
SETTINGS = {"single resize": {}, "windows 64/64": {"window": 64, "stride": 64},
            "windows 64/32": {"window": 64, "stride": 32}}


def shapes_scenes(n: int, seed: int = 0, split: str = "test"):
    """ShapesWorld scenes (256 px, 3-6 objects) with class maps: 0 background, i + 1 = shape i."""
    world = shapes_tiny_world(seed=seed, image_size=256, n_objects=(3, 6))
    shapes = list(world.in_shapes)
    images, maps = [], []
    for i in range(n):
        scene = world.scene(split, i)
        target = np.zeros(scene.image.shape[:2], np.int64)
        for obj in scene.objects:
            target[obj.mask] = shapes.index(obj.shape) + 1
        images.append(scene.image)
        maps.append(target)
    return SimpleNamespace(images=images, masks=maps, classnames=["background", *shapes], ignore_index=255,
                           name=f"shapes-scenes-256 seed {seed} {split}")


def load_data(spec: str, n: int, split: str = "test"):
    """The dataset: local scenes, or a segmentation dataset spec (``shapes:seg``) after it exists."""
    if spec == "scenes":
        return shapes_scenes(n, split=split)
    from cliplab.data.datasets import load_dataset

    ds = load_dataset(spec, split, n=n)                    # SegmentationData: images are its ``items``
    return SimpleNamespace(images=list(ds.items), masks=list(ds.masks), classnames=list(ds.classnames),
                           ignore_index=ds.ignore_index, name=ds.name)


THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)

#: CAM pseudo-mask rows: plain patch-text CAMs, each ExCEL component alone, ExCEL without and with refinement.
_PLAIN = {"tse": False, "layers": 0, "surgery": False, "refine": False}
CAM_ROWS = {"plain patch-text CAM": _PLAIN, "+ SVC": {**_PLAIN, "layers": 5}, "+ TSE": {**_PLAIN, "tse": True},
            "+ surgery": {**_PLAIN, "surgery": True}, "+ refinement": {**_PLAIN, "refine": True},
            "ExCEL without refinement": {"refine": False}, "ExCEL": {}}


def cam_comparison(bb, n: int, dataset: str = "shapes:seg", size: int = 128) -> dict:
    """mIoU of pseudo-masks from image-level labels: plain patch-text CAMs vs ExCEL (and its parts)."""
    data = load_data(dataset, n)
    images = data.items if hasattr(data, "items") else data.images
    fg = list(data.classnames[1:])
    labels = [sorted({int(c) - 1 for c in np.unique(m)} - {-1, data.ignore_index - 1}) for m in data.masks]
    bg = mean_iou([np.zeros_like(m) for m in data.masks], data.masks, len(data.classnames),
                  ignore_index=data.ignore_index)
    out = {"all background (no CAM)": {"options": None, "mIoU": bg["mIoU"], "aAcc": bg["aAcc"]}}
    print(f"CAM {'all background (no CAM)':26s} mIoU {100 * bg['mIoU']:5.1f}  aAcc {100 * bg['aAcc']:5.1f}", flush=True)
    colors = palette(len(data.classnames))
    for name, kw in CAM_ROWS.items():
        t0 = time.perf_counter()
        masks = cam_pseudo_masks(bb, images, labels, fg, templates=TEMPLATE, background=["background"],
                                 size=size, **kw)
        seconds = time.perf_counter() - t0
        m = mean_iou(masks, data.masks, len(data.classnames), ignore_index=data.ignore_index)
        out[name] = {"options": kw, "mIoU": m["mIoU"], "aAcc": m["aAcc"], "scenes_per_s": len(masks) / seconds,
                     "IoU": [None if np.isnan(v) else float(v) for v in m["IoU"]]}
        print(f"CAM {name:26s} mIoU {100 * m['mIoU']:5.1f}  aAcc {100 * m['aAcc']:5.1f}  "
              f"{len(masks) / seconds:6.2f} scenes/s", flush=True)
        if name in ("plain patch-text CAM", "ExCEL"):
            stem = "plain" if name.startswith("plain") else "excel"
            for i in range(2):
                overlay(images[i], masks[i], colors).save(PICTURES / f"cam{i}_{stem}.png")
    for i in range(2):
        overlay(images[i], data.masks[i], colors).save(PICTURES / f"cam{i}_truth.png")
    legend(data.classnames, colors).save(PICTURES / "cam_legend.png")
    return {"dataset": data.name, "n": len(images), "size": size, "template": TEMPLATE,
            "background": ["background"], "classnames": list(data.classnames), "rows": out}


def threshold(probs, thd: float) -> list:
    """Class maps from probabilities (C, H, W): argmax, pixels below ``thd`` -> 0 (as ``segment(prob_thd=)``)."""
    out = []
    for p in probs:
        pred = p.argmax(0).astype(np.int32)
        pred[p.max(0) < thd] = 0
        out.append(pred)
    return out


def method_runs(methods: list, heads) -> list:
    """(row label, method name, method options) of each row; clip-dinoiser gives three rows."""
    runs = []
    for m in methods:
        if m == "clip-dinoiser":
            runs += [(m, m, {"head": heads}), (f"{m} +found", m, {"head": heads, "apply_found": True}),
                     (f"{m} guide only", m, {})]
        else:
            runs.append((m, m, {}))
    return runs


def train_dinoiser(bb, args):
    """CLIP-DINOiser heads trained on train-split scenes after the validation ones (bb guides itself)."""
    from cliplab.dense.clip_dinoiser import train_clip_dinoiser

    torch.set_num_threads(2)
    images = load_data(args.dataset, args.n_val + args.dinoiser_images, split="train").images[args.n_val:]
    t0 = time.perf_counter()
    heads = train_clip_dinoiser(bb, images=images, steps=args.dinoiser_steps, batch_size=16, lr=1e-3, seed=0)
    seconds = time.perf_counter() - t0
    torch.set_num_threads(1)
    print(f"clip-dinoiser heads: {args.dinoiser_steps} steps on {len(images)} scenes in {seconds:.0f} s", flush=True)
    return heads, seconds


def model_only_rate(bb, n_windows: int, batch_size: int) -> float:
    """Windows per second of ``model.visual`` alone on random 64 px windows, batched as ``segment`` does."""
    x = torch.randn(n_windows, 3, bb.image_size, bb.image_size)
    with torch.inference_mode():
        bb.model.visual(x[:batch_size])                                           # warm-up
        t0 = time.perf_counter()
        for s in range(0, n_windows, batch_size):
            bb.model.visual(x[s:s + batch_size])
    return n_windows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="test scenes")
    ap.add_argument("--n-val", type=int, default=16, help="validation scenes (prob_thd choice)")
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--dataset", default="scenes", help="'scenes' (built here) or a dataset spec such as shapes:seg")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--methods", default=",".join(DENSE_METHODS.names()))
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of: " + ", ".join(SETTINGS))
    ap.add_argument("--dinoiser-steps", type=int, default=300, help="CLIP-DINOiser training steps (batch 16)")
    ap.add_argument("--dinoiser-images", type=int, default=256, help="CLIP-DINOiser training scenes")
    ap.add_argument("--parts", default="methods,throughput,cam", help="comma-separated: methods, throughput, cam")
    ap.add_argument("--cam-dataset", default="shapes:seg", help="dataset of the CAM pseudo-mask comparison")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON")
    ap.add_argument("--no-pictures", action="store_true", help="write no overlay pictures")
    args = ap.parse_args()
    settings = {k: SETTINGS[k] for k in args.settings.split(",")}
    parts = set(args.parts.split(","))
    out_path = Path(args.out)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    bb = cliplab.load(args.model)
    PICTURES.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    if "cam" in parts:
        previous["cam_pseudo_masks"] = cam_comparison(bb, args.n, args.cam_dataset)
    if not parts & {"methods", "throughput"}:
        out_path.write_text(json.dumps(previous, indent=2) + "\n")
        cam = previous["cam_pseudo_masks"]["rows"]
        print(f"segment_shapes: CAM pseudo-masks mIoU plain {100 * cam['plain patch-text CAM']['mIoU']:.1f} vs "
              f"ExCEL {100 * cam['ExCEL']['mIoU']:.1f} -> {out_path}")
        return
    data = load_data(args.dataset, args.n)
    val = load_data(args.dataset, args.n_val, split="train")
    classes = [BACKGROUND, *data.classnames[1:]]
    rows, results = [], dict(previous.get("results") or {})
    everything_background = mean_iou([np.zeros_like(m) for m in data.masks], data.masks, len(data.classnames),
                                     ignore_index=data.ignore_index)
    results["baseline | all background"] = {"method": "all background", "mIoU": everything_background["mIoU"],
                                            "aAcc": everything_background["aAcc"]}
    print(f"{'baseline':10s} {'all background':14s} mIoU {100 * everything_background['mIoU']:5.1f}  "
          f"aAcc {100 * everything_background['aAcc']:5.1f}", flush=True)
    methods = args.methods.split(",") if "methods" in parts else []
    heads, dinoiser_seconds = train_dinoiser(bb, args) if "clip-dinoiser" in methods else (None, None)
    for label, method, options in method_runs(methods, heads):
        for setting, kw in settings.items():
            run = dict(method=method, templates=TEMPLATE, batch_size=args.batch_size, return_probs=True, **kw,
                       **options)
            val_probs = segment(bb, val.images, classes, **run).probs
            n_cls = len(data.classnames)
            thd = max(THRESHOLDS, key=lambda t: (mean_iou(threshold(val_probs, t), val.masks, n_cls,
                                                           ignore_index=val.ignore_index)["mIoU"], -t))
            t0 = time.perf_counter()
            res = segment(bb, data.images, classes, **run)
            seconds = time.perf_counter() - t0
            res.masks = threshold(res.probs, thd)
            m = mean_iou(res.masks, data.masks, n_cls, ignore_index=data.ignore_index)
            results[f"{label} | {setting}"] = {
                "method": label, "setting": setting, "prob_thd": thd, "mIoU": m["mIoU"], "aAcc": m["aAcc"],
                "IoU": [None if np.isnan(v) else float(v) for v in m["IoU"]],
                "scenes_per_s": len(data.images) / seconds,
                "windows": res.n_windows, "seconds": seconds}
            rows.append((label, setting, m["mIoU"], m["aAcc"], len(data.images) / seconds))
            print(f"{label:10s} {setting:14s} prob_thd {thd:.1f}  mIoU {100 * m['mIoU']:5.1f}  "
                  f"aAcc {100 * m['aAcc']:5.1f}  {len(data.images) / seconds:6.1f} scenes/s", flush=True)
            if setting == "windows 64/32" and not args.no_pictures:
                PICTURES.mkdir(parents=True, exist_ok=True)
                colors = palette(len(data.classnames))
                for i in range(2):
                    name = label.replace(" +", "_").replace(" ", "_")
                    overlay(data.images[i], res.masks[i], colors).save(PICTURES / f"scene{i}_{name}.png")
    if not args.no_pictures:
        colors = palette(len(data.classnames))
        for i in range(2):
            overlay(data.images[i], data.masks[i], colors).save(PICTURES / f"scene{i}_truth.png")
        legend(data.classnames, colors).save(PICTURES / "legend.png")

    throughput = previous.get("throughput")
    if "throughput" in parts:       # segment (vanilla, stride 32) vs model-only forward on as many windows
        t0 = time.perf_counter()
        res = segment(bb, data.images, classes, method="vanilla", templates=TEMPLATE, window=64, stride=32,
                      batch_size=args.batch_size)
        seg_rate = res.n_windows / (time.perf_counter() - t0)
        model_rate = model_only_rate(bb, res.n_windows, args.batch_size)
        throughput = {"segment_windows_per_s": seg_rate, "model_only_windows_per_s": model_rate,
                      "ratio": seg_rate / model_rate, "windows": res.n_windows}
    out = {**previous, "benchmark": "segment_shapes", "model": args.model, "dataset": data.name,
           "n": len(data.images), "templates": TEMPLATE, "background": BACKGROUND, "classnames": data.classnames,
           "torch_threads": torch.get_num_threads(), "results": results, "throughput": throughput}
    if heads is not None:
        out["clip_dinoiser_training"] = {
            "steps": args.dinoiser_steps, "images": args.dinoiser_images, "batch_size": 16, "lr": 1e-3,
            "guide": "the model itself", "seconds": dinoiser_seconds}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    best = max((r for r in results.values() if "setting" in r), key=lambda r: r["mIoU"])
    line = f"segment_shapes: best {best['method']} ({best['setting']}) mIoU {100 * best['mIoU']:.1f}"
    if throughput:
        line += (f"; windows/s segment {throughput['segment_windows_per_s']:.0f} vs model-only "
                 f"{throughput['model_only_windows_per_s']:.0f} ({100 * throughput['ratio']:.0f} %)")
    print(line + f" -> {out_path}")


if __name__ == "__main__":
    main()
