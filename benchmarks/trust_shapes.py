"""The paper effects of issue 17's trustworthy evaluation, measured on ShapesWorld with shapes-tiny.

1. OOD detection: MCM (zero-shot) against the maximum softmax of a linear probe, ID
   ``shapes:shape`` vs OOD ``shapes:ood`` (the held-back heart and crescent).
2. Temperature scaling: ECE before/after on validation and test, in the original domain
   and under shifts (T fitted on the validation split of the same domain).
3. Prompt ensembling: one template ("a photo of a {c}.") vs the 80 OpenAI templates,
   ECE and accuracy under shifts.
4. WiSE-FT: full fine-tuning on 16 shots per class of ``shapes:shape`` (original domain,
   5 epochs), then (1 - a) * zero-shot + a * fine-tuned for a in 0, 0.5, 1: accuracy and
   ECE in the original domain and under shifts (no temperature scaling).
5. Spurious correlation: the ``fairness`` task on ``shapes:spurious`` (site 90 % aligned
   with the label in train, 10 % in test) for zero-shot CLIP and for a linear probe
   trained on the correlated train split: worst-group accuracy, the shortcut test on the
   site, and the attribute probe.

Usage: python benchmarks/trust_shapes.py [--n 800] [--quick]
Writes benchmarks/results/trust_shapes.json and prints one line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import cliplab  # noqa: E402
from cliplab.adapt import FullFineTuner  # noqa: E402
from cliplab.data.datasets import fewshot_subset, load_dataset  # noqa: E402
from cliplab.eval import evaluate  # noqa: E402
from cliplab.eval.calibration import calibration_metrics, softmax  # noqa: E402
from cliplab.surgery import interpolate  # noqa: E402
from cliplab.zeroshot import class_weights, get_templates  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "trust_shapes.json"
SHIFTS = ("color-cast", "blur-4", "noise-3", "textured")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def zero_shot_eval(bb, data, templates) -> dict:
    w = class_weights(bb, list(data.classnames), get_templates(templates), progress=False)
    x = bb.encode_images(list(data.items), progress=False).features
    return calibration_metrics(softmax(bb.logit_scale * (x @ w.T)), np.asarray(data.labels))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--n", type=int, default=800, help="test images per set")
    ap.add_argument("--quick", action="store_true", help="n=120, one shift (a smoke run)")
    ap.add_argument("--ft-epochs", type=int, default=10, help="full fine-tuning epochs (WiSE-FT endpoint)")
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="full fine-tuning learning rate")
    args = ap.parse_args()
    n = 120 if args.quick else args.n
    shifts = SHIFTS[:1] if args.quick else SHIFTS
    bb = cliplab.load(args.model)
    out: dict = {"model": args.model, "n": n, "shifts": list(shifts)}
    t0 = time.perf_counter()

    rec = evaluate(bb, model_spec=args.model, task="ood_detection", dataset="shapes:shape", n=n, n_train=2 * n,
                   options={"ood_dataset": "shapes:ood"})
    out["ood"] = rec["metrics"]
    log(f"OOD AUROC: MCM {rec['metrics']['auroc_mcm']:.3f}, probe MSP {rec['metrics']['auroc_msp_probe']:.3f}")

    out["temperature_scaling"] = {}
    for domain in ("original", *shifts):
        spec = "shapes:shape" + ("" if domain == "original" else f"@{domain}")
        m = evaluate(bb, model_spec=args.model, task="calibration", dataset=spec, n=n)["metrics"]
        out["temperature_scaling"][domain] = m
        log(f"TS {domain}: val ECE {m['val_ece']:.3f} -> {m['val_ece_ts']:.3f}, test ECE {m['ece']:.3f} -> "
            f"{m['ece_ts']:.3f} (T {m['temperature']:.2f})")

    out["prompt_ensembling"] = {}
    for domain in ("original", *shifts):
        data = load_dataset("shapes:shape" + ("" if domain == "original" else f"@{domain}"), "test", n=n)
        one, ens = zero_shot_eval(bb, data, "a photo of a {c}."), zero_shot_eval(bb, data, "openai-80")
        out["prompt_ensembling"][domain] = {"one_template": one, "openai_80": ens}
        log(f"prompts {domain}: acc {one['acc1']:.3f} -> {ens['acc1']:.3f}, ECE {one['ece']:.3f} -> {ens['ece']:.3f}")

    train = load_dataset("shapes:shape", "train", n=2000)
    shots = fewshot_subset(train, 16, 0)
    est = FullFineTuner(bb, list(train.classnames), epochs=args.ft_epochs, lr=args.ft_lr, random_state=0,
                        progress=False)
    est.fit(np.stack(shots.items), np.asarray(shots.labels))
    ft = est.adapted_backbone()
    out["wise_ft"] = {"epochs": args.ft_epochs, "lr": args.ft_lr}
    tests = {d: load_dataset("shapes:shape" + ("" if d == "original" else f"@{d}"), "test", n=n)
             for d in ("original", *shifts)}
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        m = interpolate(bb, ft, alpha)
        out["wise_ft"][str(alpha)] = {d: zero_shot_eval(m, data, "a photo of a {c}.") for d, data in tests.items()}
        row = out["wise_ft"][str(alpha)]
        log(f"WiSE-FT a={alpha}: " + ", ".join(f"{d} acc {v['acc1']:.3f} ECE {v['ece']:.3f}" for d, v in row.items()))

    out["spurious"] = {}
    for predictor in ("zero-shot", "linear-probe"):
        rec = evaluate(bb, model_spec=args.model, task="fairness", dataset="shapes:spurious", n=n, n_train=2 * n,
                       options={"attributes": "site,protected", "shortcut": "site", "predictor": predictor})
        out["spurious"][predictor] = {"metrics": rec["metrics"], "shortcut": rec["cliplab"].get("shortcut"),
                                      "probes": rec["cliplab"]["probes"]}
        mm = rec["metrics"]
        log(f"spurious {predictor}: acc {mm['acc1']:.3f}, worst site group {mm['site:worst_accuracy']:.3f}, "
            f"shortcut gap {mm['site:shortcut_gap']:.3f}, site probe AUROC {mm['site:probe_auroc']:.3f}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1, default=float))
    log(f"wrote {RESULTS} in {out['seconds']} s")


if __name__ == "__main__":
    main()
