"""Long-CLIP on ShapesWorld: long-caption retrieval against truncation, short-caption zero-shot kept.

The bundled shapes-tiny model reads 32 tokens; a ShapesWorld long caption
(:attr:`cliplab.data.shapes.Scene.long_caption`) has 28-30 tokens with one object, 64-77
with two and 88-109 with three, so "long" here means longer than 32 tokens.  Rows:

- ``shapes-tiny (truncated at 32)``: the model as shipped; long captions are cut at 32 tokens;
- ``stretched, not fine-tuned``: :func:`cliplab.surgery.stretch_positions` (keep 20,
  interpolate the rest 4x: 68 positions), no training;
- ``Long-CLIP``: :func:`cliplab.train.finetune_longclip`, the ``longclip`` objective (long
  captions vs image features, short captions vs their top-32 principal components);
- ``long captions only``: the same fine-tuning without the short-caption term (no PCM),
  the paper's ablation direction.

Fine-tuning data: the ``train`` split of world seed 2 (1-3 objects, 64 px; shapes-tiny
trained on seeds 0 and 1).  Metrics, on held-out ``test`` scenes:

- long-caption text -> image R@1/R@5 on ``--n-test`` scenes of 2-3 objects of world seed 2
  (every caption longer than 32 tokens; three-object captions are also cut at 68);
- short-caption text -> image R@1 on the same scenes, with the scene's first caption rewrite;
- zero-shot colour x shape accuracy (64-way, "a photo of a {colour} {shape}.") on 512
  single-object ``test`` scenes of the shapes-tiny world (the model card's protocol).

Usage: python benchmarks/longclip_shapes.py [--steps 50] [--batch-size 32] [--lr 1e-5]
       [--runs longclip,long-only] [--threads 1]
Writes benchmarks/results/longclip_shapes.json and prints a one-line summary.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "longclip_shapes.json"

RUNS = {"longclip": {"pca_dim": 32, "short_weight": 1.0},
        "long-only": {"pca_dim": None, "short_weight": 0.0}}
LABELS = {"longclip": "Long-CLIP (PCM)", "long-only": "long captions only (no short term, no PCM)"}


def scores(backbone, data, zeroshot) -> dict:
    """Long- and short-caption retrieval on ``data`` and zero-shot accuracy."""
    import warnings

    from cliplab.eval.metrics import retrieval_recall

    images, longs, shorts = data
    img = backbone.encode_images(images).features                              # (N, D)
    t2i = np.arange(len(longs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                        # truncation is the point
        long_r = retrieval_recall(img, backbone.encode_texts(longs), t2i, ks=(1, 5))
    short_r = retrieval_recall(img, backbone.encode_texts(shorts), t2i, ks=(1, 5))
    return {"long_t2i_r1": long_r["image_retrieval_recall@1"], "long_t2i_r5": long_r["image_retrieval_recall@5"],
            "long_i2t_r1": long_r["text_retrieval_recall@1"],
            "short_t2i_r1": short_r["image_retrieval_recall@1"],
            "zeroshot_acc": zeroshot(backbone.model)["acc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--runs", default="longclip,long-only", help=f"comma-separated: {', '.join(RUNS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import cliplab
    from cliplab.data.shapes import shapes_tiny_world
    from cliplab.surgery import stretch_positions
    from cliplab.surgery.longclip import finetune_longclip, longclip_world
    from cliplab.train.recipes import ShapesZeroShot

    base = cliplab.load("shapes-tiny")
    test_world = longclip_world(n_objects=(2, 3))
    images, scenes = test_world.render_batch("test", range(args.n_test))
    data = (images, [s.long_caption for s in scenes], [s.captions[0] for s in scenes])
    tok = [len(base.tokenizer.encode(c)) + 2 for c in data[1]]                  # with start and end
    zeroshot = ShapesZeroShot(shapes_tiny_world(0), "test", n=512)

    rows = [{"method": "shapes-tiny (truncated at 32)", "context": base.context_length,
             **scores(base, data, zeroshot)}]
    stretched = stretch_positions(base)
    rows.append({"method": "stretched, not fine-tuned", "context": stretched.context_length,
                 **scores(stretched, data, zeroshot)})
    for name in [r for r in args.runs.split(",") if r]:
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            tuned = finetune_longclip(base, args.steps, out, batch_size=args.batch_size, lr=args.lr,
                                      log_every=max(args.steps // 10, 1), **RUNS[name])
            last = json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])
        rows.append({"method": LABELS[name], "context": tuned.context_length, **scores(tuned, data, zeroshot),
                     "train_s": round(time.perf_counter() - tic, 1),
                     "final_loss": {k: v for k, v in last.items() if k.startswith("loss")}})

    out = {"benchmark": "longclip_shapes", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "threads": args.threads, "n_test": args.n_test,
           "test_caption_tokens": {"min": min(tok), "mean": float(np.mean(tok)), "max": max(tok),
                                   "share_over_68": float(np.mean(np.array(tok) > 68))},
           "command": "python benchmarks/longclip_shapes.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out",)),
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    first, last = rows[0], rows[-1]
    print(f"long-caption R@1 {first['long_t2i_r1']:.3f} (truncated) -> "
          + ", ".join(f"{r['long_t2i_r1']:.3f} ({r['method']})" for r in rows[1:])
          + f"; zero-shot {first['zeroshot_acc']:.3f} -> {last['zeroshot_acc']:.3f}")


if __name__ == "__main__":
    main()
