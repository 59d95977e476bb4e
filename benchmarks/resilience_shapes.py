"""Accuracy under random weight bit flips: shapes-tiny plain vs ProAct (hybrid clipped activations).

The bundled ``shapes-tiny`` model classifies ``shapes:color-shape`` test scenes zero-shot
(64 classes, its own prompts; class text weights computed once, fault-free).  ProAct bounds
the image tower's MLP activations (``cliplab.resilience.apply_proact``) and trains the
thresholds progressively on training scenes (``train_proact``).  Then, per bit-error rate
and storage format (float32, int8), ``--trials`` random fault maps are injected into the
image tower's weights (``cliplab.resilience.fault_campaign``) and the mean top-1 reported.

    python benchmarks/resilience_shapes.py [--trials 10] [--n 400]

Writes ``benchmarks/results/resilience_shapes.json`` and ``docs/compression/resilience.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.datasets import load_dataset  # noqa: E402
from cliplab.resilience import apply_proact, fault_campaign, train_proact  # noqa: E402
from cliplab.zeroshot import class_weights, get_templates  # noqa: E402

BERS = [0.0, 1e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--n", type=int, default=400, help="test scenes")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps-per-layer", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/resilience_shapes.json")
    ap.add_argument("--picture", default="docs/compression/resilience.png")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bb = cliplab.load(args.model)
    test = load_dataset("shapes:color-shape", "test", n=args.n)
    train = load_dataset("shapes:color-shape", "train", n=args.n_train)
    val = load_dataset("shapes:color-shape", "val", n=256)
    templates = get_templates(test.meta.get("templates") or "a photo of a {c}.")
    w = class_weights(bb, list(test.classnames), templates, progress=False)          # (C, D), fault-free
    y = np.asarray(test.labels)

    def top1(model) -> float:
        x = model.encode_images(test.items, progress=False).features
        return float(((x @ w.T).argmax(1) == y).mean())

    tic = time.perf_counter()
    proact = apply_proact(bb, train.items)
    history = train_proact(proact, train.items, train.labels, list(train.classnames), templates=templates,
                           val=(val.items, val.labels), steps_per_layer=args.steps_per_layer, progress=False)
    train_s = time.perf_counter() - tic
    print(f"ProAct trained in {train_s:.0f} s: {history}")
    result = {"model": args.model, "n_test": len(y), "trials": args.trials, "bers": BERS,
              "proact": {"train_s": train_s, **history}, "campaigns": {}}
    for fmt in ("fp32", "int8"):
        for name, model in (("plain", bb), ("proact", proact)):
            c = fault_campaign(model, top1, BERS, trials=args.trials, fmt=fmt, seed=0, progress=False)
            result["campaigns"][f"{name}/{fmt}"] = c
            print(fmt, name, "clean", round(c["clean"], 4), [round(m, 4) for m in c["mean"]])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    picture(result, Path(args.picture))
    print("| format | model | " + " | ".join(f"BER {b:g}" for b in BERS) + " |")
    print("|---|---|" + "---|" * len(BERS))
    for key, c in result["campaigns"].items():
        fmt_, name = key.split("/")[1], key.split("/")[0]
        print(f"| {fmt_} | {name} | " + " | ".join(f"{100 * m:.1f}" for m in c["mean"]) + " |")


def picture(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
    for ax, fmt in zip(axes, ("fp32", "int8")):
        for name, style in (("plain", "o-"), ("proact", "s-")):
            c = result["campaigns"][f"{name}/{fmt}"]
            x = [max(b, 1e-8) for b in c["ber"]]
            ax.errorbar(x, 100 * np.array(c["mean"]), yerr=100 * np.array(c["std"]), fmt=style, label=name,
                        capsize=2)
        ax.set_xscale("log")
        ax.set_title(f"{fmt} weights")
        ax.set_xlabel("bit-error rate (0 drawn at 1e-8)")
    axes[0].set_ylabel("top-1 (%)")
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
