"""Activation outliers and W8A8 accuracy on shapes-tiny: vanilla, clipped-softmax and gated attention.

For each attention variant the bundled ``shapes-tiny`` model is fine-tuned for
``--ft-steps`` steps on its own recipe's training data through the Trainer (InfoNCE,
lr 1e-4; the vanilla row is fine-tuned the same way so the rows differ only in the
attention), then measured:

- outliers (``cliplab.surgery.outlier_stats``, 256 test images and the class prompts):
  max over layers of the mean infinity norm, mean and max kurtosis;
- zero-shot 64-way accuracy on ``shapes:color-shape`` test scenes in floating point and
  after W8A8 post-training quantization (``cliplab.surgery.quantize_w8a8``; running
  min-max and 99.999-percentile activation ranges, calibrated on 256 training images and
  the class prompts).

``--ft-steps 0`` measures the bundled model alone (clipped softmax and gates then start
from the pretrained weights untrained, so only the vanilla row is meaningful).

``--from-scratch STEPS`` trains each variant from random weights instead, with the
shapes-tiny recipe reduced to ``STEPS`` steps of ``--batch-size`` (``cliplab train --recipe
shapes-tiny --attention ...``: the attention of the reference's from-scratch settings, the
same seed, data and schedule for the three), saves the last checkpoint and measures the
model ``cliplab.load`` reads back from it.

    python benchmarks/quantize_shapes.py [--ft-steps 300] [--n 800]
    python benchmarks/quantize_shapes.py --from-scratch 100 --batch-size 32 --n 400 --threads 1 \
        --out benchmarks/results/quantize_shapes_scratch.json

Writes ``benchmarks/results/quantize_shapes.json`` (or ``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.datasets import load_dataset  # noqa: E402
from cliplab.surgery import apply_outlier_free, outlier_stats, quantize_w8a8  # noqa: E402
from cliplab.train import Trainer, get_recipe  # noqa: E402
from cliplab.train.recipes import run_recipe  # noqa: E402
from cliplab.zeroshot import class_weights  # noqa: E402

VARIANTS = {"vanilla": {"softmax": "vanilla"},
            "clipped softmax": {"softmax": "clipped"},
            "gated attention (linear)": {"softmax": "vanilla", "gate": "linear"}}
SCRATCH = {"vanilla": "vanilla", "clipped softmax": "clipped", "gated attention (linear)": "gated-linear"}


def accuracy(bb, data, prompts) -> float:
    w = class_weights(bb, list(data.classnames), prompts, progress=False)          # (C, D)
    x = bb.encode_images(data.items, progress=False).features                      # (N, D)
    return float(((x @ w.T).argmax(1) == np.asarray(data.labels)).mean())


def finetune(bb, kw: dict, steps: int, out: Path):
    new = apply_outlier_free(bb, **kw)     # vanilla too: the same explicit attention, a copy of the weights
    if steps == 0:
        return new, 0.0
    recipe = get_recipe("shapes-tiny", steps=steps, batch_size=64, lr=1e-4, warmup_steps=min(20, steps),
                        out_dir=str(out), ckpt_every=0, eval_every=0, log_every=50)
    model = new.model.requires_grad_(True).train()
    tic = time.perf_counter()
    Trainer(model, new.tokenize, new.preprocess, recipe.train_set, recipe.config, None,
            preprocess_cfg=new.preprocess_cfg, progress=False).fit()
    model.eval().requires_grad_(False)
    return new, time.perf_counter() - tic


def from_scratch(attention: str, steps: int, batch_size: int, out: Path):
    """Train the reduced shapes-tiny recipe with ``attention`` and load its last checkpoint."""
    recipe = get_recipe("shapes-tiny", attention=attention, steps=steps, batch_size=batch_size,
                        warmup_steps=max(1, steps // 10), out_dir=str(out), ckpt_every=0, eval_every=0,
                        log_every=25)
    tic = time.perf_counter()
    row = run_recipe(recipe, progress=False)
    seconds = time.perf_counter() - tic
    return cliplab.load(row["checkpoint"]), seconds, row["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--from-scratch", type=int, default=0, metavar="STEPS",
                    help="train each variant from scratch for STEPS steps instead of fine-tuning shapes-tiny")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of --from-scratch training")
    ap.add_argument("--n", type=int, default=800, help="test scenes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/quantize_shapes.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bb = cliplab.load(args.model)
    test = load_dataset("shapes:color-shape", "test", n=args.n)
    calib = load_dataset("shapes:color-shape", "train", n=256)
    prompts = test.meta.get("templates") or ["a photo of a {c}."]
    texts = [t.format(c=c) for c in test.classnames for t in prompts]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS.items():
            out = Path(tmp) / name.split()[0]
            if args.from_scratch:
                model, seconds, loss = from_scratch(SCRATCH[name], args.from_scratch, args.batch_size, out)
                row = {"variant": name, "attention": model.model_cfg.get("cliplab", {}).get("attention"),
                       "train_s": round(seconds, 1), "final_loss": round(loss, 4)}
            else:
                model, seconds = finetune(bb, kw, args.ft_steps, out)
                row = {"variant": name, "finetune_s": round(seconds, 1)}
            stats = outlier_stats(model, test.items[:256], texts)
            row.update(stats.summary(), fp_acc=accuracy(model, test, prompts))
            row["per_layer"] = {layer: {"inf_norm": round(float(i), 2), "kurtosis": round(float(k), 2)}
                                for layer, i, k in zip(stats.layers, stats.inf_norm, stats.kurtosis)}
            for act in ("minmax", "percentile"):
                q = quantize_w8a8(model, calib.items, texts, act_range=act, progress=False)
                row[f"w8a8_{act}_acc"] = accuracy(q, test, prompts)
            rows.append(row)
            print(json.dumps(row))
    result = {"model": "from scratch (shapes-tiny recipe)" if args.from_scratch else args.model,
              "ft_steps": 0 if args.from_scratch else args.ft_steps, "from_scratch_steps": args.from_scratch,
              "batch_size": args.batch_size if args.from_scratch else 64, "n_test": len(test.items),
              "threads": args.threads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | max inf-norm | avg kurtosis | max kurtosis | FP acc | W8A8 min-max | W8A8 percentile |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r.pop("per_layer")
        print(f"| {r['variant']} | {r['max_inf_norm']:.1f} | {r['avg_kurtosis']:.1f} | {r['max_kurtosis']:.1f} | "
              f"{100 * r['fp_acc']:.1f} | {100 * r['w8a8_minmax_acc']:.1f} | {100 * r['w8a8_percentile_acc']:.1f} |")


if __name__ == "__main__":
    main()
