"""Trainer throughput on the shapes-tiny recipe against a plain open_clip training loop.

Every contender trains the recipe's model (same init, config, batch 128, AdamW, clip
1.0) for ``--steps`` steps from step 0, and is timed from its first step to the end of
its last checkpoint write; building the model and the data set is outside the clock.
Contenders run once per round, in an order rotated each round (``_interleave.py``), and
ratios are taken within a round: median and min-max over ``--rounds``.

- ``trainer``: ``Trainer.fit`` with ``num_workers=--workers`` (ShapesWorld rendered and
  captions tokenised in a DataLoader worker process while the model trains; that
  process is started inside the clock), metrics rows, and checkpoints every
  ``--ckpt-every`` steps written in the background (the last one waited for);
- ``trainer_inline``: the same with ``num_workers=0`` (rendering in the training process);
- ``plain``: a hand-written open_clip loop that renders and tokenises each batch in the
  training process (the same ``get_batch`` render and tokenizer as the Trainer), then
  forward, ``ClipLoss``, backward, clip, AdamW step, and ``torch.save`` of the model and
  optimizer every ``--ckpt-every`` steps;
- ``plain_prerendered``: the same loop over batches rendered and tokenised before its
  clock starts (an upper bound: no data cost at all).

Usage: python benchmarks/train_throughput.py [--steps 30] [--rounds 3] [--workers 1]
Writes benchmarks/results/train_throughput.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from cliplab.models.transforms import images_to_tensor
from cliplab.train.datasets import caption_choice, global_batch_indices
from cliplab.train.recipes import get_recipe, init_model
from cliplab.train.trainer import ADAMW_BETAS, ADAMW_EPS, Trainer, parameter_groups

from _interleave import fmt, interleave, ratio, rates

RESULTS = Path(__file__).parent / "results"


def trainer_run(steps: int, workers: int, ckpt_every: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = get_recipe("shapes-tiny", steps=steps, eval_every=0, ckpt_every=ckpt_every,
                            num_workers=workers, out_dir=tmp)
        built = init_model(recipe.model_cfg, recipe.preprocess_cfg, seed=0)
        trainer = Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config,
                          model_cfg=built.model_cfg, progress=False)
        t0 = time.perf_counter()
        trainer.fit()
        return time.perf_counter() - t0


def _batch(ds, built, bs: int, step: int):
    idx = global_batch_indices(len(ds), bs, 0, step)
    images, captions = ds.get_batch(idx)
    choice = caption_choice([len(c) for c in captions], 0, step)
    return (images_to_tensor(images, built.preprocess, None),            # (B, 3, H, W)
            built.tokenizer([c[k] for c, k in zip(captions, choice)]))   # (B, T)


def plain_run(steps: int, ckpt_every: int, prerendered: bool) -> float:
    from open_clip.loss import ClipLoss

    recipe = get_recipe("shapes-tiny")
    built = init_model(recipe.model_cfg, recipe.preprocess_cfg, seed=0)
    model, bs, ds = built.model.train(), recipe.config.batch_size, recipe.train_set
    ready = [_batch(ds, built, bs, step) for step in range(steps)] if prerendered else None
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    loss_fn = ClipLoss()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for step in range(steps):
            images, texts = ready[step] if prerendered else _batch(ds, built, bs, step)
            img_f, txt_f, scale = model(images, texts)
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % ckpt_every == 0 or step + 1 == steps:
                torch.save({"step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict()},
                           os.path.join(tmp, f"step_{step + 1}.pt"))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="the Trainer's data-loading processes")
    ap.add_argument("--ckpt-every", type=int, default=10)
    args = ap.parse_args()
    s, c = args.steps, args.ckpt_every
    contenders = {"trainer": lambda: trainer_run(s, args.workers, c),
                  "trainer_inline": lambda: trainer_run(s, 0, c),
                  "plain": lambda: plain_run(s, c, prerendered=False),
                  "plain_prerendered": lambda: plain_run(s, c, prerendered=True)}
    warmup = {"trainer": lambda: trainer_run(3, args.workers, 3), "plain": lambda: plain_run(3, 3, False)}
    load_before = os.getloadavg()
    times = interleave(contenders, args.rounds, warmup)
    samples = s * get_recipe("shapes-tiny").config.batch_size
    res = {"steps": s, "batch_size": samples // s, "ckpt_every": c, "workers": args.workers,
           "rounds": args.rounds, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
           "times_s": times, "samples_per_s": rates(times, samples),
           "trainer_vs_plain": ratio(times, "trainer", "plain"),
           "trainer_vs_plain_prerendered": ratio(times, "trainer", "plain_prerendered"),
           "trainer_vs_trainer_inline": ratio(times, "trainer", "trainer_inline"),
           "trainer_inline_vs_plain": ratio(times, "trainer_inline", "plain")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(res, indent=2))
    print(f"samples/s over {s} steps x {args.rounds} rounds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in res["samples_per_s"].items()))
    for name in ("trainer_vs_plain", "trainer_vs_plain_prerendered", "trainer_vs_trainer_inline",
                 "trainer_inline_vs_plain"):
        print(f"  {name}: {fmt(res[name])}")


if __name__ == "__main__":
    main()
