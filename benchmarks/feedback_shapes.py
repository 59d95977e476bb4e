"""Generative feedback on ShapesWorld: DIVA and un²CLIP against the bundled model.

Trains two tiny conditional generators on the frozen ``shapes-tiny`` vision tower (one on
DIVA's dense token condition, one on unCLIP's global embedding), then fine-tunes the
vision tower through each frozen generator (:func:`cliplab.generative.diva.diva`,
:func:`cliplab.generative.un2clip.un2clip`) and scores before and after:

- MMVP pair accuracy on ShapesWorld 2's one-detail pairs (``shapes:pairs``, test split,
  :func:`cliplab.eval.metrics.pair_accuracy`, overall and per detail), as
  ``benchmarks/shapes_finegrained.py`` scores it;
- zero-shot top-1 on ``shapes:color-shape`` (test split), the original-domain task of
  the eval suite, to show what is retained.

Training images are unlabelled ShapesWorld train scenes (1-3 objects) plus, by default,
30 % images of the ``pairs`` task's *train* split (pixels only; the test pairs are never
seen).  Every stage is seeded.

Usage: python benchmarks/feedback_shapes.py [--quick] [--seed 0] [--out FILE] [--figures DIR]
       [--work DIR] [--generators DIR] [--fb-lr LR] [--fb-steps N] [--timesteps LO HI]
       [--gen-timesteps LO HI]
Default run: about 8 minutes of one CPU thread.  ``--quick``: seconds (a smoke run).
``--work DIR`` keeps the runs and saves the generators; ``--generators DIR`` reuses them
(the training is seeded, so this only skips repeating it).
Writes benchmarks/results/feedback_shapes.json and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "feedback_shapes.json"

FULL = dict(n_train=3000, pairs_fraction=0.3, gen_steps=400, fb_steps=150, batch_size=32, gen_lr=2e-3,
            fb_lr=3e-5, n_pairs=240, n_zeroshot=640, n_heldout=256, gen_timesteps=None, fb_timesteps=None)
QUICK = dict(n_train=64, pairs_fraction=0.3, gen_steps=3, fb_steps=2, batch_size=8, gen_lr=2e-3,
             fb_lr=3e-5, n_pairs=12, n_zeroshot=32, n_heldout=16, gen_timesteps=None, fb_timesteps=None)
BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def evaluate(backbone, *, n_pairs: int, n_zeroshot: int, seed: int = 0) -> dict:
    """Pair accuracy (test: overall, per detail; val: overall), per-pair verdicts, colour × shape zero-shot top-1.

    ``pair_accuracy[val]`` is on the ``pairs`` task's validation split, the one to choose
    settings on; everything else is on test splits.
    """
    from cliplab.data.shapes import shapes_task
    from cliplab.data.shapes.finegrained import PAIR_DETAILS
    from cliplab.eval.metrics import pair_accuracy
    from cliplab.eval.tasks import zeroshot_classification
    from cliplab.features import image_features

    pairs = shapes_task("pairs", "test", n_pairs, seed=seed)
    x, _, _ = image_features(backbone, pairs.items, progress=False)                   # (2P, D)
    t = backbone.encode_texts([c[0] for c in pairs.captions], progress=False)         # (2P, D)
    pair, detail = np.asarray(pairs.attributes["pair"]), np.asarray(pairs.attributes["detail"])
    out = {"pair_accuracy": pair_accuracy(x, t, pair)}
    for d in PAIR_DETAILS:
        on = detail == d
        out[f"pair_accuracy[{d}]"] = pair_accuracy(x[on], t[on], pair[on])
    s = x @ t.T                                                                       # (2P, 2P)
    a, b = np.arange(0, len(x), 2), np.arange(1, len(x), 2)                           # members of each pair
    out["solved"] = ((s[a, a] > s[a, b]) & (s[b, b] > s[b, a])).astype(int).tolist()
    val = shapes_task("pairs", "val", n_pairs, seed=seed)
    xv, _, _ = image_features(backbone, val.items, progress=False)
    tv = backbone.encode_texts([c[0] for c in val.captions], progress=False)
    out["pair_accuracy[val]"] = pair_accuracy(xv, tv, np.asarray(val.attributes["pair"]))
    zs = zeroshot_classification(backbone, shapes_task("color-shape", "test", n_zeroshot, seed=seed),
                                 progress=False)
    out["zeroshot_color_shape"] = zs.metrics["acc1"]
    return out


def run(params: dict, *, seed: int = 0, figures: Path | None = None, work: Path | None = None,
        generators: Path | None = None) -> dict:
    import cliplab
    from cliplab.generative.diva import diva
    from cliplab.generative.generator import denoising_error, generator_config, shapes_images, train_generator
    from cliplab.generative.un2clip import un2clip
    from cliplab.train import TrainConfig

    torch.manual_seed(seed)
    work = Path(work or tempfile.mkdtemp(prefix="feedback-"))
    p = params
    bb = cliplab.load("shapes-tiny")
    images = shapes_images(p["n_train"], seed=seed, pairs_fraction=p["pairs_fraction"])
    timings, results = {}, {"params": p, "seed": seed, "models": {}}

    def cfg(steps, lr, warmup, name):
        return TrainConfig(steps=steps, batch_size=p["batch_size"], lr=lr, warmup_steps=warmup,
                           weight_decay=0.0, seed=seed, ckpt_every=0, log_every=max(1, steps // 8),
                           out_dir=str(work / name))

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: {timings[name]:.0f} s", file=sys.stderr)
        return out

    def losses(name):
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        return {"first": rows[0]["loss"], "last": rows[-1]["loss"]}

    warm = min(50, p["gen_steps"] // 8)
    gens = {}
    for mode in ("tokens", "global"):
        saved = Path(generators) / f"gen-{mode}" if generators else None
        if saved is not None and (saved / "unet.pt").exists():     # a generator this script trained before
            gens[mode] = train_generator(bb, images[:1], mode=mode, config=cfg(1, p["gen_lr"], 0, f"gen-{mode}-load"))
            gens[mode].unet.load_state_dict(torch.load(saved / "unet.pt", weights_only=True))
            rows = [json.loads(line) for line in (saved / "metrics.jsonl").read_text().splitlines()]
            loss = {"first": rows[0]["loss"], "last": rows[-1]["loss"], "reused_from": str(saved)}
        else:
            gens[mode] = timed(f"generator[{mode}]", lambda m=mode: train_generator(
                bb, images, mode=m, config=cfg(p["gen_steps"], p["gen_lr"], warm, f"gen-{m}"),
                timesteps=p["gen_timesteps"]))
            loss = losses(f"gen-{mode}")
        results[f"generator[{mode}]"] = {"config": generator_config(gens[mode]), "loss": loss}
    fb_warm = min(10, p["fb_steps"] // 8)
    tuned = {"shapes-tiny": bb}
    band = p["fb_timesteps"]
    tuned["diva"] = timed("diva", lambda: diva(bb, gens["tokens"], images, timesteps=band,
                                               config=cfg(p["fb_steps"], p["fb_lr"], fb_warm, "diva")))
    tuned["un2clip"] = timed("un2clip", lambda: un2clip(bb, gens["global"], images, timesteps=band,
                                                        config=cfg(p["fb_steps"], p["fb_lr"], fb_warm, "un2clip")))
    results["diva_loss"], results["un2clip_loss"] = losses("diva"), losses("un2clip")
    # how well each frozen generator denoises held-out test scenes from the tower before / after
    from cliplab.data.shapes import shapes_task

    held = list(shapes_task("retrieval", "test", p["n_heldout"], seed=seed).items)
    for name, mode in (("diva", "tokens"), ("un2clip", "global")):
        results[f"heldout_denoising_error[{name}]"] = {
            "before": denoising_error(gens[mode], held, seed=seed),
            "after": denoising_error(gens[mode], held, visual=tuned[name].model.visual, seed=seed),
            "before, conditions shuffled": denoising_error(gens[mode], held, seed=seed, shuffle_conditions=True)}
        # how much the generator relies on its condition per noise band, on *val* scenes (to choose a band on)
        val = list(shapes_task("retrieval", "val", p["n_heldout"], seed=seed).items)
        reliance = results[f"val_condition_reliance[{name}]"] = {}
        for lo, hi in BANDS:
            own = denoising_error(gens[mode], val, seed=seed, timesteps=(lo, hi))
            shuffled = denoising_error(gens[mode], val, seed=seed, timesteps=(lo, hi), shuffle_conditions=True)
            reliance[f"{lo}-{hi}"] = {"own": own, "shuffled": shuffled, "rise": shuffled / own - 1}
    for name, model in tuned.items():
        results["models"][name] = timed(f"eval[{name}]", lambda m=model: evaluate(
            m, n_pairs=p["n_pairs"], n_zeroshot=p["n_zeroshot"], seed=seed))
    results["timings_s"] = timings
    for mode, gen in gens.items():
        (work / f"gen-{mode}").mkdir(parents=True, exist_ok=True)
        torch.save(gen.unet.state_dict(), work / f"gen-{mode}" / "unet.pt")
    if figures is not None:
        figures_out(bb, gens, results, Path(figures), seed=seed)
    return results


def figures_out(bb, gens, results, out_dir: Path, *, seed: int = 0) -> None:
    """feedback_samples.png (inputs, samples, reconstructions) and feedback_pairs.png (verdicts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cliplab.data.shapes import shapes_task
    from cliplab.generative.generator import sample

    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = list(shapes_task("retrieval", "test", 8, seed=seed).items)
    rows = [("input (64 px)", inputs)]
    for mode, label in (("global", "unCLIP-style\n(global emb.)"), ("tokens", "DIVA-style\n(tokens)")):
        rows.append((f"{label}\nsample", list(sample(gens[mode], inputs, steps=40, seed=seed))))
        rows.append((f"{label}\nrecon. from t=T/2", list(sample(gens[mode], inputs, steps=25, seed=seed, start=0.5))))
    fig, axes = plt.subplots(len(rows), len(inputs), figsize=(1.1 * len(inputs), 1.15 * len(rows)))
    for i, (label, ims) in enumerate(rows):
        for j, im in enumerate(ims):
            axes[i, j].imshow(im, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(label, fontsize=6)
    fig.tight_layout()
    _save(fig, out_dir / "feedback_samples.png")
    plt.close(fig)

    pairs = shapes_task("pairs", "test", 6, seed=seed)
    verdict = {n: results["models"][n]["solved"][:6] for n in results["models"]}
    fig, axes = plt.subplots(2, 6, figsize=(8.4, 3.6))
    for k in range(6):
        for j in range(2):
            ax = axes[j, k]
            ax.imshow(pairs.items[2 * k + j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(pairs.captions[2 * k + j][0], fontsize=6)
        marks = "  ".join(f"{n}: {'✓' if verdict[n][k] else '✗'}" for n in verdict)
        axes[1, k].set_xlabel(f"{pairs.attributes['detail'][2 * k]}\n{marks}", fontsize=5.5)
    fig.tight_layout()
    _save(fig, out_dir / "feedback_pairs.png")
    plt.close(fig)


def _save(fig, path: Path) -> None:
    from PIL import Image

    fig.savefig(path, dpi=110)
    Image.open(path).convert("RGB").quantize(colors=128, method=Image.MEDIANCUT).save(path, optimize=True)


def summary(results: dict) -> str:
    m = results["models"]
    parts = [f"{n}: pairs {r['pair_accuracy']:.3f} zero-shot {r['zeroshot_color_shape']:.3f}" for n, r in m.items()]
    return "feedback_shapes: " + "; ".join(parts)


def table_markdown(results: dict) -> str:
    """The docs table: test pair accuracy (overall, per detail), val pair accuracy and zero-shot, each model, in %."""
    base = results["models"]["shapes-tiny"]
    lines = ["| model | pair acc. | size | position | count | Δ pairs | val pairs | colour×shape zero-shot "
             "| Δ zero-shot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["models"].items():
        dp = 100 * (r["pair_accuracy"] - base["pair_accuracy"])
        dz = 100 * (r["zeroshot_color_shape"] - base["zeroshot_color_shape"])
        lines.append(f"| `{name}` | {100 * r['pair_accuracy']:.1f} | {100 * r['pair_accuracy[size]']:.1f} | "
                     f"{100 * r['pair_accuracy[position]']:.1f} | {100 * r['pair_accuracy[count]']:.1f} | "
                     f"{dp:+.1f} | {100 * r['pair_accuracy[val]']:.1f} | {100 * r['zeroshot_color_shape']:.1f} | "
                     f"{dz:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few steps (seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--figures", default=None, help="write feedback_*.png into this folder")
    ap.add_argument("--work", default=None, help="keep the training runs (metrics, checkpoints) here")
    ap.add_argument("--generators", default=None,
                    help="reuse the generators a run with --work DIR saved there (gen-*/unet.pt)")
    ap.add_argument("--fb-lr", type=float, default=None, help="learning rate of DIVA and un2CLIP")
    ap.add_argument("--fb-steps", type=int, default=None, help="steps of DIVA and un2CLIP")
    ap.add_argument("--timesteps", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                    help="DIVA and un2CLIP feed back only t in [LO, HI) (default all 1000)")
    ap.add_argument("--gen-timesteps", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                    help="train the generators on t in [LO, HI) only (default all 1000)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    params = dict(QUICK if args.quick else FULL)
    params.update({k: v for k, v in (("fb_lr", args.fb_lr), ("fb_steps", args.fb_steps),
                                     ("fb_timesteps", args.timesteps), ("gen_timesteps", args.gen_timesteps))
                   if v is not None})
    results = run(params, seed=args.seed, figures=Path(args.figures) if args.figures else None, work=args.work,
                  generators=args.generators)
    results["command"] = "python benchmarks/feedback_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table_markdown(results), file=sys.stderr)
    print(f"{summary(results)}; {results['wall_s']:.0f} s; results {out}")
    return results


if __name__ == "__main__":
    main()
