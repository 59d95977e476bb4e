"""CLIP-MoE upcycling vs the dense model at equal active parameters, on ShapesWorld.

Starting point: the bundled shapes-tiny (dense, 3 + 3 blocks).  Training data: the
shapes-tiny recipe's own training set (single- and multi-object scenes of the world it
was trained on).  Every arm trains only MLP-side weights (MLPs, or experts + routers),
with InfoNCE through the one Trainer, lr ``--lr``, batch ``--batch-size``, seed 0:

- ``dense``: shapes-tiny as shipped (no training);
- ``dense-ft``: the dense MLPs fine-tuned for E x S_e + S steps, the whole step budget of
  the CLIP-MoE arm (multiplet + MoE phase);
- ``upcycle-top1``: plain sparse upcycling (E copies of the dense MLP), top-1 routing,
  S steps of router + experts with the load-balancing loss;
- ``clip-moe-top1``: the diversified multiplet (k-means of ``--n-samples`` (1,024) training items into E
  clusters, S_e steps of MLP fine-tuning per cluster), upcycled with top-1 routing (the
  same active parameters per token as the dense model, plus the router), then S steps;
- ``clip-moe-top2``: the same multiplet with top-2 routing (the paper's default; twice the
  active MLP parameters), S steps.

Metrics (``benchmarks/shapes_tiny_quality.py``'s protocol): 64-way colour x shape
zero-shot on ``--n-test`` (600) single-object test scenes (seen and held-out compositions), 8-way
shape and colour, and text<->image R@1/R@5 on ``--n-test``/2 test pairs of 1-3 object scenes.

Usage: OMP_NUM_THREADS=1 python benchmarks/moe_shapes.py [--experts 4] [--expert-steps 20]
           [--steps 40] [--quick]
Writes benchmarks/results/moe_shapes.json and prints one line per arm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

import cliplab  # noqa: E402
from cliplab.surgery.moe import diversified_multiplet, finetune_mlp, train_moe, upcycle  # noqa: E402
from cliplab.train import TrainConfig  # noqa: E402
from cliplab.train.recipes import get_recipe  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from shapes_tiny_quality import evaluate  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "moe_shapes.json"


def params(bb) -> dict:
    """Total and per-token active parameters (an MoE block counts top_k experts + its router)."""
    from cliplab.models.moe import moe_modules

    total = sum(p.numel() for p in bb.model.parameters())
    active = total
    for mods in moe_modules(bb.model).values():
        for m in mods:
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            active -= (m.num_experts - m.top_k) * per_expert
    return {"params_total": total, "params_active": active}


def expert_usage(bb, images) -> list:
    """Per visual MoE block, the share of tokens whose top-1 expert is e (E values)."""
    from cliplab.models.moe import moe_modules
    from cliplab.models.transforms import images_to_tensor

    blocks = moe_modules(bb.model)["visual"]
    for m in blocks:
        m.train()  # record the router logits
    with torch.no_grad():
        bb.model.visual(images_to_tensor(images, None, bb.preprocess_cfg))
    usage = []
    for m in blocks:
        m.eval()
        top1 = torch.cat(m.pop_router_logits()).argmax(-1)
        usage.append([round(float(v), 3) for v in torch.bincount(top1, minlength=m.num_experts) / len(top1)])
    return usage


def summary(metrics: dict) -> dict:
    return {"zs64_seen": metrics["colour_shape_64way_seen"], "zs64_heldout": metrics["colour_shape_64way_heldout"],
            "shape8": metrics["shape_8way"], "colour8": metrics["colour_8way"],
            "t2i_R@1": metrics["text_to_image"]["R@1"], "i2t_R@1": metrics["image_to_text"]["R@1"],
            "t2i_R@5": metrics["text_to_image"]["R@5"], "i2t_R@5": metrics["image_to_text"]["R@5"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes-tiny")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--expert-steps", type=int, default=20, help="S_e: steps per multiplet member")
    ap.add_argument("--steps", type=int, default=40, help="S: steps of the MoE phase")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n-samples", type=int, default=1024, help="training items clustered for the multiplet")
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--arms", default="dense,dense-ft,clip-moe-top1,clip-moe-top2,upcycle-top1",
                    help="comma-separated arms to run (the JSON is rewritten after each)")
    ap.add_argument("--quick", action="store_true", help="a few steps, for a smoke run")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.expert_steps, args.steps, args.n_samples, args.n_test = 3, 4, 256, 200
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    E, S_e, S = args.experts, args.expert_steps, args.steps

    bb = cliplab.load(args.model)
    train_set = get_recipe("shapes-tiny").train_set
    work = tempfile.mkdtemp(prefix="moe-shapes-")

    def config(steps, name, seed=0):
        return TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, weight_decay=0.1,
                           warmup_steps=min(20, steps // 5), seed=seed, ckpt_every=0, log_every=25,
                           out_dir=f"{work}/{name}")

    arms = {}

    def record(name, model, seconds, **extra):
        arms[name] = {**summary(evaluate(model, n=args.n_test, n_pairs=args.n_test // 2)), **params(model),
                      "train_seconds": round(seconds, 1), **extra}
        print(f"{name:>14}: " + " ".join(f"{k} {v:.3f}" for k, v in arms[name].items()
                                          if isinstance(v, float) and k != "train_seconds"), flush=True)

    def write():
        out = {"model": args.model, "experts": E, "expert_steps": S_e, "moe_steps": S,
               "batch_size": args.batch_size, "lr": args.lr, "n_samples": args.n_samples, "n_test": args.n_test,
               "threads": torch.get_num_threads(),
               "trainable": "MLPs (dense) / routers + experts (MoE); attention, embeddings, LayerNorms frozen",
               "arms": arms}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")

    wanted = args.arms.split(",")
    if "dense" in wanted:
        record("dense", bb, 0.0)
        write()
    if "dense-ft" in wanted:
        tic = time.perf_counter()
        record("dense-ft", finetune_mlp(bb, train_set, config(E * S_e + S, "dense-ft")),
               time.perf_counter() - tic, steps=E * S_e + S)
        write()
    tops = [k for k in (1, 2) if f"clip-moe-top{k}" in wanted]
    if tops:
        tic = time.perf_counter()
        mp = diversified_multiplet(bb, train_set, config(S_e, "multiplet"), experts=E, n_samples=args.n_samples)
        t_multiplet = time.perf_counter() - tic
        sizes = [int((mp.labels == e).sum()) for e in range(E)]
        for k in tops:
            tic = time.perf_counter()
            moe = train_moe(upcycle(bb, mp.experts, top_k=k), train_set, config(S, f"clip-moe-top{k}"))
            record(f"clip-moe-top{k}", moe, t_multiplet + time.perf_counter() - tic, steps=E * S_e + S,
                   cluster_sizes=sizes, visual_expert_usage=expert_usage(moe, [train_set[i][0] for i in range(256)]))
            write()
    if "upcycle-top1" in wanted:
        tic = time.perf_counter()
        copies = train_moe(upcycle(bb, E, top_k=1), train_set, config(S, "upcycle-top1"))
        record("upcycle-top1", copies, time.perf_counter() - tic, steps=S,
               visual_expert_usage=expert_usage(copies, [train_set[i][0] for i in range(256)]))
        write()
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
