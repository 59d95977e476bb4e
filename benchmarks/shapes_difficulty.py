"""The ShapesWorld difficulty table: shapes-tiny on every domain, zero-shot and 16-shot.

For each domain of ``cliplab.data.shapes.DOMAINS`` (the original one first) the scenes of
``shapes:color-shape@<domain>`` (the same scenes as the original domain's, drawn with a
controlled shift) are scored three ways with the bundled shapes-tiny model:

- zero-shot, prompt ``"a photo of a {c}."``;
- 16-shot GDA and 16-shot linear probe, fit on 16 in-domain training images per class
  (seeds 0, 1, 2) through the eval harness's few-shot protocol
  (``cliplab.eval.tasks.fewshot``), hyper-parameters chosen on the in-domain validation
  split, exactly as ``benchmarks/adapt_shapes.py`` does (its ``ValFit``).

Tasks: ``color-shape`` (64-way; scored on test scenes of the 56 compositions that train
has, since an adapter cannot predict a class it never saw) and ``shape`` (8-way, the same
images labelled by shape).  The table also gives each domain's zero-shot drop against the
original domain and the share of that drop 16-shot GDA wins back.

It also draws the picture grids of ``docs/shapesworld.md`` (``docs/shapesworld/*.png``).

Usage: python benchmarks/shapes_difficulty.py [--domains a,b] [--n-train 1200] [--n-val 200]
       [--n-test 500] [--quick]
Writes benchmarks/results/shapes_difficulty.json and docs/shapesworld/difficulty.md; prints
a one-line summary.  About 10 minutes on one thread for all 41 domains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.datasets import load_dataset  # noqa: E402
from cliplab.data.shapes import ShapesWorld, shapes_tiny_world  # noqa: E402
from cliplab.data.shapes.domains import CORRUPTIONS, DOMAINS  # noqa: E402
from cliplab.eval.metrics import accuracy  # noqa: E402
from cliplab.eval.tasks import fewshot  # noqa: E402
from cliplab.features import FeatureStore, image_features  # noqa: E402
from cliplab.zeroshot import class_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_shapes import TEMPLATE, ValFit  # noqa: E402  the adapter-in-protocol wrapper of that benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "shapes_difficulty.json"
DOCS = ROOT / "docs" / "shapesworld"
METHODS = ("gda", "linear")
SHOTS = 16
SEEDS = (0, 1, 2)


def split_features(store, spec: str, split: str, n: int):
    """Features (N, D), colour-shape labels (N,) and class names of ``n`` scenes."""
    data = load_dataset(spec, split, n=n, seed=0)
    x, kept, skipped = image_features(store.backbone, data.items, store=store)
    assert not skipped and len(kept) == len(data.items)
    return x, np.asarray(data.labels), list(data.classnames)


def evaluate_domain(store, domain: str, sizes: dict, seeds) -> list[dict]:
    """Zero-shot and few-shot rows of both tasks on one domain."""
    bb = store.backbone
    spec = "shapes:color-shape" + ("" if domain == "original" else f"@{domain}")
    xt, yt, classnames = split_features(store, spec, "train", sizes["train"])
    xv, yv, _ = split_features(store, spec, "val", sizes["val"])
    xs, ys, _ = split_features(store, spec, "test", sizes["test"])
    heldout = {f"{c} {s}" for c, s in shapes_tiny_world(0).heldout}
    seen = np.asarray([classnames[c] not in heldout for c in ys])
    shapes = sorted({c.split(" ", 1)[1] for c in classnames}, key=[c.split(" ", 1)[1] for c in classnames].index)
    to_shape = np.asarray([shapes.index(c.split(" ", 1)[1]) for c in classnames])
    tasks = {
        "color-shape": (classnames, (xt, yt), (xv, yv), (xs[seen], ys[seen])),
        "shape": (shapes, (xt, to_shape[yt]), (xv, to_shape[yv]), (xs, to_shape[ys])),
    }
    rows = []
    for task, (names, train, val, test) in tasks.items():
        text = class_weights(bb, names, [TEMPLATE])  # (C, D)
        row = {"domain": domain, "family": DOMAINS.meta(domain)["family"], "task": task,
               "n_test": int(len(test[1])),
               "zeroshot": accuracy((test[0] @ text.T).argmax(1), test[1])}
        for method in METHODS:
            res = fewshot(lambda: ValFit(method, text, bb.logit_scale, val), train, val, test, ks=(SHOTS,),
                          seeds=seeds, method=method, classnames=names, dataset=spec)
            curve = res.details["fewshot"][0]
            row[method] = res.metrics[f"acc1@{SHOTS}shot"]
            row[f"{method}_std"] = float(curve["std"][0])  # over the seeds
        rows.append(row)
    return rows


def add_drops(rows: list[dict]) -> None:
    """Drop of zero-shot against the original domain, and the share GDA wins back."""
    base = {r["task"]: r["zeroshot"] for r in rows if r["domain"] == "original"}
    for r in rows:
        drop = base[r["task"]] - r["zeroshot"]
        r["zeroshot_drop"] = drop
        r["gda_recovered"] = (r["gda"] - r["zeroshot"]) / drop if drop > 0 else None


def markdown(rows: list[dict]) -> str:
    """The table: one line per domain, both tasks side by side (accuracy in %)."""
    by = {(r["domain"], r["task"]): r for r in rows}
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    head = ("| domain | family | color-shape zero-shot | drop | 16-shot GDA | 16-shot linear | GDA recovers "
            "| shape zero-shot | drop | 16-shot GDA | 16-shot linear |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def pct(v, std=None):
        return "" if v is None else f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")

    for d in domains:
        cs, sh = by[(d, "color-shape")], by[(d, "shape")]
        rec = cs["gda_recovered"]
        lines.append(
            f"| {d} | {cs['family']} | {pct(cs['zeroshot'])} | {pct(cs['zeroshot_drop'])} "
            f"| {pct(cs['gda'], cs['gda_std'])} | {pct(cs['linear'], cs['linear_std'])} "
            f"| {'' if rec is None or cs['zeroshot_drop'] < 0.05 else f'{100 * rec:.0f} %'} "
            f"| {pct(sh['zeroshot'])} | {pct(sh['zeroshot_drop'])} | {pct(sh['gda'], sh['gda_std'])} "
            f"| {pct(sh['linear'], sh['linear_std'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- grids


def grids(out: Path, n: int = 6) -> list[Path]:
    """One PNG per domain family member: the original scenes above, the domain's below;
    corruptions: one PNG per kind, severities 1-5 as rows."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    base = ShapesWorld(seed=0, n_objects=(1, 3))

    def row(world):
        return np.concatenate([world.scene("test", i).image for i in range(n)], 1)  # (S, n S, 3)

    def save(name, rows):
        img = np.concatenate(rows, 0)
        path = out / f"{name}.png"
        Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(path, optimize=True)
        return path

    paths = [save("original", [row(base)])]
    for d in DOMAINS.names():
        if DOMAINS.meta(d)["family"] not in ("original", "corruption"):
            paths.append(save(d, [row(base), row(base.replace(domain=d))]))
    for kind in CORRUPTIONS:
        paths.append(save(kind, [row(base.replace(domain=f"{kind}-{s}")) for s in range(1, 6)]))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", help="comma-separated domains (default: all; 'original' is always added)")
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--quick", action="store_true", help="5 domains, one seed, small splits (a smoke run)")
    ap.add_argument("--no-grids", action="store_true", help="skip the picture grids")
    ap.add_argument("--out", help=f"results JSON (default: {RESULTS.relative_to(ROOT)}; --quick: temporary)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="shapes_difficulty_"))
    domains = (args.domains.split(",") if args.domains else
               ["outline", "color-cast", "noise-5", "blur-5"] if args.quick else DOMAINS.names())
    domains = ["original"] + [d for d in domains if d != "original"]
    sizes = ({"train": 400, "val": 100, "test": 200} if args.quick
             else {"train": args.n_train, "val": args.n_val, "test": args.n_test})
    seeds = (0,) if args.quick else SEEDS
    out = Path(args.out or (scratch / "shapes_difficulty.json" if args.quick else RESULTS))
    docs = scratch if args.quick else DOCS

    t0 = time.perf_counter()
    bb = cliplab.load("shapes-tiny")
    store = FeatureStore(scratch / "cache", bb)
    rows = []
    for d in domains:
        t = time.perf_counter()
        rows += evaluate_domain(store, d, sizes, seeds)
        cs = rows[-2]
        print(f"  {d}: color-shape zero-shot {cs['zeroshot']:.3f}, gda {cs['gda']:.3f}, linear {cs['linear']:.3f}; "
              f"shape zero-shot {rows[-1]['zeroshot']:.3f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    add_drops(rows)
    table = markdown(rows)
    cs = [r for r in rows if r["task"] == "color-shape" and r["domain"] != "original"]
    big = [r["domain"] for r in cs if r["zeroshot_drop"] >= 0.20]
    recovered = [r["domain"] for r in cs if r["zeroshot_drop"] >= 0.20 and r["gda_recovered"] >= 0.5]
    result = {
        "benchmark": "shapes_difficulty",
        "model": "shapes-tiny",
        "template": TEMPLATE,
        "shots": SHOTS,
        "seeds": list(seeds),
        "sizes": sizes,
        "protocol": "cliplab.eval.tasks.fewshot; hyper-parameters on the in-domain val split",
        "color_shape_test": "test scenes of compositions seen in train (held-out compositions left out)",
        "targets": {"domains_zeroshot_drop_ge_20_points": big,
                    "of_those_gda_recovers_half": recovered},
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": 1,
        "python": platform.python_version(),
        "cpus_visible": os.cpu_count(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "difficulty.md").write_text(table)
    if not args.no_grids:
        grids(docs)
    print(table, file=sys.stderr)
    print(f"shapes_difficulty: {len(domains)} domains in {result['wall_s']:.0f} s; zero-shot colour-shape drops "
          f">= 20 points on {len(big)} ({', '.join(big)}); 16-shot GDA wins back half of it on {len(recovered)} "
          f"({', '.join(recovered)}); results {out}")


if __name__ == "__main__":
    main()
