"""The ShapesWorld difficulty table: shapes-tiny on every domain, zero-shot and 16-shot.

For each domain of ``cliplab.data.shapes.DOMAINS`` (the original one first) the scenes of
``shapes:color-shape@<domain>`` (the same scenes as the original domain's, drawn with a
controlled shift) are scored three ways with the bundled shapes-tiny model:

- zero-shot, prompt ``"a photo of a {c}."``;
- 16-shot GDA and 16-shot linear probe, fit on 16 in-domain training images per class
  (seeds 0, 1, 2) through the eval harness's few-shot protocol
  (``cliplab.eval.tasks.fewshot``), each given the zero-shot text weights of the classes
  in its draw and choosing its hyper-parameters on the in-domain validation split, as in
  ``benchmarks/adapt_shapes.py``.  To fit the time on a shared 2-core machine the linear
  probe takes C from the coarse grid 1e-6 ... 1e6 on validation (``search_steps=0``; CoOp's
  eight refinement rounds skipped).

Zero-shot is measured on every domain; the few-shot columns on the default table set
(every domain except the corruptions' severities 1, 2 and 4; ``--domains all`` for all).

Tasks: ``color-shape`` (64-way; scored on test scenes of the 56 compositions that train
has, since an adapter cannot predict a class it never saw) and ``shape`` (8-way, the same
images labelled by shape).  The table also gives each domain's zero-shot drop against the
original domain and the share of that drop 16-shot GDA wins back.

It also draws the picture grids of ``docs/shapesworld.md`` (``docs/shapesworld/*.png``).

Usage: python benchmarks/shapes_difficulty.py [--domains all|a,b] [--n-train 1200] [--n-val 200]
       [--n-test 400] [--quick]
Writes benchmarks/results/shapes_difficulty.json and docs/shapesworld/difficulty.md; prints
a one-line summary.  About 15 minutes of one core for the default set.
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
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.datasets import load_dataset  # noqa: E402
from cliplab.data.shapes import ShapesWorld, shapes_tiny_world  # noqa: E402
from cliplab.data.shapes.domains import CORRUPTIONS, DOMAINS  # noqa: E402
from cliplab.eval.metrics import accuracy  # noqa: E402
from cliplab.eval.tasks import fewshot  # noqa: E402
from cliplab.features import FeatureStore, image_features  # noqa: E402
from cliplab.zeroshot import class_weights  # noqa: E402

from cliplab.adapt.fewshot import make_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "shapes_difficulty.json"
DOCS = ROOT / "docs" / "shapesworld"
TEMPLATE = "a photo of a {c}."
METHODS = {"gda": {}, "linear": {"search_steps": 0}}
SHOTS = 16
SEEDS = (0, 1, 2)


class InDomainFit:
    """An adapter inside the few-shot protocol: on the k-shot draw ``fit(X, y)`` builds
    ``method`` with the text weights of the classes in the draw and fits it with the
    validation images of those classes (its own hyper-parameter search; test never
    reaches ``fit``)."""

    def __init__(self, method, params, text, logit_scale, val):
        self.method, self.params, self.text, self.logit_scale, self.val = method, params, text, logit_scale, val

    def fit(self, X, y):
        present = np.unique(y)
        xv, yv = self.val
        on = np.isin(yv, present)
        self.est_ = make_adapter(self.method, text_weights=self.text[present], logit_scale=self.logit_scale,
                                 **self.params)
        self.est_.fit(X, y, X_val=xv[on], y_val=yv[on])
        return self

    def predict(self, X):
        return self.est_.predict(X)


def split_features(store, spec: str, split: str, n: int):
    """Features (N, D), colour-shape labels (N,) and class names of ``n`` scenes."""
    data = load_dataset(spec, split, n=n, seed=0)
    x, kept, skipped = image_features(store.backbone, data.items, store=store)
    assert not skipped and len(kept) == len(data.items)
    return x, np.asarray(data.labels), list(data.classnames)


def evaluate_domain(store, domain: str, sizes: dict, seeds, few_shot: bool = True) -> list[dict]:
    """Zero-shot and (``few_shot``) 16-shot rows of both tasks on one domain."""
    bb = store.backbone
    spec = "shapes:color-shape" + ("" if domain == "original" else f"@{domain}")
    xs, ys, classnames = split_features(store, spec, "test", sizes["test"])
    if few_shot:
        xt, yt, _ = split_features(store, spec, "train", sizes["train"])
        xv, yv, _ = split_features(store, spec, "val", sizes["val"])
    else:
        xt = yt = xv = yv = np.zeros(0, np.int64)
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
        for method, params in METHODS.items():
            if not few_shot:
                row[method] = row[f"{method}_std"] = None
                continue
            res = fewshot(lambda: InDomainFit(method, params, text, bb.logit_scale, val), train, val, test,
                          ks=(SHOTS,), seeds=seeds, method=method, classnames=names, dataset=spec)
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
        r["gda_recovered"] = (r["gda"] - r["zeroshot"]) / drop if drop > 0 and r["gda"] is not None else None


def markdown(rows: list[dict], all_rows: bool = False) -> str:
    """The table: one line per domain, both tasks side by side (accuracy in %); the domains
    measured zero-shot only are left out unless ``all_rows``."""
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
        if cs["gda"] is None and not all_rows:
            continue
        lines.append(
            f"| {d} | {cs['family']} | {pct(cs['zeroshot'])} | {pct(cs['zeroshot_drop'])} "
            f"| {pct(cs['gda'], cs['gda_std'])} | {pct(cs['linear'], cs['linear_std'])} "
            f"| {'' if rec is None or cs['zeroshot_drop'] < 0.05 else f'{100 * rec:.0f} %'} "
            f"| {pct(sh['zeroshot'])} | {pct(sh['zeroshot_drop'])} | {pct(sh['gda'], sh['gda_std'])} "
            f"| {pct(sh['linear'], sh['linear_std'])} |")
    return "\n".join(lines) + "\n"


def markdown_zero_shot(rows: list[dict]) -> str:
    """Zero-shot accuracy (%) of every corruption at each severity: one line per kind."""
    zs = {(r["domain"], r["task"]): r["zeroshot"] for r in rows}
    head = "| corruption | task | " + " | ".join(f"severity {s}" for s in range(1, 6)) + " |"
    lines = [head, "|" + "---|" * 7]
    for kind in CORRUPTIONS:
        for task in ("color-shape", "shape"):
            cells = [zs.get((f"{kind}-{s}", task)) for s in range(1, 6)]
            lines.append(f"| {kind} | {task} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in cells)
                         + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- grids


def grids(out: Path, n: int = 6) -> list[Path]:
    """One PNG per domain: ``n`` original scenes above, the same in the domain below;
    corruptions: one PNG per kind, 4 scenes at severities 1-5 as rows."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    base = ShapesWorld(seed=0, n_objects=(1, 3))

    def row(world, n=n):
        return np.concatenate([world.scene("test", i).image for i in range(n)], 1)  # (S, n S, 3)

    def save(name, rows):
        img = np.concatenate(rows, 0)
        path = out / f"{name}.png"
        Image.fromarray(img).save(path, optimize=True)
        return path

    paths = [save("original", [row(base)])]
    for d in DOMAINS.names():
        if DOMAINS.meta(d)["family"] not in ("original", "corruption"):
            paths.append(save(d, [row(base), row(base.replace(domain=d))]))
    for kind in CORRUPTIONS:
        paths.append(save(kind, [row(base.replace(domain=f"{kind}-{s}"), 4) for s in range(1, 6)]))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", help="few-shot domains, comma-separated, or 'all' (default: all but the "
                                      "corruption severities 1, 2, 4; 'original' is always added)")
    ap.add_argument("--n-train", type=int, default=1200)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="5 domains, one seed, small splits (a smoke run)")
    ap.add_argument("--no-grids", action="store_true", help="skip the picture grids")
    ap.add_argument("--out", help=f"results JSON (default: {RESULTS.relative_to(ROOT)}; --quick: temporary)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="shapes_difficulty_"))
    table_set = [d for d in DOMAINS.names() if DOMAINS.meta(d)["family"] != "corruption" or d[-1] in "35"]
    domains = (DOMAINS.names() if args.domains == "all" else args.domains.split(",") if args.domains else
               ["outline", "color-cast", "noise-5", "blur-5"] if args.quick else table_set)
    domains = ["original"] + [d for d in domains if d != "original"]
    zero_shot_only = ["blur-1"] if args.quick else [d for d in DOMAINS.names() if d not in domains]
    sizes = ({"train": 400, "val": 100, "test": 200} if args.quick
             else {"train": args.n_train, "val": args.n_val, "test": args.n_test})
    seeds = (0,) if args.quick else SEEDS
    out = Path(args.out or (scratch / "shapes_difficulty.json" if args.quick else RESULTS))
    docs = scratch if args.quick else DOCS

    t0 = time.perf_counter()
    bb = cliplab.load("shapes-tiny")
    store = FeatureStore(scratch / "cache", bb)
    rows = []
    for d in domains + zero_shot_only:
        t = time.perf_counter()
        rows += evaluate_domain(store, d, sizes, seeds, few_shot=d in domains)
        cs = rows[-2]
        few = f", gda {cs['gda']:.3f}, linear {cs['linear']:.3f}" if d in domains else ""
        print(f"  {d}: color-shape zero-shot {cs['zeroshot']:.3f}{few}; shape zero-shot {rows[-1]['zeroshot']:.3f} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    add_drops(rows)
    table = markdown(rows)
    zs_table = markdown_zero_shot(rows)
    cs = [r for r in rows if r["task"] == "color-shape" and r["domain"] != "original"]
    big = [r["domain"] for r in cs if r["zeroshot_drop"] >= 0.20]
    recovered = [r["domain"] for r in cs if r["zeroshot_drop"] >= 0.20 and (r["gda_recovered"] or 0) >= 0.5]
    result = {
        "benchmark": "shapes_difficulty",
        "model": "shapes-tiny",
        "template": TEMPLATE,
        "shots": SHOTS,
        "seeds": list(seeds),
        "sizes": sizes,
        "few_shot_domains": domains,
        "linear_probe": "C from the coarse grid on the in-domain val split (search_steps=0)",
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
    (docs / "difficulty.md").write_text(table + "\n" + zs_table)
    if not args.no_grids:
        grids(docs)
    print(table + "\n" + zs_table, file=sys.stderr)
    print(f"shapes_difficulty: {len(domains)} domains with few-shot, {len(zero_shot_only)} zero-shot only, in "
          f"{result['wall_s']:.0f} s; zero-shot colour-shape drops "
          f">= 20 points on {len(big)} ({', '.join(big)}); 16-shot GDA wins back half of it on {len(recovered)} "
          f"({', '.join(recovered)}); results {out}")


if __name__ == "__main__":
    main()
