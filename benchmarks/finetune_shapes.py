"""Prompt learners, fine-tuners, WiSE-FT and layer-wise sharpness on ShapesWorld.

Part 1, few-shot (the eval harness's protocol, ``cliplab.eval.tasks.fewshot``): 64-way
colour x shape on single-object scenes of the shapes-tiny world, tested on compositions
seen in training, in two domains: clean scenes ("seen-compositions", as in
benchmarks/adapt_shapes.py; the model is near its ceiling there) and "defects" (the same
world with ``defect_rate=1``: a scratch, hole or stain on every scene, never seen by the
model in training).  Methods: zero-shot, three training-free adapters for reference
(linear probe, GDA, Tip-Adapter) and every learner of ``cliplab.adapt.METHODS``
(CoOp, KgCoOp, MoCoOp on frozen features; LoRA, CLIP-SVD, full fine-tuning on images).
Shots 1, 4, 16 x seeds 0, 1; epochs: CoOp/KgCoOp 20, MoCoOp 10 (lr 2e-3), LoRA/SVD/full 3 (a CPU
budget, far below the papers').  Trainable-parameter count and seconds per epoch (at the
largest shot count) per method.  ``--domains clean,defects`` adds the clean domain.

Part 2, base-to-novel (defects domain): the 64 classes split at random (seed 0) into 32
base and 32 novel; each prompt learner trains on 16 shots of the base classes and is scored on
base test images over the base classes and on novel test images over the novel classes
(``with_classnames``); harmonic mean as in CoOp's papers.

Part 3, WiSE-FT: full fine-tuning on 16 shots of defect scenes over plain/gradient
backgrounds (in distribution) gives theta_1; ``interpolate(zero_shot, theta_1, alpha)``
for alpha in 0, 0.1, ..., 1 is scored in distribution and out of distribution (defect
scenes over striped/noisy backgrounds).

Part 4, layer-wise sharpness along the WiSE-FT path (reconstructed spec, see
``cliplab.eval.sharpness``): adaptive l-inf sharpness of each layer group at alpha
0, 0.2, ..., 1 on 256 of the fine-tuning images, Kendall tau between each group's
sharpness and the OOD accuracy over alpha; straggler layers (per-layer interpolation
barriers).

Usage: python benchmarks/finetune_shapes.py [--model shapes-tiny] [--quick]
Writes benchmarks/results/finetune_shapes.json, docs/finetune_shapes/ (report, plot) and
prints a summary.  Full run: about 25 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import cliplab  # noqa: E402
from cliplab.adapt import METHODS, list_methods  # noqa: E402
from cliplab.adapt.fewshot import make_adapter, make_learner  # noqa: E402
from cliplab.data.shapes import COLORS  # noqa: E402
from cliplab.data.datasets import ClassificationData, fewshot_subset  # noqa: E402
from cliplab.eval.metrics import accuracy  # noqa: E402
from cliplab.eval.results import make_result, write_results  # noqa: E402
from cliplab.eval.tasks import TaskResult, fewshot  # noqa: E402
from cliplab.eval.metrics import rank_correlation  # noqa: E402
from cliplab.eval.sharpness import layer_sharpness, straggler_layers  # noqa: E402
from cliplab.surgery import interpolate  # noqa: E402
from cliplab.data.shapes import shapes_tiny_world  # noqa: E402
from cliplab.zeroshot import class_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune_shapes.json"
REPORT = ROOT / "docs" / "finetune_shapes"
TEMPLATE = "a photo of a {c}."
FREE = ("linear", "gda", "tip")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data
def split(world, name, n, pairs, keep=lambda s: True):
    """(uint8 images (M, S, S, 3), labels (M,)) of the first single-object scenes ``keep`` accepts."""
    world = world.replace(split_sizes={name: max(world.split_sizes[name], 40 * n)})
    images, labels, i = [], [], 0
    while len(labels) < n:
        s = world.scene(name, i)
        i += 1
        if keep(s):
            images.append(s.image)
            labels.append(pairs.index((s.objects[0].color, s.objects[0].shape)))
    return np.stack(images), np.asarray(labels)


class Bench:
    """The backbone, its feature cache (by image bytes) and the learners' settings."""

    def __init__(self, bb, quick: bool):
        self.bb, self.quick = bb, quick
        self.epochs = {"coop": 20, "kgcoop": 20, "mocoop": 10, "lora": 3, "svd": 3, "full": 3}
        if quick:
            self.epochs = {k: 1 for k in self.epochs}

    def features(self, images) -> np.ndarray:
        return self.bb.encode_images(list(images), progress=False).features

    def learner(self, method, classnames, **kw):
        lr = {"mocoop": 2e-3}.get(method)        # CoOp's rate, as when the tables were made
        return make_learner(method, self.bb, classnames, epochs=self.epochs[method], lr=lr, progress=False, **kw)


