"""Long-caption compression on ShapesWorld: SoftPromptComp and Nano-Capsulator against truncation and Long-CLIP.

The protocol of ``benchmarks/longclip_shapes.py``, so the numbers are comparable: the
bundled shapes-tiny model (32-token context), long captions of the first ``--n-test``
``test`` scenes of the Long-CLIP world (seed 2, 2-3 objects: 64-112 tokens, all cut at
32), text -> image R@1/R@5 against those scenes' images.  Rows:

- ``truncation``: the model as shipped; the tokenizer cuts the caption at 32 tokens;
- ``SoftPromptComp``: :func:`cliplab.generative.softpromptcomp.train_softpromptcomp`
  (k soft tokens, ``--steps`` steps of batch 64 on the world's ``train`` split, towers frozen);
- ``Nano-Capsulator``: :class:`cliplab.generative.capsulator.Capsulator` with the
  sentence-mean target, its common direction fitted on ``--n-fit`` ``train`` captions;
  capsules (real text, <= 32 tokens) read by the plain text tower;
- ``Nano-Capsulator, SoftPromptComp target``: the same search scored against the
  trained compressor's features;
- ``Nano-Capsulator without fit``: the sentence-mean target without the fitted common
  direction (the ablation of ``fit``);
- ``Long-CLIP`` rows: read from ``benchmarks/results/longclip_shapes.json`` (same test
  scenes; fine-tuning the whole model takes 8-17 minutes here, so it is not rerun).

Usage: python benchmarks/compress_shapes.py [--steps 300] [--k 8] [--n-test 500] [--n-fit 2000]
       [--quick] [--figure docs/generative/compress_r1.png]
Writes benchmarks/results/compress_shapes.json (with ``--quick`` only given ``--out``) and
prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compress_shapes.json"
LONGCLIP = ROOT / "benchmarks" / "results" / "longclip_shapes.json"
LONGCLIP_ROWS = {"stretched, not fine-tuned": "Long-CLIP positions, not fine-tuned",
                 "Long-CLIP (PCM)": "Long-CLIP (50 steps)"}


def recall(images, texts) -> dict:
    from cliplab.eval.metrics import retrieval_recall

    r = retrieval_recall(images, texts, np.arange(len(texts)), ks=(1, 5))
    return {"long_t2i_r1": r["image_retrieval_recall@1"], "long_t2i_r5": r["image_retrieval_recall@5"],
            "long_i2t_r1": r["text_retrieval_recall@1"]}


def longclip_rows(n_test: int) -> list[dict]:
    """The Long-CLIP rows of the saved longclip_shapes result, when it used the same test scenes."""
    if not LONGCLIP.is_file():
        return []
    saved = json.loads(LONGCLIP.read_text())
    if saved.get("n_test") != n_test:
        return []
    return [{"method": LONGCLIP_ROWS[r["method"]], **{k: r[k] for k in ("long_t2i_r1", "long_t2i_r5", "long_i2t_r1")},
             "context": r["context"], "source": "benchmarks/results/longclip_shapes.json"}
            for r in saved["rows"] if r["method"] in LONGCLIP_ROWS]


def figure(rows: list[dict], example: dict, out: Path) -> None:
    """R@1 per method, and one long caption next to its capsule."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, (ax, tx) = plt.subplots(1, 2, figsize=(9.6, 3.3), gridspec_kw={"width_ratios": [1.0, 1.15]})
    names = [r["method"] for r in rows]
    ax.barh(range(len(rows)), [r["long_t2i_r1"] for r in rows], color="#4C72B0")
    for i, r in enumerate(rows):
        ax.text(r["long_t2i_r1"] + 0.01, i, f"{r['long_t2i_r1']:.2f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [textwrap.fill(n, 24) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("long-caption text -> image R@1", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    tx.axis("off")
    body = (f"long caption ({example['long_tokens']} tokens):\n" + textwrap.fill(example["long"], 62)
            + f"\n\ntruncated at {example['context']}:\n" + textwrap.fill(example["truncated"], 62)
            + f"\n\ncapsule ({example['capsule_tokens']} tokens):\n" + textwrap.fill(example["capsule"], 62))
    tx.text(0, 1, body, va="top", fontsize=6.5, family="monospace")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    Image.open(out).convert("RGB").quantize(colors=64, method=Image.MEDIANCUT).save(out, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-fit", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="20 steps, 64 test scenes, 200 fit captions (seconds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", default=None, help="also write the R@1 / example picture to this PNG")
    p.add_argument("--out", default=None, help=f"JSON result (default {RESULTS.relative_to(ROOT)}; "
                   "none with --quick)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.n_test, args.n_fit = 20, 64, 200

    import torch

    torch.set_num_threads(args.threads)
    import cliplab
    from cliplab.generative.capsulator import Capsulator
    from cliplab.generative.softpromptcomp import train_softpromptcomp
    from cliplab.surgery.longclip import longclip_world

    base = cliplab.load("shapes-tiny")
    images, scenes = longclip_world(n_objects=(2, 3)).render_batch("test", range(args.n_test))
    longs = [s.long_caption for s in scenes]
    img = base.encode_images(images).features                                   # (N, D)
    ntok = [len(base.tokenizer.encode(c)) + 2 for c in longs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                         # truncation is the point
        rows = [{"method": "truncation (shapes-tiny as shipped)", "context": base.context_length,
                 **recall(img, base.encode_texts(longs))}]

    tic = time.perf_counter()
    comp = train_softpromptcomp(base, args.steps, k=args.k, batch_size=args.batch_size, lr=args.lr,
                                log_every=max(args.steps // 10, 1))
    train_s = time.perf_counter() - tic
    rows.append({"method": f"SoftPromptComp (k={args.k} soft tokens)", "context": args.k + 2,
                 **recall(img, comp.encode_long_texts(longs)), "train_s": round(train_s, 1)})

    _, fit_scenes = longclip_world().render_batch("train", range(args.n_fit))
    capsule_stats = {}
    for name, target, fit in (("Nano-Capsulator", "sentences", True),
                              ("Nano-Capsulator, SoftPromptComp target", comp, False),
                              ("Nano-Capsulator without fit (ablation)", "sentences", False)):
        cap = Capsulator(base, target=target)
        if fit:
            cap.fit([s.long_caption for s in fit_scenes])
        tic = time.perf_counter()
        capsules = cap.compress(longs)
        n = [cap.n_tokens(c) for c in capsules]
        rows.append({"method": name, "context": base.context_length, **recall(img, base.encode_texts(capsules)),
                     "capsule_tokens": {"mean": float(np.mean(n)), "max": int(max(n))},
                     "compress_s": round(time.perf_counter() - tic, 1)})
        capsule_stats[name] = capsules
    rows += longclip_rows(args.n_test)

    first = capsule_stats["Nano-Capsulator"][0]
    example = {"long": longs[0], "long_tokens": ntok[0], "context": base.context_length,
               "truncated": base.tokenizer.decode(base.tokenize([longs[0]])[0, 1:base.context_length - 1].tolist()),
               "capsule": first, "capsule_tokens": len(base.tokenizer.encode(first)) + 2}
    out = {"benchmark": "compress_shapes", "steps": args.steps, "k": args.k, "batch_size": args.batch_size,
           "lr": args.lr, "n_test": args.n_test, "n_fit": args.n_fit, "threads": args.threads,
           "test_caption_tokens": {"min": min(ntok), "mean": float(np.mean(ntok)), "max": max(ntok)},
           "command": "python benchmarks/compress_shapes.py" + (" --quick" if args.quick else "") + " " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if k not in ("out", "quick", "figure")),
           "rows": rows, "example": example}
    if args.out or not args.quick:
        Path(args.out or RESULTS).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out or RESULTS).write_text(json.dumps(out, indent=2))
    if args.figure:
        figure(rows, example, Path(args.figure))
    print("long-caption R@1: " + ", ".join(f"{r['method']} {r['long_t2i_r1']:.3f}" for r in rows))


if __name__ == "__main__":
    main()
