"""A-CLIP vs InfoNCE at an equal budget on ShapesWorld: zero-shot, dense mIoU, samples/s.

Both objectives train the ``shapes-tiny`` architecture from the same seeded initialisation
on the same data and schedule (steps, batch, lr, warm-up, seed); the recipe's validation
(64-way colour x shape zero-shot on 512 ``val`` scenes) is read from the last metric row,
and dense segmentation of ``shapes:seg`` is scored with MaskCLIP (single resize, the
probability threshold chosen on ``train`` scenes as ``benchmarks/segment_shapes.py`` does).
samples/s is the Trainer's mean over the logged windows after the first.

Usage: python benchmarks/aclip_shapes.py [--steps 600] [--batch-size 64] [--lr 1e-3]
           [--warmup 50] [--seed 0] [--losses infonce,aclip] [--runs runs/aclip_shapes]
       python benchmarks/aclip_shapes.py --cost-steps 10     (CPU s/step only: results/aclip_shapes_cost.json)
Writes benchmarks/results/aclip_shapes.json and prints one line per objective.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import cliplab
from cliplab.dense import segment
from cliplab.eval.metrics import mean_iou
from cliplab.train.recipes import get_recipe, run_recipe

RESULTS = Path(__file__).resolve().parent / "results" / "aclip_shapes.json"
TEMPLATE = "a photo of a {c}."
BACKGROUND = ["background", "plain background", "gradient background", "striped background", "noisy background"]
THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)


def dense_miou(bb, n: int, n_val: int) -> dict:
    """MaskCLIP mIoU on ``shapes:seg`` test scenes; the threshold chosen on ``train`` scenes."""
    from cliplab.data.datasets import load_dataset

    test, val = load_dataset("shapes:seg", "test", n=n), load_dataset("shapes:seg", "train", n=n_val)
    classes = [BACKGROUND, *list(test.classnames)[1:]]
    n_cls = len(test.classnames)

    def masks(ds, thd=None):
        probs = segment(bb, list(ds.items), classes, method="maskclip", templates=TEMPLATE, return_probs=True).probs
        out = {}
        for t in THRESHOLDS if thd is None else (thd,):
            pred = []
            for p in probs:
                m = p.argmax(0).astype(np.int32)
                m[p.max(0) < t] = 0
                pred.append(m)
            out[t] = mean_iou(pred, list(ds.masks), n_cls, ignore_index=ds.ignore_index)
        return out

    thd = max(masks(val).items(), key=lambda kv: (kv[1]["mIoU"], -kv[0]))[0]
    m = masks(test, thd)[thd]
    return {"dataset": test.name, "n": n, "prob_thd": thd, "mIoU": float(m["mIoU"]), "aAcc": float(m["aAcc"])}


def cpu_cost(losses: list, steps: int, batch_size: int, rounds: int = 2) -> dict:
    """CPU seconds per training step of each objective (``time.process_time``, one thread), interleaved rounds.

    CPU time rather than wall time: on a shared machine it does not count other processes.
    """
    import tempfile

    from cliplab.train import Trainer, init_model

    out = {loss: [] for loss in losses}
    for _ in range(rounds):
        for loss in losses:
            recipe = get_recipe("shapes-tiny", loss=loss, steps=steps + 1, batch_size=batch_size, ckpt_every=0,
                                log_every=steps + 1)
            built = init_model(recipe.model_cfg, recipe.preprocess_cfg, loss=loss, seed=0)
            with tempfile.TemporaryDirectory() as tmp:
                recipe.config.out_dir = tmp
                trainer = Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config,
                                  progress=False)
                trainer.fit(stop_at=1)                       # warm-up step (first-call costs)
                t0 = time.process_time()
                trainer.fit(resume=True)
                out[loss].append((time.process_time() - t0) / steps)
    return {loss: {"cpu_s_per_step": min(v), "samples_per_cpu_s": batch_size / min(v)} for loss, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--losses", default="infonce,aclip")
    ap.add_argument("--n", type=int, default=40, help="shapes:seg test scenes")
    ap.add_argument("--n-val", type=int, default=16, help="shapes:seg train scenes for the threshold")
    ap.add_argument("--runs", default="runs/aclip_shapes", help="training output folders")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--cost-steps", type=int, default=0, help="only measure CPU s/step over this many steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_path = Path(args.out)
    if args.cost_steps:
        out_path = out_path.with_name(out_path.stem + "_cost.json")
        cost = cpu_cost(args.losses.split(","), args.cost_steps, args.batch_size)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"benchmark": "aclip_shapes cpu cost", "steps": args.cost_steps,
                                        "batch_size": args.batch_size, "torch_threads": 1, **cost}, indent=2) + "\n")
        print("aclip_shapes: CPU s/step " + ", ".join(f"{k} {v['cpu_s_per_step']:.3f}" for k, v in cost.items()))
        return
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.update({"benchmark": "aclip_shapes", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                   "warmup_steps": args.warmup, "seed": args.seed, "torch_threads": 1})
    rows = result.setdefault("results", {})
    for loss in args.losses.split(","):
        recipe = get_recipe("shapes-tiny", loss=loss, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=args.warmup, seed=args.seed, ckpt_every=0, log_every=25,
                            out_dir=str(Path(args.runs) / loss))
        t0 = time.perf_counter()
        last = run_recipe(recipe, progress=False)
        seconds = time.perf_counter() - t0
        logged = [json.loads(line) for line in (Path(args.runs) / loss / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in logged[1:]]
        bb = cliplab.load(f"local-dir:{last['checkpoint']}")
        rows[loss] = {"zero_shot_val": {k[5:]: v for k, v in last.items() if k.startswith("eval_")},
                      "dense_maskclip": dense_miou(bb, args.n, args.n_val),
                      "samples_per_s": float(np.mean(rates)), "train_seconds": seconds, "final_loss": last["loss"]}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        r = rows[loss]
        print(f"aclip_shapes: {loss:8s} zero-shot {r['zero_shot_val']}  maskclip mIoU "
              f"{100 * r['dense_maskclip']['mIoU']:.1f}  {r['samples_per_s']:.0f} samples/s", flush=True)


if __name__ == "__main__":
    main()
