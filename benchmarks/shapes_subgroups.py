"""Subgroups and shortcuts on ShapesWorld: zero-shot worst-group accuracy, a shortcut test, attribute probes.

Task ``shapes:spurious`` (:mod:`cliplab.data.shapes.subgroups`): circle vs hexagon; a
"site" (scanner-like rendering: background family, colour cast, contrast, sensor noise)
aligned with the label in 90 % of train/val scenes and 10 % of test scenes; a
protected-like attribute (solid or striped fill) aligned 70 % / 30 %.

1. Zero-shot (``cliplab.eval.tasks.zeroshot_classification`` for top-1, the same class
   weights for per-image predictions; template ``"a photo of a {c}."``): average
   accuracy, accuracy per (label, site) and (label, protected) group, worst-group
   accuracy, on the shifted test split (site 10 %) and on a balanced one (both
   correlations 0.5).
2. Shortcut test: a linear probe (``cliplab.adapt.linear.LinearProbe``, C chosen on the
   validation split of the same distribution) fit on the correlated train split (site
   90 %) and on a train split without correlation (0.5), scored on the shifted test.
3. Attribute probes: linear probes that read the site and the protected attribute from
   the image features (train on train, score on test).

Usage: python benchmarks/shapes_subgroups.py [--model shapes-tiny] [--n-train 1000] [--n-test 1000] [--out FILE]
Writes benchmarks/results/shapes_subgroups.json (cliplab results records) and prints a
one-line summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.adapt.linear import LinearProbe  # noqa: E402
from cliplab.data.shapes import shapes_tiny_world  # noqa: E402
from cliplab.data.shapes.subgroups import PROTECTED, SITES, spurious_data  # noqa: E402
from cliplab.eval.metrics import accuracy, group_accuracies, worst_group_accuracy  # noqa: E402
from cliplab.eval.results import make_result, write_results  # noqa: E402
from cliplab.eval.tasks import TaskResult, zeroshot_classification  # noqa: E402
from cliplab.features import image_features  # noqa: E402
from cliplab.zeroshot import class_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "shapes_subgroups.json"
TEMPLATE = "a photo of a {c}."


def features(bb, data) -> np.ndarray:
    x, kept, skipped = image_features(bb, data.items, progress=False)
    if skipped or len(kept) != len(data.items):
        raise RuntimeError(f"{data.name}: {len(skipped)} images could not be encoded")
    return x


def group_metrics(prefix: str, pred, data) -> dict:
    """Average, worst-group and per-group accuracy over (label, site) and (label, protected)."""
    y = data.labels
    per = data.attributes
    site, prot = np.asarray(per["site"]), np.asarray(per["protected"])
    classes, sites = data.classnames, list(SITES)
    out = {f"{prefix} acc": accuracy(pred, y)}
    for name, attr, values in (("site", site, sites), ("protected", prot, PROTECTED)):
        groups = np.c_[y, attr]
        out[f"{prefix} worst_group_acc ({name})"] = worst_group_accuracy(pred, y, groups)
        for (c, v), acc in sorted(group_accuracies(pred, y, groups).items()):
            out[f"{prefix} acc[{classes[c]}/{values[v]}]"] = acc
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="ShapesWorld seed")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()
    bb = cliplab.load(args.model)
    world = shapes_tiny_world(args.seed)
    n_tr, n_te = args.n_train, args.n_test
    sets = {
        "train": spurious_data(world, "train", n_tr),
        "val": spurious_data(world, "val", n_tr // 2),
        "train (no correlation)": spurious_data(world, "train", n_tr, site_correlation_train=0.5,
                                                protected_correlation_train=0.5),
        "val (no correlation)": spurious_data(world, "val", n_tr // 2, site_correlation_train=0.5,
                                              protected_correlation_train=0.5),
        "test": spurious_data(world, "test", n_te),
        "test (balanced)": spurious_data(world, "test", n_te, site_correlation_test=0.5,
                                         protected_correlation_test=0.5),
    }
    feats = {k: features(bb, d) for k, d in sets.items()}
    classes = sets["test"].classnames
    w = class_weights(bb, classes, [TEMPLATE])                                  # (C, D)
    records = []
    summary = {}

    # 1. zero-shot
    for key in ("test", "test (balanced)", "train"):
        data = sets[key]
        res = zeroshot_classification(bb, data, templates=[TEMPLATE], progress=False)
        pred = (feats[key] @ w.T).argmax(1)
        metrics = {"acc1": res.metrics["acc1"], **group_metrics("zero-shot", pred, data)}
        assert abs(metrics["acc1"] - metrics["zero-shot acc"]) < 1e-6
        site = np.asarray(data.attributes["site"])
        sizes = {f"{classes[c]}/{list(SITES)[v]}": int(np.sum((data.labels == c) & (site == v)))
                 for c in range(len(classes)) for v in range(len(SITES))}
        details = {"n": len(data), "n_per_group": sizes, "site_correlation": data.meta["site_correlation"],
                   "protected_correlation": data.meta["protected_correlation"], "classes": classes,
                   "templates": [TEMPLATE], "groups": "(label, site) and (label, protected)"}
        records.append(make_result(TaskResult("zeroshot_classification", f"shapes:spurious {key}", metrics, details,
                                              res.timings), model_spec=args.model, fingerprint=bb.fingerprint))
        summary[key] = metrics
        print(f"  zero-shot {key}: acc {metrics['acc1']:.3f}, worst-group (site) "
              f"{metrics['zero-shot worst_group_acc (site)']:.3f}", file=sys.stderr)

    # 2. shortcut test: linear probes fit with and without the correlation, scored on the shifted test
    metrics = {}
    for tag, tr, va in (("correlated train", "train", "val"),
                        ("uncorrelated train", "train (no correlation)", "val (no correlation)")):
        probe = LinearProbe().fit(feats[tr], sets[tr].labels, X_val=feats[va], y_val=sets[va].labels)
        pred = probe.predict(feats["test"])
        metrics.update(group_metrics(f"linear probe ({tag})", pred, sets["test"]))
    records.append(make_result(TaskResult("linear_probe", "shapes:spurious test", metrics,
                                          {"n_train": n_tr, "n_test": n_te, "train_site_correlation": [0.9, 0.5],
                                           "test_site_correlation": 0.1}),
                               model_spec=args.model, fingerprint=bb.fingerprint))
    summary["shortcut"] = metrics

    # 3. attribute probes: can the features tell the site and the fill?
    metrics = {}
    for attr in ("site", "protected"):
        ytr = np.asarray(sets["train (no correlation)"].attributes[attr])
        yva = np.asarray(sets["val (no correlation)"].attributes[attr])
        yte = np.asarray(sets["test (balanced)"].attributes[attr])
        probe = LinearProbe().fit(feats["train (no correlation)"], ytr, X_val=feats["val (no correlation)"], y_val=yva)
        metrics[f"{attr} probe acc"] = accuracy(probe.predict(feats["test (balanced)"]), yte)
    records.append(make_result(TaskResult("linear_probe", "shapes:spurious attributes", metrics,
                                          {"train": "train (no correlation)", "test": "test (balanced)"}),
                               model_spec=args.model, fingerprint=bb.fingerprint))
    summary["probes"] = metrics

    write_results(args.out, records)
    zs = summary["test"]
    gap = zs["acc1"] - zs["zero-shot worst_group_acc (site)"]
    print(f"shapes_subgroups: zero-shot on shapes:spurious test: acc {zs['acc1']:.3f}, worst-group (label, site) "
          f"{zs['zero-shot worst_group_acc (site)']:.3f} (gap {100 * gap:.1f} points); linear probe worst-group "
          f"{summary['shortcut']['linear probe (correlated train) worst_group_acc (site)']:.3f} (correlated train) vs "
          f"{summary['shortcut']['linear probe (uncorrelated train) worst_group_acc (site)']:.3f} (uncorrelated); "
          f"site probe {metrics['site probe acc']:.3f}, fill probe {metrics['protected probe acc']:.3f}; "
          f"{time.perf_counter() - t0:.0f} s; results {args.out}")


if __name__ == "__main__":
    main()
