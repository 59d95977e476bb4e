"""LightCLIP vs InfoNCE at an equal budget on ShapesWorld: zero-shot, dense mIoU and cost per step.

Both objectives train the ``shapes-tiny`` recipe's model and data (``cliplab train --recipe
shapes-tiny``) with the same steps, batch 64, lr 1e-3, 50 warm-up steps and seed 0, one run
after the other.  Then, for each checkpoint:

- zero-shot: the recipe's validation (64-way colour x shape on 512 single-object val scenes),
  read from the run's last metric row;
- dense: MaskCLIP segmentation of ``shapes:seg`` test scenes (``--n``), one resize of the
  scene to the model input, template "a photo of a {c}.", ``prob_thd`` chosen on ``--n-val``
  train-split scenes as ``segment_shapes.py`` does; mIoU as mmsegmentation computes it;
- cost: seconds per training step (forward, backward, AdamW) of each objective on one
  pre-rendered batch of 64 (data loading excluded), the two interleaved in ``--rounds``
  rounds; samples/s and the ratio to InfoNCE (median over rounds).

Usage: python benchmarks/lightclip_shapes.py [--steps 300] [--runs DIR] [--n 40] [--threads 1] [--no-train]
A run folder that already holds a finished run (``DIR/<loss>/metrics.jsonl`` reaching
``--steps``) is reused; with ``--no-train`` an unfinished one is reported, not trained
(``cliplab train ... --resume`` continues it exactly).  Writes benchmarks/results/lightclip_shapes.json and prints a summary.
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
from cliplab.dense import segment  # noqa: E402
from cliplab.eval.metrics import mean_iou  # noqa: E402
from cliplab.train.checkpoint import latest_checkpoint  # noqa: E402
from cliplab.train.recipes import get_recipe, init_model, run_recipe  # noqa: E402
from segment_shapes import BACKGROUND, TEMPLATE, THRESHOLDS, load_data, threshold  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lightclip_shapes.json"
LOSSES = ("infonce", "lightclip")


def settings(steps: int) -> dict:
    return {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": 50, "seed": 0, "ckpt_every": 0,
            "log_every": 25}


def train(loss: str, steps: int, runs: Path) -> dict:
    """The finished run of ``loss`` in ``runs/loss`` (trained here if missing): last metric row + checkpoint."""
    out = runs / loss
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not rows or rows[-1]["step"] != steps:
        t0 = time.perf_counter()
        run_recipe(get_recipe("shapes-tiny", loss=loss, out_dir=str(out), **settings(steps)), progress=False)
        print(f"{loss}: trained {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"row": rows[-1], "checkpoint": str(latest_checkpoint(out)),
            "train_samples_per_s": float(np.median([r["samples_per_s"] for r in rows[1:]] or [np.nan]))}


def dense_miou(checkpoint: str, n: int, n_val: int) -> dict:
    """MaskCLIP mIoU on shapes:seg test scenes, prob_thd chosen on train-split scenes."""
    bb = cliplab.load(f"local-dir:{checkpoint}")
    data, val = load_data("shapes:seg", n), load_data("shapes:seg", n_val, split="train")
    classes = [BACKGROUND, *data.classnames[1:]]
    run = dict(method="maskclip", templates=TEMPLATE, batch_size=64, return_probs=True)
    n_cls = len(data.classnames)
    val_probs = segment(bb, val.images, classes, **run).probs
    thd = max(THRESHOLDS, key=lambda t: (mean_iou(threshold(val_probs, t), val.masks, n_cls,
                                                   ignore_index=val.ignore_index)["mIoU"], -t))
    res = segment(bb, data.images, classes, **run)
    m = mean_iou(threshold(res.probs, thd), data.masks, n_cls, ignore_index=data.ignore_index)
    return {"dataset": data.name, "n": len(data.images), "prob_thd": thd, "mIoU": m["mIoU"], "aAcc": m["aAcc"]}


def step_cost(rounds: int, steps_per_round: int) -> dict:
    """Seconds per optimizer step of each objective on one pre-rendered batch of 64, interleaved."""
    from cliplab.train.losses import Batch, get_loss
    from cliplab.train.trainer import parameter_groups

    recipe = get_recipe("shapes-tiny", **settings(1))
    built = init_model(recipe.model_cfg, loss="infonce", seed=0)
    items = [recipe.train_set[i] for i in range(64)]
    from cliplab.models.transforms import images_to_tensor

    images = images_to_tensor([it[0] for it in items], built.preprocess, None)
    batch = Batch(images=images, tokens=built.tokenizer([it[1][0] for it in items]), step=0, total_steps=100)
    runs = {}
    for loss in LOSSES:
        model = init_model(recipe.model_cfg, loss=loss, seed=0).model.train()
        objective = get_loss(loss)
        objective.setup(model)
        params = parameter_groups(model, 0.1) + parameter_groups(objective, 0.1)
        runs[loss] = (model, objective, torch.optim.AdamW(params, lr=1e-4))
    times = {loss: [] for loss in LOSSES}
    for _ in range(rounds + 1):                                       # round 0 warms up
        for loss, (model, objective, opt) in runs.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                terms = objective(objective.forward_model(model, batch), batch)
                opt.zero_grad(set_to_none=True)
                sum(terms.values()).backward()
                opt.step()
            times[loss].append((time.perf_counter() - t0) / steps_per_round)
    per_step = {loss: float(np.median(t[1:])) for loss, t in times.items()}
    return {"batch_size": 64, "rounds": rounds, "steps_per_round": steps_per_round,
            "seconds_per_step": per_step, "samples_per_s": {k: 64 / v for k, v in per_step.items()},
            "ratio_to_infonce": float(np.median(np.array(times["lightclip"][1:]) / np.array(times["infonce"][1:])))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--runs", default="runs/lightclip-vs-infonce", help="folder of the two runs")
    ap.add_argument("--n", type=int, default=40, help="shapes:seg test scenes")
    ap.add_argument("--n-val", type=int, default=16, help="shapes:seg train-split scenes (prob_thd choice)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the cost measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-train", action="store_true", help="evaluate finished runs only; report the others' step")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    result = {"settings": {"recipe": "shapes-tiny", **settings(args.steps)}, "runs": {}}
    for loss in LOSSES:
        metrics = runs / loss / "metrics.jsonl"
        last = json.loads(metrics.read_text().splitlines()[-1])["step"] if metrics.exists() else 0
        if args.no_train and last != args.steps:
            result["runs"][loss] = {"unfinished_at_step": last}
            print(f"{loss:10s} unfinished (step {last} of {args.steps})", flush=True)
            continue
        run = train(loss, args.steps, runs)
        zero_shot = {k[len("eval_"):]: v for k, v in run["row"].items() if k.startswith("eval_")}
        result["runs"][loss] = {"zero_shot": zero_shot, "dense_maskclip": dense_miou(run["checkpoint"], args.n, args.n_val),
                                "train_samples_per_s": run["train_samples_per_s"],
                                "final_loss_terms": {k: v for k, v in run["row"].items() if k.startswith("loss")}}
        print(f"{loss:10s} zero-shot acc {100 * zero_shot.get('acc', float('nan')):5.1f}  "
              f"MaskCLIP mIoU {100 * result['runs'][loss]['dense_maskclip']['mIoU']:5.1f}", flush=True)
    result["cost"] = step_cost(args.rounds, 3)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    r = result["runs"]
    if any("unfinished_at_step" in v for v in r.values()):
        print(f"lightclip_shapes: {result['cost']['ratio_to_infonce']:.2f}x InfoNCE per step; unfinished runs "
              f"-> {args.out}")
        return
    print(f"lightclip_shapes: zero-shot {100 * r['infonce']['zero_shot']['acc']:.1f} -> "
          f"{100 * r['lightclip']['zero_shot']['acc']:.1f}, MaskCLIP mIoU "
          f"{100 * r['infonce']['dense_maskclip']['mIoU']:.1f} -> {100 * r['lightclip']['dense_maskclip']['mIoU']:.1f}, "
          f"{result['cost']['ratio_to_infonce']:.2f}x InfoNCE per step -> {args.out}")


if __name__ == "__main__":
    main()