class Recorder:
    """Wraps a learner factory for the few-shot protocol and keeps the fitted estimators."""

    def __init__(self, factory):
        self.factory, self.fitted = factory, []

    def __call__(self, **params):
        est = self.factory(**params)
        self.fitted.append(est)
        return est


class FreeAdapter:
    """A training-free adapter in the protocol: text weights of the draw's classes, own val split."""

    def __init__(self, method, text, scale, val):
        self.method, self.text, self.scale, self.val = method, text, scale, val

    def fit(self, X, y):
        present = np.unique(y)
        xv, yv = self.val
        on = np.isin(yv, present)
        self.est_ = make_adapter(self.method, text_weights=self.text[present], logit_scale=self.scale)
        self.est_.fit(X, y, X_val=xv[on], y_val=yv[on])
        return self

    def predict(self, X):
        return self.est_.predict(X)


# ------------------------------------------------------------------------ part 1
def fewshot_part(b: Bench, names, train, val, tests: dict, ks, seeds, model_spec):
    (it, yt), (iv, yv) = train, val
    ft, fv = b.features(it), b.features(iv)
    text = class_weights(b.bb, names, [TEMPLATE])
    records = []
    for tname, (is_, ys) in tests.items():
        fs = b.features(is_)
        zs = accuracy((fs @ text.T).argmax(1), ys)
        metrics, curves, cost = {"zero-shot": zs}, [], {}
        log(f"{tname}: zero-shot {zs:.3f}")
        for method in (*FREE, *list_methods("learner")):
            t0 = time.perf_counter()
            if method in FREE:
                rec = None
                make = lambda m=method: FreeAdapter(m, text, b.bb.logit_scale, (fv, yv))  # noqa: E731
                data = ((ft, yt), (fv, yv), (fs, ys))
            else:
                rec = Recorder(lambda m=method: b.learner(m, names))
                make = rec
                images = METHODS.get(method).input_kind == "images"
                data = (((it, yt), (iv, yv), (is_, ys)) if images else ((ft, yt), (fv, yv), (fs, ys)))
            res = fewshot(make, *data, ks=ks, seeds=seeds, method=method, classnames=names, dataset=tname)
            curves += res.details["fewshot"]
            metrics.update({f"{method} {k}": v for k, v in res.metrics.items()})
            if rec is not None:
                last = rec.fitted[-len(seeds):]                     # the fits at the largest k
                cost[method] = {"trainable_parameters": int(last[0].n_trainable_),
                                "seconds_per_epoch": float(np.median([e.epoch_time_ for e in last])),
                                "epochs": int(last[0].epochs_)}
            log(f"  {method}: " + " ".join(f"{v:.3f}" for v in res.metrics.values())
                + f" ({time.perf_counter() - t0:.0f}s)")
        res = TaskResult("fewshot", tname, metrics, {"fewshot": curves, "seeds": list(seeds), "ks": list(ks),
                                                     "n_test": int(len(ys)), "cost": cost, "template": TEMPLATE})
        records.append(make_result(res, model_spec=model_spec, fingerprint=b.bb.fingerprint, seeds=seeds))
    return records


