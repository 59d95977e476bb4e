"""Sentence-encoder text tower (all-MiniLM-L6-v2) vs CLIP's text tower on ShapesWorld.

Models: shapes-tiny (CLIP text tower, context 32 tokens); shapes-tiny's image tower with a
frozen all-MiniLM-L6-v2 + adapter trained by LLM2CLIP (InfoNCE, image tower trained);
ProCLIP after stage 1 (adapter distilled from shapes-tiny's text tower, original image
tower) and after stage 2 (contrastive + self-distillation).  Training data: the
shapes-tiny recipe's (1-3 object scenes, one of five caption phrasings per step).

Metrics, on the ``test`` split of the shapes-tiny world (seed 0):

* zero-shot: 64-way colour x shape on 512 single-object scenes, prompt
  "a photo of a {colour} {shape}." (a training phrasing);
* paraphrase: the same with five phrasings never seen in training (:data:`PARAPHRASES`),
  mean and per phrasing;
* synonyms: the training phrasing with every colour and shape word replaced by a word
  the captions never use (:data:`SYNONYMS`: "scarlet", "round disc"...);
* retrieval: image->text and text->image R@1 on 512 scenes of 2-3 objects with their
  canonical caption;
* long captions: the same on 256 scenes of 4-8 objects with their long caption
  (several sentences; CLIP's tower reads its first 32 tokens).

Usage: python benchmarks/text_tower.py [--steps 120] [--align-steps 60] [--batch-size 32] [--quick]
Writes benchmarks/results/text_tower.json and prints a summary.  The documented run
(``--steps 40 --align-steps 20 --n-test 256``) took 21 minutes wall on one thread of a busy
2-core machine (about 7 minutes of CPU).
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
from cliplab.data.shapes import COLORS, shapes_tiny_world, task_world  # noqa: E402
from cliplab.train import TrainConfig  # noqa: E402
from cliplab.train.recipes import get_recipe  # noqa: E402
from cliplab.train.text_tower import proclip_align, proclip_tune, train_llm2clip  # noqa: E402

PROMPT = "a photo of a {c} {s}."
PARAPHRASES = [
    "there is a {s} coloured {c}",
    "a {s} whose colour is {c}",
    "the colour of this {s} is {c}",
    "an image showing one {s}, painted {c}",
    "{c} is the colour of the {s} in this picture",
]
SYNONYMS = {
    "red": "scarlet", "orange": "tangerine", "yellow": "golden", "green": "emerald", "cyan": "turquoise",
    "blue": "azure", "purple": "violet", "pink": "rose", "circle": "round disc", "square": "box",
    "triangle": "three-sided shape", "star": "five-pointed shape", "cross": "plus sign",
    "diamond": "rhombus", "hexagon": "six-sided polygon", "ring": "hoop",
}
"""Lexical paraphrases: words the ShapesWorld captions never use, in the training phrasing."""
OUT = Path(__file__).parent / "results" / "text_tower.json"


def zero_shot(bb, images, labels, pairs, template):
    text = bb.encode_texts([template.format(c=c, s=s) for c, s in pairs])   # (C, D)
    img = bb.encode_images(images).features                                 # (N, D)
    return float(((img @ text.T).argmax(1) == labels).mean())


def recall_at_1(bb, images, captions):
    img = bb.encode_images(images).features
    txt = bb.encode_texts(captions)
    sim = img @ txt.T                                                        # (N, N)
    target = np.arange(len(captions))
    return float((sim.argmax(1) == target).mean()), float((sim.argmax(0) == target).mean())


def evaluate(bb, data) -> dict:
    images, labels, pairs = data["zs"]
    out = {"zero_shot": zero_shot(bb, images, labels, pairs, PROMPT)}
    para = {t: zero_shot(bb, images, labels, pairs, t) for t in PARAPHRASES}
    out["paraphrase_mean"] = float(np.mean(list(para.values())))
    out["paraphrase"] = para
    syn = [(SYNONYMS[c], SYNONYMS[s]) for c, s in pairs]
    out["synonyms"] = zero_shot(bb, images, labels, syn, PROMPT)
    i2t, t2i = recall_at_1(bb, *data["retrieval"])
    out.update(retrieval_i2t_r1=i2t, retrieval_t2i_r1=t2i)
    i2t, t2i = recall_at_1(bb, *data["long"])
    out.update(long_i2t_r1=i2t, long_t2i_r1=t2i)
    return out


def make_data(n_zs: int, n_ret: int, n_long: int) -> dict:
    world = shapes_tiny_world(0)
    single = task_world(world, "color-shape")
    images, scenes = single.render_batch("test", range(n_zs))
    shapes = single.shapes_of("test")
    pairs = [(c, s) for c in COLORS for s in shapes]
    labels = np.array([pairs.index((sc.objects[0].color, sc.objects[0].shape)) for sc in scenes])
    multi = world.replace(seed=1, n_objects=(2, 3))
    r_images, r_scenes = multi.render_batch("test", range(n_ret))
    many = world.replace(seed=2, n_objects=(4, 8))
    l_images, l_scenes = many.render_batch("test", range(n_long))
    return {"zs": (images, labels, pairs),
            "retrieval": (r_images, [s.captions[0] for s in r_scenes]),
            "long": (l_images, [s.long_caption for s in l_scenes])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120, help="LLM2CLIP and ProCLIP stage-2 steps")
    ap.add_argument("--align-steps", type=int, default=60, help="ProCLIP stage-1 steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--n-test", type=int, default=512, help="zero-shot and retrieval scenes (long captions: half)")
    ap.add_argument("--quick", action="store_true", help="5 steps each, small test sets (a smoke run)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.align_steps = 5, 5
    n = (64, 64, 32) if args.quick else (args.n_test, args.n_test, args.n_test // 2)
    data = make_data(*n)
    clip = cliplab.load("shapes-tiny")
    train_set = get_recipe("shapes-tiny").train_set
    results, timing = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        def config(steps, name):
            return TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, weight_decay=0.05,
                               warmup_steps=max(1, steps // 10), ckpt_every=0, log_every=max(1, steps // 5),
                               seed=0, out_dir=f"{tmp}/{name}")

        results["clip"] = evaluate(clip, data)
        tic = time.perf_counter()
        bb = train_llm2clip(clip, train_set, config(args.steps, "llm2clip"))
        timing["llm2clip"] = time.perf_counter() - tic
        results["llm2clip"] = evaluate(bb, data)
        tic = time.perf_counter()
        bb = proclip_align(clip, train_set, config(args.align_steps, "proclip1"))
        timing["proclip_stage1"] = time.perf_counter() - tic
        results["proclip_stage1"] = evaluate(bb, data)
        tic = time.perf_counter()
        bb = proclip_tune(bb, train_set, config(args.steps, "proclip2"))
        timing["proclip_stage2"] = time.perf_counter() - tic
        results["proclip"] = evaluate(bb, data)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = {"benchmark": "text_tower", "settings": {**settings, "n_zero_shot": n[0], "n_retrieval": n[1],
                                                       "n_long": n[2], "threads": 1},
              "train_seconds": timing, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = ["zero_shot", "paraphrase_mean", "synonyms", "retrieval_i2t_r1", "retrieval_t2i_r1", "long_i2t_r1", "long_t2i_r1"]
    print(f"{'model':16s} " + " ".join(f"{k:>16s}" for k in keys))
    for name, r in results.items():
        print(f"{name:16s} " + " ".join(f"{r[k]:16.3f}" for k in keys))


if __name__ == "__main__":
    main()
