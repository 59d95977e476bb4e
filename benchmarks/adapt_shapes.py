"""Few-shot adapters and zero-shot variants compared on ShapesWorld.

Part 1, few-shot (every training-free adapter of ``cliplab.adapt.METHODS`` x shots 1, 2, 4, 8, 16 x seeds
0, 1, 2), through the eval harness's few-shot protocol (``cliplab.eval.tasks.fewshot``):

- ``shapes:color-shape``: 64-way colour x shape; train and val never show the 8 held-out
  compositions, test does (about 1/8 of it).  An adapter can only predict the classes it
  saw, so on held-out test images it is wrong by construction; zero-shot is not.
- ``shapes:color-shape seen-compositions``: the same, test images of trained compositions only.
- ``shapes:color-shape noisy``: the same task on the noisy-background scenes only (train,
  val and test filtered to ``background == "noise"``): a shifted domain.

Each adapter gets the zero-shot text weights ("a photo of a {c}.") of the classes of its
k-shot draw and chooses its hyper-parameters on the validation split (never on test).

Part 2, spurious correlation (8-way shape): ShapesWorld with ``spurious=0.9`` (the
background follows the shape 90 % of the time, ``SPURIOUS_BACKGROUND``) against test
scenes where the correlation is broken (``spurious=0``).  Plain zero-shot, classification
by description (mean and GRAIN-style), and PerceptionCLIP (z = background kind, T chosen
on the spurious validation split).  Accuracy and worst-group accuracy over the 32
(shape, background) groups.  Also every adapter fit on 16 shots of the spurious=0.9
train split (validation: spurious=0.9), scored on the broken test (mean over 3 seeds).

Usage: python benchmarks/adapt_shapes.py [--model shapes-tiny] [--cache DIR] [--quick]
Writes benchmarks/results/adapt_shapes.json (cliplab results records) and a report in
docs/adapt_shapes/; prints a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import cliplab  # noqa: E402
from cliplab.adapt import list_methods  # noqa: E402
from cliplab.adapt.fewshot import make_adapter  # noqa: E402
from cliplab.data.datasets import ClassificationData, fewshot_subset  # noqa: E402
from cliplab.eval.metrics import accuracy, worst_group_accuracy  # noqa: E402
from cliplab.eval.report import build_report  # noqa: E402
from cliplab.eval.results import make_result, write_results  # noqa: E402
from cliplab.eval.tasks import TaskResult, fewshot  # noqa: E402
from cliplab.features import image_features  # noqa: E402
from cliplab.features import FeatureStore  # noqa: E402
from cliplab.data.shapes import shapes_tiny_world  # noqa: E402
from cliplab.zeroshot import ZeroShotClassifier, class_weights  # noqa: E402
from cliplab.zeroshot.descriptions import DescriptionClassifier  # noqa: E402
from cliplab.zeroshot.perception import SHAPES_BACKGROUNDS, PerceptionCLIP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "adapt_shapes.json"
REPORT = ROOT / "docs" / "adapt_shapes"
TEMPLATE = "a photo of a {c}."
TEMPERATURES = (1.0, 3.0, 5.0, 10.0)


# ----------------------------------------------------------------------------- data
def scenes(world, split: str, n: int, keep=lambda s: True):
    """The first ``n`` scenes of ``split`` that ``keep`` accepts: (images, scenes)."""
    world = world.replace(split_sizes={split: max(world.split_sizes[split], 40 * n)})
    images, out, i = [], [], 0
    while len(out) < n and i < world.split_sizes[split]:
        s = world.scene(split, i)
        if keep(s):
            images.append(s.image)
            out.append(s)
        i += 1
    return images, out


def features(store, images) -> np.ndarray:
    x, kept, skipped = image_features(store.backbone, images, store=store)
    assert not skipped and len(kept) == len(images)
    return x


# ------------------------------------------------------------------------ few-shot
class ValFit:
    """Adapter inside the few-shot protocol: passes the validation split to ``fit``.

    The protocol calls ``fit(X, y)`` on the k-shot draw; this gives the adapter the text
    weights of the classes in the draw and the validation images of those classes (the
    adapter's own hyper-parameter search runs on them; test never reaches ``fit``).
    """

    def __init__(self, method, text, logit_scale, val, captions=None):
        self.method, self.text, self.logit_scale, self.val, self.captions = method, text, logit_scale, val, captions

    def fit(self, X, y):
        present = np.unique(y)
        xv, yv = self.val
        on = np.isin(yv, present)
        self.est_ = make_adapter(self.method, text_weights=self.text[present], logit_scale=self.logit_scale)
        extra = {}
        if "captions_X" in self.est_.fit_inputs:   # caption feature of each training row, looked up by its bytes
            extra["captions_X"] = np.stack([self.captions[row.tobytes()] for row in X])
        self.est_.fit(X, y, X_val=xv[on], y_val=yv[on], **extra)
        return self

    def predict(self, X):
        return self.est_.predict(X)


def caption_lookup(store, x, scene_list) -> dict:
    """Image-feature bytes -> mean caption feature (unit norm), for CapS."""
    caps = [s.captions for s in scene_list]
    emb = store.text_features([c for cs in caps for c in cs])
    out, k = {}, 0
    for row, cs in zip(x, caps):
        m = emb[k:k + len(cs)].mean(0)
        out[row.tobytes()] = (m / np.linalg.norm(m)).astype(np.float32)
        k += len(cs)
    return out


def fewshot_dataset(store, name, train, val, test, classnames, ks, seeds, model_spec):
    """Zero-shot record + one few-shot record (all methods) for one dataset."""
    bb = store.backbone
    (xt, yt, st), (xv, yv), (xs, ys) = train, val, test
    text = class_weights(bb, classnames, [TEMPLATE])                                # (C, D)
    zs_pred = (xs @ text.T).argmax(1)
    zs = TaskResult("zeroshot_classification", name,
                    {"acc1": accuracy(zs_pred, ys)}, {"templates": [TEMPLATE], "n": int(len(ys))})
    captions = caption_lookup(store, xt, st)
    curves, metrics, timings = [], {}, {}
    for method in list_methods("adapter"):
        t0 = time.perf_counter()
        res = fewshot(lambda: ValFit(method, text, bb.logit_scale, (xv, yv), captions), (xt, yt), (xv, yv),
                      (xs, ys), ks=ks, seeds=seeds, method=method, classnames=classnames, dataset=name)
        timings[method] = round(time.perf_counter() - t0, 3)
        curves += res.details["fewshot"]
        metrics.update({f"{method} {k}": v for k, v in res.metrics.items()})
        print(f"  {name} {method}: " + " ".join(f"{v:.3f}" for v in res.metrics.values())
              + f" ({timings[method]:.1f}s)", file=sys.stderr)
    seen = float(np.isin(ys, np.unique(yt)).mean())
    fs = TaskResult("fewshot", name, metrics, {"fewshot": curves, "seeds": list(seeds), "n_val": int(len(yv)),
                                               "n_test": int(len(ys)), "test_fraction_of_trained_classes": seen},
                    timings)
    return [make_result(zs, model_spec=model_spec, fingerprint=bb.fingerprint),
            make_result(fs, model_spec=model_spec, fingerprint=bb.fingerprint, seeds=seeds)]


def color_shape_split(world, split, n, keep=lambda s: True):
    from cliplab.data.shapes import COLORS

    shapes = world.shapes_of("test")
    pairs = [(c, s) for c in COLORS for s in shapes]
    images, sc = scenes(world, split, n, keep)
    y = np.asarray([pairs.index((s.objects[0].color, s.objects[0].shape)) for s in sc])
    return images, y, sc, [f"{c} {s}" for c, s in pairs]


# ------------------------------------------------------------------------ spurious
def spurious_part(store, n_train, n_val, n_test, model_spec, shots=16, seeds=(0, 1, 2)):
    bb = store.backbone
    base = shapes_tiny_world(0)
    shapes = list(base.shapes_of("test"))
    corr = base.replace(spurious=0.9)

    def split(world, name, n, with_scenes=False):
        images, sc = scenes(world, name, n)
        y = np.asarray([shapes.index(s.objects[0].shape) for s in sc])
        groups = np.asarray([[s.objects[0].shape, s.background] for s in sc])
        return (features(store, images), y, groups) + ((sc,) if with_scenes else ())

    xv, yv, _ = split(corr, "val", n_val)                       # spurious validation: chooses T
    xt, yt, _, st = split(corr, "train", n_train, with_scenes=True)
    sets = {"shapes:shape spurious=0.9": split(corr, "test", n_test),
            "shapes:shape spurious=0 (broken)": split(base, "test", n_test)}
    best_t = max(TEMPERATURES, key=lambda t: accuracy(
        PerceptionCLIP(bb, shapes, SHAPES_BACKGROUNDS, "a photo of a {c}", temperature=t, sep=" ").predict(xv),
        np.asarray(shapes)[yv]))
    methods = {
        "zero-shot": ZeroShotClassifier(bb, shapes, TEMPLATE),
        "description": DescriptionClassifier(bb, "shapes", classnames=shapes),
        "description-grain": DescriptionClassifier(bb, "shapes", classnames=shapes, mode="grain"),
        "perceptionclip": PerceptionCLIP(bb, shapes, SHAPES_BACKGROUNDS, "a photo of a {c}",
                                         temperature=best_t, sep=" "),
    }
    records = []
    for name, (x, y, groups) in sets.items():
        metrics = {}
        for m, clf in methods.items():
            pred = np.asarray([shapes.index(p) for p in clf.predict(x)])
            metrics[f"{m} acc1"] = accuracy(pred, y)
            metrics[f"{m} worst_group_acc"] = worst_group_accuracy(pred, y, groups)
        res = TaskResult("zeroshot_variants", name, metrics,
                         {"n": int(len(y)), "groups": "(shape, background)", "n_groups": int(len({tuple(g) for g in groups})),
                          "perceptionclip_temperature": best_t, "perceptionclip_T_grid": list(TEMPERATURES),
                          "templates": [TEMPLATE]})
        records.append(make_result(res, model_spec=model_spec, fingerprint=bb.fingerprint))
        print(f"  {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()), file=sys.stderr)
    # adapters fit on k-shot spurious=0.9 data (val: spurious), scored where the correlation is broken
    x, y, groups = sets["shapes:shape spurious=0 (broken)"]
    text = class_weights(bb, shapes, [TEMPLATE])
    captions = caption_lookup(store, xt, st)
    pool = ClassificationData(list(range(len(yt))), yt, shapes, "spurious train")
    metrics = {}
    for method in list_methods("adapter"):
        acc, wga = [], []
        for seed in seeds:
            idx = np.asarray(fewshot_subset(pool, shots, seed).items, dtype=np.int64)
            est = ValFit(method, text, bb.logit_scale, (xv, yv), captions).fit(xt[idx], yt[idx])
            pred = est.predict(x)
            acc.append(accuracy(pred, y))
            wga.append(worst_group_accuracy(pred, y, groups))
        metrics[f"{method} acc1@{shots}shot"] = float(np.mean(acc))
        metrics[f"{method} worst_group_acc@{shots}shot"] = float(np.mean(wga))
    res = TaskResult("fewshot_spurious", "shapes:shape spurious=0 (broken)", metrics,
                     {"train": "spurious=0.9", "val": "spurious=0.9", "shots": shots, "seeds": list(seeds),
                      "n_test": int(len(y)), "groups": "(shape, background)"})
    records.append(make_result(res, model_spec=model_spec, fingerprint=bb.fingerprint, seeds=seeds))
    print("  adapters on the broken test: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()),
          file=sys.stderr)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--cache", help="feature cache folder (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="small sizes, shots 1,4, one seed (a smoke run)")
    ap.add_argument("--out", help=f"results JSON (default: {RESULTS.relative_to(ROOT)}; --quick: a temporary file)")
    ap.add_argument("--report", help=f"report folder (default: {REPORT.relative_to(ROOT)}; --quick: temporary)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="adapt_shapes_"))
    args.out = args.out or str(scratch / "adapt_shapes.json" if args.quick else RESULTS)
    args.report = args.report or str(scratch / "report" if args.quick else REPORT)
    t0 = time.perf_counter()
    bb = cliplab.load(args.model)
    q = args.quick
    ks, seeds = ((1, 4), (0,)) if q else ((1, 2, 4, 8, 16), (0, 1, 2))
    n_train, n_val, n_test = (300, 200, 200) if q else (2000, 1000, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(args.cache or Path(tmp) / "cache", bb)
        world = shapes_tiny_world(0)
        records = []
        noisy = lambda s: s.background == "noise"  # noqa: E731
        seen = lambda s: (s.objects[0].color, s.objects[0].shape) not in set(world.heldout)  # noqa: E731
        for name, keep, test_keep in (("shapes:color-shape", None, None),
                                      ("shapes:color-shape seen-compositions", None, seen),
                                      ("shapes:color-shape noisy", noisy, noisy)):
            keep = keep or (lambda s: True)
            n_tr, n_v = (n_train, n_val) if keep is not noisy else (n_train // 2, n_val // 2)
            it, yt, st, classnames = color_shape_split(world, "train", n_tr, keep)
            iv, yv, _, _ = color_shape_split(world, "val", n_v, keep)
            is_, ys, _, _ = color_shape_split(world, "test", n_test, test_keep or keep)
            print(f"{name}: train {len(yt)}, val {len(yv)}, test {len(ys)}", file=sys.stderr)
            records += fewshot_dataset(store, name, (features(store, it), yt, st), (features(store, iv), yv),
                                       (features(store, is_), ys), classnames, ks, seeds, args.model)
        records += spurious_part(store, n_train // 2, n_val // 2, 2 * n_test if not q else n_test, args.model,
                                 shots=ks[-1], seeds=seeds)
    write_results(args.out, records)
    paths = build_report(records, args.report, title="Few-shot adapters and zero-shot variants on ShapesWorld")
    wall = time.perf_counter() - t0
    fs = [r for r in records if r["task"] == "fewshot"][0]["metrics"]
    best = max((k for k in fs if k.endswith("16shot") or k.endswith(f"{ks[-1]}shot")), key=fs.get)
    print(f"adapt_shapes: {len(records)} records in {wall:.0f} s; best on shapes:color-shape at "
          f"{ks[-1]} shots: {best} = {fs[best]:.3f}; results {args.out}; report {paths['html']}")


if __name__ == "__main__":
    main()