# ------------------------------------------------------------------------ part 2
def base_to_novel_part(b: Bench, names, train, test, shots, seeds, model_spec):
    (it, yt), (is_, ys) = train, test
    rng = np.random.default_rng(0)
    base = np.sort(rng.permutation(len(names))[: len(names) // 2])
    novel = np.setdiff1d(np.arange(len(names)), base)
    remap = {int(c): i for i, c in enumerate(base)}
    remap_n = {int(c): i for i, c in enumerate(novel)}
    tr = np.isin(yt, base)
    pool = ClassificationData(list(np.flatnonzero(tr)), np.asarray([remap[int(c)] for c in yt[tr]]),
                              [names[c] for c in base], "base")
    sb, sn = np.isin(ys, base), np.isin(ys, novel)
    yb = np.asarray([remap[int(c)] for c in ys[sb]])
    yn = np.asarray([remap_n[int(c)] for c in ys[sn]])
    fb, fn = b.features(is_[sb]), b.features(is_[sn])
    base_names, novel_names = [names[c] for c in base], [names[c] for c in novel]
    tb, tn = class_weights(b.bb, base_names, [TEMPLATE]), class_weights(b.bb, novel_names, [TEMPLATE])
    rows = {"zero-shot": (accuracy((fb @ tb.T).argmax(1), yb), accuracy((fn @ tn.T).argmax(1), yn))}
    for method in (m for m in list_methods("learner") if METHODS.get(m).input_kind == "features"):   # the prompt learners
        images = False
        accs = []
        for seed in seeds:
            idx = np.asarray(fewshot_subset(pool, shots, seed).items, dtype=np.int64)
            x = it[idx] if images else b.features(it[idx])
            y = np.asarray([remap[int(c)] for c in yt[idx]])
            est = b.learner(method, base_names, random_state=seed).fit(x, y)
            nov = est.with_classnames(novel_names)
            xb, xn = (is_[sb], is_[sn]) if images else (fb, fn)
            accs.append((accuracy(est.predict(xb), yb), accuracy(nov.predict(xn), yn)))
        rows[method] = tuple(float(v) for v in np.mean(accs, axis=0))
        log(f"  base-to-novel {method}: base {rows[method][0]:.3f} novel {rows[method][1]:.3f}")
    metrics = {}
    for m, (ab, an) in rows.items():
        metrics.update({f"{m} base": ab, f"{m} novel": an, f"{m} hm": 2 * ab * an / max(ab + an, 1e-12)})
    res = TaskResult("base_to_novel", "shapes:color-shape defects", metrics,
                     {"base": base_names, "novel": novel_names, "shots": shots, "seeds": list(seeds),
                      "n_test_base": int(sb.sum()), "n_test_novel": int(sn.sum())})
    return [make_result(res, model_spec=model_spec, fingerprint=b.bb.fingerprint, seeds=seeds)]


# ------------------------------------------------------------------------ parts 3-4
def wise_ft_part(b: Bench, names, train, id_test, ood_test, shots, alphas, sharp_alphas, n_sharp, model_spec):
    (it, yt), (iid, yid), (iood, yood) = train, id_test, ood_test
    pool = ClassificationData(list(range(len(yt))), yt, names, "train")
    idx = np.asarray(fewshot_subset(pool, shots, 0).items, dtype=np.int64)
    t0 = time.perf_counter()
    est = b.learner("full", names).fit(it[idx], yt[idx])
    ft = est.adapted_backbone()
    log(f"  full fine-tune: {time.perf_counter() - t0:.0f}s")
    curve = {"alpha": [], "id": [], "ood": []}
    for a in alphas:
        m = interpolate(b.bb, ft, float(a))
        text = class_weights(m, names, [TEMPLATE])
        curve["alpha"].append(float(a))
        curve["id"].append(accuracy((m.encode_images(list(iid), progress=False).features @ text.T).argmax(1), yid))
        curve["ood"].append(accuracy((m.encode_images(list(iood), progress=False).features @ text.T).argmax(1), yood))
        log(f"  alpha {a:.1f}: ID {curve['id'][-1]:.3f} OOD {curve['ood'][-1]:.3f}")
    # layer-wise sharpness along the path, on clean training images
    xs, ys = it[idx][:n_sharp], yt[idx][:n_sharp]
    per_layer: dict[str, list] = {}
    for a in sharp_alphas:
        m = interpolate(b.bb, ft, float(a))
        for g, s in layer_sharpness(m, xs, ys, names, template=TEMPLATE.replace("{c}", "{}"),
                                    n_iters=5, batch_size=128, progress=False).items():
            per_layer.setdefault(g, []).append(float(s))
        log(f"  sharpness at alpha {a:.1f} done")
    ood_at = [curve["ood"][curve["alpha"].index(float(a))] for a in sharp_alphas]
    tau = {g: rank_correlation(v, ood_at) for g, v in per_layer.items()}
    strag = straggler_layers(b.bb, ft, xs, ys, names, template=TEMPLATE.replace("{c}", "{}"),
                             alphas=np.linspace(0, 1, 6), progress=False)
    ranking = [(r["group"], r["barrier"]) if isinstance(r, dict) else r for r in strag.get("ranking", [])][:5]
    metrics = {f"id@{a:.1f}": v for a, v in zip(curve["alpha"], curve["id"])}
    metrics.update({f"ood@{a:.1f}": v for a, v in zip(curve["alpha"], curve["ood"])})
    details = {"curve": curve, "shots": shots,
               "id": "defect_rate=1 (a scratch, hole or stain on every scene), plain/gradient backgrounds",
               "ood": "the same on striped/noisy backgrounds",
               "sharpness": {"alphas": [float(a) for a in sharp_alphas], "per_layer": per_layer,
                             "kendall_tau_vs_ood": tau, "n_images": int(len(ys)), "n_iters": 5, "rho": 1e-3},
               "stragglers": ranking, "finetune": {"method": "full", "epochs": int(est.epochs_),
                                                   "trainable_parameters": int(est.n_trainable_)}}
    res = TaskResult("wise_ft", "shapes:color-shape defects", metrics, details)
    return [make_result(res, model_spec=model_spec, fingerprint=b.bb.fingerprint)]


# ------------------------------------------------------------------------ report
def write_docs(records, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Fine-tuning on ShapesWorld (generated by benchmarks/finetune_shapes.py)", ""]
    for r in records:
        if r["task"] == "fewshot":
            m, d = r["metrics"], r["cliplab"]
            ks = d["ks"]
            lines += [f"## Few-shot: {r['dataset']} (mean of {len(d['seeds'])} seeds)", "",
                      "| method | " + " | ".join(f"{k}-shot" for k in ks) + " | trainable params | s/epoch |",
                      "|---" * (len(ks) + 3) + "|",
                      f"| zero-shot | " + " | ".join(f"{m['zero-shot']:.3f}" for _ in ks) + " | 0 | - |"]
            for meth in (*FREE, *list_methods("learner")):
                c = d["cost"].get(meth, {})
                lines.append(f"| {meth} | " + " | ".join(f"{m[f'{meth} acc1@{k}shot']:.3f}" for k in ks)
                             + f" | {c.get('trainable_parameters', 'n/a')} | "
                             + (f"{c['seconds_per_epoch']:.2f} ({c['epochs']} ep.)" if c else "-") + " |")
            lines.append("")
        elif r["task"] == "base_to_novel":
            m = r["metrics"]
            lines += [f"## Base-to-novel ({r['cliplab']['shots']} shots of 32 base classes; 32 novel)", "",
                      "| method | base | novel | HM |", "|---|---|---|---|"]
            for meth in ["zero-shot", *(k for k in list_methods("learner") if f"{k} base" in m)]:
                lines.append(f"| {meth} | {m[f'{meth} base']:.3f} | {m[f'{meth} novel']:.3f} | {m[f'{meth} hm']:.3f} |")
            lines.append("")
        elif r["task"] == "wise_ft":
            c, d = r["cliplab"]["curve"], r["cliplab"]
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot(c["alpha"], c["id"], "o-", label="ID: defects, plain/gradient background")
            ax.plot(c["alpha"], c["ood"], "s-", label="OOD: defects, striped/noisy background")
            ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
            ax.set_ylabel("64-way accuracy")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "wise_ft.png", dpi=100)
            plt.close(fig)
            lines += ["## WiSE-FT", "", "| alpha | " + " | ".join(f"{a:.1f}" for a in c["alpha"]) + " |",
                      "|---" * (len(c["alpha"]) + 1) + "|",
                      "| ID | " + " | ".join(f"{v:.3f}" for v in c["id"]) + " |",
                      "| OOD | " + " | ".join(f"{v:.3f}" for v in c["ood"]) + " |", "",
                      "![WiSE-FT curves](wise_ft.png)", "",
                      "Layer-wise sharpness vs OOD accuracy along alpha (Kendall tau, "
                      f"alphas {d['sharpness']['alphas']}):", "", "| layer group | tau |", "|---|---|"]
            tau = {g: (v if isinstance(v, float) and np.isfinite(v) else None)
                   for g, v in d["sharpness"]["kendall_tau_vs_ood"].items()}
            for g in sorted(tau, key=lambda g: -abs(tau[g]) if tau[g] is not None else 0):
                lines.append(f"| {g} | " + (f"{tau[g]:.2f}" if tau[g] is not None else "n/a (constant)") + " |")
            lines += ["", "Straggler layers (largest per-layer interpolation barrier): "
                      + ", ".join(f"{g} ({v:.3g})" for g, v in d["stragglers"]), ""]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--quick", action="store_true", help="small sizes, 1 epoch, one seed (a smoke run)")
    ap.add_argument("--out", help=f"results JSON (default: {RESULTS.relative_to(ROOT)}; --quick: temporary)")
    ap.add_argument("--report", help=f"docs folder (default: {REPORT.relative_to(ROOT)}; --quick: temporary)")
    ap.add_argument("--parts", default="1234", help="which parts to run (default: 1234)")
    ap.add_argument("--domains", default="defects",
                    help="part 1 domains, comma-separated: clean, defects (default: defects; on clean "
                         "scenes shapes-tiny is at its ceiling)")
    args = ap.parse_args()
    q = args.quick
    scratch = Path(tempfile.mkdtemp(prefix="finetune_shapes_"))
    out = Path(args.out or (scratch / "r.json" if q else RESULTS))
    report = Path(args.report or (scratch / "report" if q else REPORT))
    t0 = time.perf_counter()
    b = Bench(cliplab.load(args.model), q)
    world = shapes_tiny_world(0)
    shapes = world.shapes_of("test")
    pairs = [(c, s) for c in COLORS for s in shapes]
    names = [f"{c} {s}" for c, s in pairs]
    seen = lambda s: (s.objects[0].color, s.objects[0].shape) not in set(world.heldout)  # noqa: E731
    n_train, n_val, n_test = (300, 100, 200) if q else (2000, 500, 1000)
    ks, seeds = ((1, 2), (0,)) if q else ((1, 4, 16), (0, 1))
    defects = world.replace(defect_rate=1.0)
    calm = lambda s: seen(s) and s.background in ("plain", "gradient")           # noqa: E731
    busy = lambda s: seen(s) and s.background in ("stripes", "noise")            # noqa: E731
    records = []
    if "1" in args.parts:       # clean scenes (near the model's ceiling) and the defects domain
        domains = {"clean": ("shapes:color-shape seen-compositions", world),
                   "defects": ("shapes:color-shape defects", defects)}
        for tname, w in (domains[d] for d in args.domains.split(",")):
            records += fewshot_part(b, names, split(w, "train", n_train, pairs), split(w, "val", n_val, pairs),
                                    {tname: split(w, "test", n_test, pairs, seen)}, ks, seeds, args.model)
    if "2" in args.parts:
        records += base_to_novel_part(b, names, split(defects, "train", n_train, pairs),
                                      split(defects, "test", n_test, pairs, seen), ks[-1], seeds, args.model)
    if "3" in args.parts:       # fine-tune on defects over calm backgrounds; OOD: busy backgrounds
        alphas = np.round(np.linspace(0, 1, 3 if q else 11), 2)
        records += wise_ft_part(b, names, split(defects, "train", n_train, pairs, calm),
                                split(defects, "test", n_test, pairs, calm), split(defects, "test", n_test, pairs, busy),
                                ks[-1], alphas, alphas[::2] if not q else alphas, 64 if q else 256, args.model)
    write_results(out, records)
    path = write_docs(records, report)
    log(f"finetune_shapes: {len(records)} records in {time.perf_counter() - t0:.0f} s; results {out}; docs {path}")
    print(json.dumps({r["task"] + " " + r["dataset"]: {k: round(v, 4) for k, v in r["metrics"].items()}
                      for r in records}, indent=1))


if __name__ == "__main__":
    main()
