"""Trainer throughput on the shapes-tiny recipe against a plain open_clip training loop.

Both run the same model config, batch size, optimiser and loss for ``--steps`` steps
after ``--warmup`` untimed steps:

- cliplab: ``Trainer.fit`` on the recipe's training set (ShapesWorld rendered on the
  fly, one caption sampled per image, metrics and a tqdm bar);
- plain: a hand-written open_clip loop (forward, ``ClipLoss``, backward, clip, AdamW
  step) over the same batches, rendered and tokenised beforehand.

Reported as samples/s and the ratio cliplab / plain (median of ``--repeats``), plus
ShapesWorld render rate at 64 px.

Usage: python benchmarks/train_throughput.py [--steps 30] [--repeats 3]
Writes benchmarks/results/train_throughput.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cliplab.train.datasets import caption_choice, global_batch_indices
from cliplab.train.recipes import get_recipe, init_model
from cliplab.models.transforms import images_to_tensor
from cliplab.train.trainer import ADAMW_BETAS, ADAMW_EPS, Trainer, parameter_groups

RESULTS = Path(__file__).parent / "results"


def cliplab_run(steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = get_recipe("shapes-tiny", steps=warmup + steps, eval_every=0, ckpt_every=0,
                            log_every=warmup + steps, out_dir=tmp)
        built = init_model(recipe.model_cfg, recipe.preprocess_cfg, seed=0)
        trainer = Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config,
                          model_cfg=built.model_cfg, progress=False)
        trainer.fit(stop_at=warmup)
        t0 = time.perf_counter()
        trainer.fit(resume=True)
        return recipe.config.batch_size * steps / (time.perf_counter() - t0)


def plain_run(steps: int, warmup: int) -> float:
    from open_clip.loss import ClipLoss

    recipe = get_recipe("shapes-tiny")
    built = init_model(recipe.model_cfg, recipe.preprocess_cfg, seed=0)
    model, bs, ds = built.model.train(), recipe.config.batch_size, recipe.train_set
    batches = []
    for step in range(warmup + steps):
        idx = global_batch_indices(len(ds), bs, 0, step)
        items = [ds[int(i)] for i in idx]
        choice = caption_choice([len(c) for _, c in items], 0, step)
        images = images_to_tensor([im for im, _ in items], built.preprocess, None)
        batches.append((images, built.tokenizer([c[k] for (_, c), k in zip(items, choice)])))
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    loss_fn = ClipLoss()
    t0 = 0.0
    for step, (images, texts) in enumerate(batches):
        if step == warmup:
            t0 = time.perf_counter()
        img_f, txt_f, scale = model(images, texts)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return bs * steps / (time.perf_counter() - t0)


def render_rate(n: int = 2000) -> float:
    from cliplab.data.shapes import shapes_tiny_world

    world = shapes_tiny_world(0)
    t0 = time.perf_counter()
    world.render_batch("train", range(n))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ours, plain = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        ours.append(cliplab_run(args.steps, args.warmup))
        plain.append(plain_run(args.steps, args.warmup))
    ratios = [a / b for a, b in zip(ours, plain)]
    res = {"steps": args.steps, "batch_size": 128, "threads": torch.get_num_threads(),
           "cliplab_samples_per_s": statistics.median(ours), "plain_samples_per_s": statistics.median(plain),
           "ratio_median": statistics.median(ratios), "ratios": ratios,
           "render_images_per_s_64px_1obj": render_rate()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(res, indent=2))
    print(f"Trainer {res['cliplab_samples_per_s']:.0f} samples/s vs plain open_clip loop "
          f"{res['plain_samples_per_s']:.0f} samples/s: ratio {res['ratio_median']:.2f} "
          f"(data rendered on the fly vs pre-made); ShapesWorld renders "
          f"{res['render_images_per_s_64px_1obj']:.0f} images/s at 64 px")


if __name__ == "__main__":
    main()
