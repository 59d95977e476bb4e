"""RAVE on ShapesWorld's ``backlit`` domain: PSNR/SSIM of guided vs unguided enhancement.

The residual vector comes from the frozen ``shapes-tiny`` embeddings of unpaired ``train``
scenes (backlit: indices [0, N); well-lit: [N, 2N)); each enhancement net trains on the
backlit ones through the Trainer, guided (reconstruction warm-up, then guidance +
reconstruction, the reference's weights) or unguided (the same net, steps and data
without the guidance term), per seed.  Scored on ``test`` scenes against their well-lit
renders (the paired ground truth): mean per-image PSNR and SSIM (torchmetrics), and the
mean projection ``cos(E(I_hat), r)`` of the enhanced images next to its target ``thr``.

Usage: python benchmarks/rave_shapes.py [--steps 150] [--seeds 0,1,2] [--width 16] [--lr 1e-4]
           [--n-train 256] [--n-test 128] [--picture docs/generative/rave_shapes.png]
       python benchmarks/rave_shapes.py --quick          (seconds: a smoke run, not the table)
       python benchmarks/rave_shapes.py --probe          (seconds: no training; the projection on r
                                                          and PSNR of the input under global gains)
Writes benchmarks/results/rave_shapes.json (rave_shapes_quick.json with --quick,
rave_shapes_probe.json with --probe) and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import cliplab
from cliplab.generative.rave import enhance, image_quality, residual_vector, shapes_backlit, train_rave

RESULTS = Path(__file__).resolve().parent / "results"


def projection(bb, images: np.ndarray, r: np.ndarray) -> float:
    """Mean cos(E(image), r) of float images in [0, 1] (rounded to uint8 as written to disk)."""
    u8 = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return float((bb.encode_images(u8, progress=False).features @ r).mean())


def gain_probe(bb, test_in: np.ndarray, test_gt: np.ndarray, r: np.ndarray,
               gains=(0.5, 0.7, 1.0, 1.3, 2.0)) -> list[dict]:
    """Which way along r does plain brightening move the backlit inputs? One row per global gain."""
    rows = []
    for g in gains:
        x = np.clip(test_in / 255.0 * g, 0, 1)
        rows.append({"gain": g, "projection": projection(bb, x, r), **image_quality(x, test_gt)})
    return rows


def picture(path: Path, rows: list[tuple[str, np.ndarray]], n: int = 5) -> None:
    """Columns: one per row of ``rows`` (name, float images); rows: the first n test scenes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n, len(rows), figsize=(1.3 * len(rows), 1.3 * n))
    for j, (name, images) in enumerate(rows):
        for i in range(n):
            ax = axes[i, j]
            ax.imshow(np.clip(images[i], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=128)
    ap.add_argument("--picture", default=None, help="write a PNG of the first test scenes (seed of the first run)")
    ap.add_argument("--quick", action="store_true", help="a few steps on a few images (a smoke run)")
    ap.add_argument("--probe", action="store_true", help="only the global-gain probe (no training)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.width, args.n_train, args.n_test = 4, "0", 4, 16, 8
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]

    bb = cliplab.load("shapes-tiny")
    tic = time.perf_counter()
    backlit, _ = shapes_backlit("train", range(args.n_train))
    _, well_lit = shapes_backlit("train", range(args.n_train, 2 * args.n_train))
    res = residual_vector(bb, well_lit, backlit, progress=False)
    test_in, test_gt = shapes_backlit("test", range(args.n_test))
    rows = [{"method": "input (no enhancement)", "seed": None, **image_quality(test_in, test_gt),
             "projection": projection(bb, test_in / 255.0, res.vector)},
            {"method": "well-lit ground truth", "seed": None, "psnr": None, "ssim": None,
             "projection": projection(bb, test_gt / 255.0, res.vector)}]
    mean_pixel = {"backlit": float(test_in.mean() / 255.0), "well_lit": float(test_gt.mean() / 255.0)}
    print(f"residual: thr {res.threshold:.4f}; mean pixel backlit {mean_pixel['backlit']:.3f}, "
          f"well-lit {mean_pixel['well_lit']:.3f}")
    if args.probe:
        probe = gain_probe(bb, test_in, test_gt, res.vector)
        for r in probe:
            print(json.dumps(r))
        out_path = Path(args.out) if args.out else RESULTS / "rave_shapes_probe.json"
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"benchmark": "rave_shapes --probe", "model": "shapes-tiny",
                                        "threshold": res.threshold, "n_test": args.n_test, "n_train": args.n_train,
                                        "mean_pixel": mean_pixel, "inputs": rows, "gains": probe}, indent=2) + "\n")
        print(f"wrote {out_path}")
        return {"gains": probe}
    for r in rows:
        print(json.dumps(r))
    shown = {}
    for seed in seeds:
        for guided in (False, True):
            t0 = time.perf_counter()
            net = train_rave(bb, backlit, res, guided=guided, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, width=args.width, seed=seed, progress=False)
            out = enhance(net, test_in)
            row = {"method": "guided" if guided else "unguided", "seed": seed, **image_quality(out, test_gt),
                   "projection": projection(bb, out, res.vector), "train_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row))
            if seed == seeds[0]:
                shown[row["method"]] = out
    summary = {}
    for m in ("unguided", "guided"):
        rs = [r for r in rows if r["method"] == m]
        summary[m] = {k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
                      for k in ("psnr", "ssim", "projection")}
    result = {
        "benchmark": "rave_shapes", "model": "shapes-tiny", "domain": "backlit",
        "config": {k: getattr(args, k) for k in ("steps", "seeds", "width", "lr", "batch_size", "n_train",
                                                 "n_test", "quick")},
        "threshold": res.threshold, "mean_pixel": mean_pixel, "rows": rows, "summary": summary,
        "guided_beats_unguided_psnr": summary["guided"]["psnr"]["mean"] > summary["unguided"]["psnr"]["mean"],
        "wall_s": round(time.perf_counter() - tic, 1), "torch_threads": torch.get_num_threads(),
    }
    name = "rave_shapes_quick.json" if args.quick else "rave_shapes.json"
    out_path = Path(args.out) if args.out else RESULTS / name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    if args.picture:
        picture(Path(args.picture), [("backlit input", test_in / 255.0), ("unguided", shown["unguided"]),
                                     ("guided", shown["guided"]), ("well-lit truth", test_gt / 255.0)])
    print(f"guided PSNR {summary['guided']['psnr']['mean']:.2f} vs unguided {summary['unguided']['psnr']['mean']:.2f} "
          f"dB over seeds {seeds}; wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
