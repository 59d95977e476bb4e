"""Misaligned-word detection on ShapesWorld: CLIPScore, CLIP4DM word attribution, F-CLIPScore.

Two-object test scenes of ``ShapesWorld(seed=11, n_objects=2)``; each scene's canonical
caption ("a large red star at the top left and a small blue circle in the center") gets one
wrong word of one kind:

- colour: one object's colour replaced by another (the new colour-shape pair is not in the scene);
- shape: one object's shape replaced by another (likewise);
- position: left <-> right or top <-> bottom in one object's position;
- count: "a photo of two shapes: a red star and a blue circle" with "two" replaced.

Measured with the bundled ``shapes-tiny`` model:

- word-level: AUROC of the negated word attribution for "is the wrong word" over all words
  of the perturbed captions, and localisation accuracy (the most negative word is the wrong
  one) against chance (1 / words per caption);
- caption-level: AUROC of telling the perturbed caption from the true one, by CLIPScore and
  by F-CLIPScore (most-negative mode).

Writes ``benchmarks/results/misalignment_shapes.json`` and ``docs/anomaly_detection/words.png``
(word scores of one caption per kind) and prints one line per kind.

    python benchmarks/misalignment_shapes.py [--n 200] [--model shapes-tiny]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

KINDS = ("colour", "shape", "position", "count")
FLIP = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
COUNT = {1: "one", 2: "two", 3: "three", 4: "four"}


def describe(o, position=None) -> str:
    from cliplab.data.shapes.captions import position_phrase

    return f"a {o.size} {o.color} {o.shape} {position_phrase(position or o.position)}"


def perturb(scene, kind: str, rng, colors, shapes):
    """(true caption, wrong caption, index of the wrong word) or None when the kind does not apply."""
    objs = scene.objects
    present = {(o.color, o.shape) for o in objs}
    if kind == "count":
        true = f"a photo of {COUNT[len(objs)]} shapes: " + " and ".join(f"a {o.color} {o.shape}" for o in objs)
        wrong_count = rng.choice([k for k in COUNT if k != len(objs)])
        return true, true.replace(COUNT[len(objs)], COUNT[wrong_count], 1), 3
    i = int(rng.integers(len(objs)))
    o = objs[i]
    parts = [describe(x) for x in objs]
    offset = sum(len(p.split()) + 1 for p in parts[:i])       # words before object i (+ "and")
    if kind == "colour":
        new = rng.choice([c for c in colors if (c, o.shape) not in present and c != o.color])
        parts[i] = f"a {o.size} {new} {o.shape} " + describe(o).split(" ", 4)[4]
        word = offset + 2
    elif kind == "shape":
        new = rng.choice([s for s in shapes if (o.color, s) not in present and s != o.shape])
        parts[i] = f"a {o.size} {o.color} {new} " + describe(o).split(" ", 4)[4]
        word = offset + 3
    else:
        words = o.position.split()
        flippable = [j for j, w in enumerate(words) if w in FLIP]
        if not flippable:
            return None
        j = flippable[int(rng.integers(len(flippable)))]
        new_pos = " ".join(FLIP[w] if k == j else w for k, w in enumerate(words))
        parts[i] = describe(o, new_pos)
        word = offset + len(parts[i].split()) - len(words) + j
    true = " and ".join(describe(x) for x in objs)
    return true, " and ".join(parts), word


def picture(examples: dict, out: Path) -> None:
    """Bar charts of the word scores of one perturbed caption per kind, the wrong word in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 1, figsize=(9, 1.9 * len(examples)))
    for ax, (kind, (image, a, j)) in zip(axes, examples.items()):
        s = np.nan_to_num(a.scores)
        ax.bar(range(len(s)), s, color=["tab:red" if k == j else "tab:gray" for k in range(len(s))])
        ax.set_xticks(range(len(s)))
        ax.set_xticklabels(a.words, fontsize=7, rotation=30, ha="right")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel(kind, fontsize=8)
        ax.tick_params(axis="y", labelsize=6)
        inset = ax.inset_axes([1.01, 0.0, 0.12, 1.0])
        inset.imshow(image)
        inset.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="scenes per kind")
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    import torch

    import cliplab
    from cliplab.data.shapes import ShapesWorld
    from cliplab.data.shapes.world import COLORS, SHAPES
    from cliplab.dense.misalignment import PREFIX, clip_score, word_attributions
    from cliplab.eval.anomaly_metrics import image_auroc

    torch.manual_seed(0)
    bb = cliplab.load(args.model)
    world = ShapesWorld(seed=args.seed, n_objects=2)
    rng = np.random.default_rng(args.seed)
    results, examples = {}, {}
    for kind in KINDS:
        scenes, trues, wrongs, idx = [], [], [], []
        index = 0
        while len(scenes) < args.n:
            scene = world.scene("test", index)
            index += 1
            out = perturb(scene, kind, rng, COLORS, world.in_shapes)
            if out is None or len(scene.objects) != 2:
                continue
            scenes.append(scene)
            trues.append(out[0])
            wrongs.append(out[1])
            idx.append(out[2])
            assert out[0].split()[out[2]] != out[1].split()[out[2]]
        feats = bb.encode_images([s.image for s in scenes]).features
        attr_wrong = word_attributions(bb, feats, wrongs)
        attr_true = word_attributions(bb, feats, trues)
        # word level
        labels, scores, hits, chance = [], [], [], []
        for a, j in zip(attr_wrong, idx):
            ok = np.isfinite(a.scores)
            labels += [int(k == j) for k in np.flatnonzero(ok)]
            scores += list(-a.scores[ok])
            hits.append(a.flagged("most_negative") == [j])
            chance.append(1 / ok.sum())
        cs_true = clip_score(feats, bb.encode_texts([PREFIX + c for c in trues]))
        cs_wrong = clip_score(feats, bb.encode_texts([PREFIX + c for c in wrongs]))
        f_true = np.array([a.f_clip_score() for a in attr_true])
        f_wrong = np.array([a.f_clip_score() for a in attr_wrong])
        y = np.r_[np.zeros(len(trues)), np.ones(len(wrongs))]
        results[kind] = {
            "n": len(scenes),
            "word_auroc": round(image_auroc(labels, scores), 4),
            "localisation_accuracy": round(float(np.mean(hits)), 4),
            "chance": round(float(np.mean(chance)), 4),
            "caption_auroc_clipscore": round(image_auroc(y, -np.r_[cs_true, cs_wrong]), 4),
            "caption_auroc_f_clipscore": round(image_auroc(y, -np.r_[f_true, f_wrong]), 4),
            "example": {"true": trues[0], "wrong": wrongs[0],
                        "word_scores": {w: round(float(s), 6) for w, s in zip(attr_wrong[0].words, attr_wrong[0].scores)}},
        }
        examples[kind] = (scenes[0].image, attr_wrong[0], idx[0])
        r = results[kind]
        print(f"{kind:8s} word AUROC {r['word_auroc']:.3f}  top-1 {r['localisation_accuracy']:.3f} "
              f"(chance {r['chance']:.3f})  caption AUROC: CLIPScore {r['caption_auroc_clipscore']:.3f}, "
              f"F-CLIPScore {r['caption_auroc_f_clipscore']:.3f}")
    picture(examples, Path(__file__).parents[1] / "docs" / "anomaly_detection" / "words.png")
    out = {"benchmark": "misalignment_shapes", "model": args.model, "world": world.config(), "split": "test",
           "prefix": PREFIX, "attribution": "CLIP4DM, last 3 text layers, most_negative", "kinds": results}
    path = Path(__file__).parent / "results" / "misalignment_shapes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
