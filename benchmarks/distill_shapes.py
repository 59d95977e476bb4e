"""Reinforced training (MobileCLIP) and distillation (DCLIP, DC-CLIP) of a half-size student on ShapesWorld.

Part ``reinforce``: the teacher is the bundled shapes-tiny (ViT 64 px / patch 8, width 128,
3 + 3 layers); the student halves its widths and depths (width 64, 2 + 2 layers, 2 heads).
Source: the first 3,200 single-object and 800 two-or-three-object training scenes of the
shapes-tiny worlds (the recipe's 80/20 mix).  ``cliplab reinforce`` stores K = 5
augmentations per image; then the student trains for the same number of steps and batch
size (seed 0) with

- ``infonce``: InfoNCE on the source scenes (one of the five phrasings per step, LaCLIP);
- ``infonce-aug``: ``mobileclip-dr`` with lambda = 0 on the reinforced shards (the same
  replayed crops and captions, no teacher term): what the augmentations alone do;
- ``mobileclip-dr``: lambda = 0.75, real + synthetic caption batches (the reference loss);
- ``mobileclip-dr-mix``: lambda = 0.75, one caption per image, synthetic with p = 0.5.

Scored by 64-way colour x shape zero-shot accuracy on 512 single-object ``val`` scenes
(the recipe's validation) and 512 ``test`` scenes (seen and held-out compositions),
and by training throughput (samples/s of the Trainer's metric rows, the first row
dropped; data loading included, one thread).

Part ``dcclip``: a bilingual student (the same half-size student, text context 77 for the
Chinese captions) distilled from shapes-tiny with DC-CLIP (:mod:`cliplab.train.distill`):
stage 1 (``DCCLIPStage1``, Chinese captions with their parallel English canonical caption)
for half the steps, stage 2 (``infonce`` on English + Chinese captions) for the other
half; against the same student trained with ``infonce`` on the bilingual captions for all
the steps.  Zero-shot (64-way, 512 ``val`` scenes) with English prompts ("a photo of a red
circle.") and Chinese prompts ("一张红色圆形的照片。").

Usage: OMP_NUM_THREADS=1 python benchmarks/distill_shapes.py [--part reinforce|dcclip|all]
[--steps 400] [--runs infonce,mobileclip-dr] [--quick].  Writes
benchmarks/results/distill_shapes.json (parts and runs merged, saved after every run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.data.shapes import shapes_tiny_world  # noqa: E402
from cliplab.train import TrainConfig, Trainer, init_model  # noqa: E402
from cliplab.train.datasets import ConcatSet, ShapesTrainSet  # noqa: E402
from cliplab.train.distill import DCCLIPStage1  # noqa: E402
from cliplab.train.losses import get_loss  # noqa: E402
from cliplab.train.recipes import SHAPES_TINY_MODEL, ShapesZeroShot  # noqa: E402
from cliplab.train.reinforce import ReinforcedSet, reinforce  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distill_shapes.json"

STUDENT = copy.deepcopy(SHAPES_TINY_MODEL)
STUDENT["vision_cfg"].update(width=64, layers=2, head_width=32)
STUDENT["text_cfg"].update(width=64, heads=2, layers=2)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def source_set(n_single: int, n_multi: int, seed: int = 0, **options):
    world = shapes_tiny_world(seed).replace(split_sizes={"train": n_single})
    multi = shapes_tiny_world(seed).replace(seed=seed + 1, n_objects=(2, 3), split_sizes={"train": n_multi})
    return ConcatSet(ShapesTrainSet(world, "train", **options), ShapesTrainSet(multi, "train", **options))


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, ensure_ascii=False))


def train(name, train_set, objective, steps, batch, out, evaluators, lr=1e-3, model_cfg=None, built=None):
    if built is None:
        built = init_model(model_cfg or STUDENT, loss=objective.name if objective.name in
                           ("infonce", "mobileclip-dr", "mobileclip-dr-mix") else "infonce", seed=0)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, weight_decay=0.1, warmup_steps=min(50, steps // 10),
                      seed=0, ckpt_every=0, log_every=max(1, steps // 10), out_dir=str(out / name))
    tic = time.perf_counter()
    Trainer(built.model, built.tokenizer, built.preprocess, train_set, cfg, objective=objective,
            progress=False).fit()
    wall = time.perf_counter() - tic
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    speed = float(np.mean([r["samples_per_s"] for r in rows[1:]])) if len(rows) > 1 else rows[0]["samples_per_s"]
    built.model.eval()
    scores = {k: ev(built.model) for k, ev in evaluators.items()}
    res = {"steps": steps, "batch_size": batch, "wall_s": round(wall, 1), "samples_per_s": round(speed, 1),
           "final_loss": rows[-1]["loss"], **{f"{k}_{m}": round(v, 4) for k, s in scores.items() for m, v in s.items()
                                              if m in ("acc", "acc_seen", "acc_heldout")}}
    print(f"  {name:18s} " + "  ".join(f"{k} {v:.3f}" for k, v in res.items() if k.endswith("_acc"))
          + f"  {res['samples_per_s']:.0f} samples/s  {wall:.0f} s", flush=True)
    built.model.train()
    return res, built


def part_reinforce(args, out: Path, results: dict) -> dict:
    world = shapes_tiny_world(0)
    evaluators = {"val": ShapesZeroShot(world, "val", n=args.n_eval), "test": ShapesZeroShot(world, "test", n=args.n_eval)}
    teacher = cliplab.load("shapes-tiny")
    src = source_set(args.n_single, args.n_multi)
    tic = time.perf_counter()
    reinforce(src, [teacher], out / "shards", augmentations=args.k, shard_size=1000, progress=False)
    reinforce_s = time.perf_counter() - tic
    size_mb = sum(p.stat().st_size for p in (out / "shards").glob("*.tar")) / 2**20
    print(f"reinforced {len(src)} images x {args.k} augmentations in {reinforce_s:.0f} s ({size_mb:.1f} MB)",
          flush=True)
    rs = ReinforcedSet(out / "shards")
    student = init_model(STUDENT, seed=0).model
    result = results.setdefault("reinforce", {"runs": {}})
    result.update({"teacher": {"params": n_params(teacher.model),
                          **{f"{k}_{m}": round(v, 4) for k, ev in evaluators.items()
                             for m, v in ev(teacher.model).items() if m in ("acc", "acc_seen", "acc_heldout")}},
              "student_params": n_params(student), "n_images": len(src), "augmentations": args.k,
              "reinforce_s": round(reinforce_s, 1), "shards_mb": round(size_mb, 1), "command": " ".join(sys.argv)})
    print(f"teacher {result['teacher']['params'] / 1e6:.2f}M params val {result['teacher']['val_acc']:.3f}; "
          f"student {result['student_params'] / 1e6:.2f}M params", flush=True)
    runs = {"infonce": (src, get_loss("infonce")),
            "infonce-aug": (rs, get_loss("mobileclip-dr", distill_weight=0.0)),
            "mobileclip-dr": (rs, get_loss("mobileclip-dr")),
            "mobileclip-dr-mix": (rs, get_loss("mobileclip-dr-mix"))}
    for name in args.runs.split(","):
        data, objective = runs[name]
        result["runs"][name], _ = train(name, data, objective, args.steps, args.batch, out, evaluators)
        base = result["runs"].get("infonce", {}).get("samples_per_s")
        for r in result["runs"].values():
            if base:
                r["step_cost_vs_infonce"] = round(base / r["samples_per_s"] - 1, 3)
        if not args.quick:
            save(results)
    return result


def part_dcclip(args, out: Path, results: dict) -> dict:
    world = shapes_tiny_world(0)
    evaluators = {f"val_{lang}": ShapesZeroShot(world, "val", n=args.n_eval, language=lang) for lang in ("en", "zh")}
    teacher = cliplab.load("shapes-tiny")
    cfg = copy.deepcopy(STUDENT)
    cfg["text_cfg"]["context_length"] = 77                     # the longest Chinese caption takes 76 tokens
    result = results.setdefault("dcclip", {"runs": {}})
    result.update({"teacher": {k: round(v["acc"], 4) for k, v in
                               ((k, ev(teacher.model)) for k, ev in evaluators.items())},
                   "command": " ".join(sys.argv)})
    print(f"teacher zero-shot {result['teacher']}", flush=True)
    half = args.steps // 2
    parallel = source_set(args.n_single, args.n_multi, languages=("zh",), parallel=True)
    bilingual = source_set(args.n_single, args.n_multi, languages=("en", "zh"))
    s1, built = train("dcclip-stage1", parallel, DCCLIPStage1(teacher), half, args.batch, out, evaluators,
                      model_cfg=cfg)
    s2, _ = train("dcclip-stage2", bilingual, get_loss("infonce"), args.steps - half, args.batch, out, evaluators,
                  built=built)
    base, _ = train("infonce-bilingual", bilingual, get_loss("infonce"), args.steps, args.batch, out, evaluators,
                    model_cfg=cfg)
    result["runs"] = {"dcclip-stage1": s1, "dcclip (stage 1 + 2)": s2, "infonce-bilingual": base}
    if not args.quick:
        save(results)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["reinforce", "dcclip", "all"], default="all")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--n-single", type=int, default=3200)
    p.add_argument("--n-multi", type=int, default=800)
    p.add_argument("--n-eval", type=int, default=512, help="zero-shot scenes per split (default: 512)")
    p.add_argument("--runs", default="infonce,infonce-aug,mobileclip-dr,mobileclip-dr-mix",
                   help="runs of the reinforce part, comma-separated (default: all four)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, 100 images, 64 eval scenes")
    p.add_argument("--out", help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_single, args.n_multi, args.n_eval = 10, 80, 20, 64
    torch.set_num_threads(1)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        if args.part in ("reinforce", "all"):
            part_reinforce(args, out, results)
        if args.part in ("dcclip", "all"):
            part_dcclip(args, out, results)
    print(json.dumps(results, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
