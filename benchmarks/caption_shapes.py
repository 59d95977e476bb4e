"""Captioning on ShapesWorld: the plain captioner vs LightCap, on the bundled shapes-tiny model.

Both heads train through the one Trainer (teacher-forced cross-entropy, the Backbone frozen)
on the 1-3-object scenes of the shapes-tiny world (seed 0, train split, all caption
phrasings), with the same steps, batch and learning rate, and caption ``--n-test`` scenes of
its ``test`` split (held-out compositions included) greedily.  Reported per head: CIDEr-D
(pycocoevalcap, simple tokenisation, the scene's 5 captions as references), attribute
accuracy parsed from the captions (colour, shape, colour+shape object, count, exact), head
parameters and MB, and latency (median ms per image over ``--runs`` runs, one image at a
time, one thread).  For scale, ``canonical_caption``: the CIDEr-D of each scene's own
canonical caption (its first) against its five captions and against the other four (no
training; ``--canonical-only`` adds just this entry to an existing result file).

Writes ``benchmarks/results/caption_shapes.json`` and, unless ``--quick``,
``docs/generative/caption_examples.png`` (``--figure-from RESULT.json`` redraws it alone).

    python benchmarks/caption_shapes.py [--steps 300] [--n-test 200] [--quick] [--canonical-only]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "generative" / "caption_examples.png"


def figure(result: dict, out: Path) -> None:
    """The first test scenes with each head's caption and the true (canonical) caption, from a result."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cliplab.data.shapes import shapes_tiny_world
    from cliplab.data.shapes.worlds import task_world

    heads = result["heads"]
    n = min(len(h["examples"]) for h in heads.values())
    world = task_world(shapes_tiny_world(seed=result["seed"]), "captions")
    images, _ = world.render_batch("test", list(range(n)))
    fig, axes = plt.subplots(1, n, figsize=(2.5 * n, 4.6))
    for i, ax in enumerate(axes):
        ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        first = next(iter(heads.values()))["examples"][i]
        lines = [f"true: {first['true']}"] + [f"{name}: {h['examples'][i]['generated']}" for name, h in heads.items()]
        ax.text(0, -0.04, "\n".join(textwrap.fill(t, 34) for t in lines), transform=ax.transAxes,
                va="top", ha="left", fontsize=6.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)


def canonical_cider(scenes) -> dict:
    """CIDEr-D of each scene's canonical caption against its own captions: all five, the other four."""
    from cliplab.generative.captioner import cider

    canon = [s.captions[0] for s in scenes]
    return {"against_all_five": cider(canon, [s.captions for s in scenes])[0],
            "against_other_four": cider(canon, [s.captions[1:] for s in scenes])[0]}


def main(argv=None) -> dict:
    import torch

    threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(threads)


def _main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of each head")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--n-test", type=int, default=200, help="test scenes captioned")
    parser.add_argument("--runs", type=int, default=5, help="latency runs (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps and scenes (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "caption_shapes.json"))
    parser.add_argument("--figure-from", metavar="JSON", help="only draw the picture from an earlier result")
    parser.add_argument("--canonical-only", action="store_true",
                        help="only compute canonical_caption (no training) and add it to the --out file")
    args = parser.parse_args(argv)
    if args.figure_from:
        result = json.loads(Path(args.figure_from).read_text())
        figure(result, FIGURE)
        return result
    if args.quick:
        args.steps, args.n_test, args.runs, args.batch_size = 3, 8, 1, 4

    import torch

    torch.set_num_threads(1)
    import cliplab
    from cliplab.data.shapes import shapes_tiny_world
    from cliplab.data.shapes.worlds import task_world
    from cliplab.generative.captioner import (Captioner, attribute_accuracy, caption_latency, cider,
                                              head_size, train_captioner)
    from cliplab.generative.lightcap import LightCap
    from cliplab.models.transforms import uint8_to_tensor

    bb = cliplab.load("shapes-tiny")
    world = task_world(shapes_tiny_world(seed=args.seed), "captions")
    images, scenes = world.render_batch("test", list(range(args.n_test)))
    if args.canonical_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        if (result["seed"], result["test_scenes"]) != (args.seed, args.n_test):
            parser.error(f"{out} holds seed {result['seed']}, {result['test_scenes']} scenes; give the same")
        result["canonical_caption"] = canonical_cider(scenes)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    x = uint8_to_tensor(list(images), bb.preprocess_cfg)                               # (N, 3, 64, 64)
    refs = [s.captions for s in scenes]
    result = {"model": "shapes-tiny", "seed": args.seed, "world": "shapes-tiny, 1-3 objects, seed %d" % args.seed,
              "test_scenes": args.n_test, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "decoding": "greedy", "threads": 1, "canonical_caption": canonical_cider(scenes), "heads": {}}
    for name, cls in (("captioner", Captioner), ("lightcap", LightCap)):
        head = cls.build(bb, seed=args.seed)
        tic = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            train_captioner(head, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=min(20, args.steps // 10), seed=args.seed, out_dir=tmp, progress=False)
            rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        train_s = time.perf_counter() - tic
        caps = [c for s in range(0, len(x), 64) for c in head.generate(x[s:s + 64])]
        score, _ = cider(caps, refs)
        result["heads"][name] = {
            "cider": score, "attributes": attribute_accuracy(caps, scenes), **head_size(head),
            "latency_ms": caption_latency(head, x[:8], runs=args.runs), "train_s": train_s,
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "config": {k: v for k, v in head.config.items() if k not in ("vocab", "concepts")},
            "examples": [{"true": s.captions[0], "generated": c} for s, c in zip(scenes[:6], caps[:6])]}
        r = result["heads"][name]
        print(f"{name}: CIDEr {r['cider']:.3f}, object acc {r['attributes']['object']:.3f}, "
              f"count acc {r['attributes']['count']:.3f}, {r['params']:,} params ({r['mb']:.2f} MB), "
              f"{r['latency_ms']:.1f} ms/img, trained in {train_s:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quick:
        figure(result, FIGURE)
    return result


if __name__ == "__main__":
    main()
