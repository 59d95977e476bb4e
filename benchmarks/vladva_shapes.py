"""VladVA on ShapesWorld: joint contrastive + next-token training against contrastive only.

Both runs adapt shapes-tiny's text tower with the same soft prompt (8 vectors) and LoRA
(rank 4) for the same steps, batch, learning rate and seeds
(:func:`cliplab.generative.vladva.train_vladva`); they differ only in λ (``--lambdas``,
default 1, 0.1 and 0): λ > 0 is joint training (short captions contrastive, long captions
next-token conditioned on the image), λ = 0 contrastive only.  Training data: the
``train`` split of world seed 2, 1-3 objects (shapes-tiny was trained on seeds 0 and 1).

Metrics on held-out ``test`` scenes (the image tower is frozen, so image features are
computed once with the base model):

- retrieval: ``shapes:retrieval`` (1-3 objects, all 5 captions per scene), text -> image and
  image -> text R@1;
- fine-grained: the ``shapes:pairs`` MMVP-style pair accuracy (both images matched to their
  own caption; per detail: size, position, count), the 4-way relation caption choice of
  ``shapes:relation`` and zero-shot count accuracy (``shapes:count``, "a photo of {c}.").

The JSON also records the LM head's vocabulary (token ids of the first 1,024 training long
captions) and how many next-token targets of the following 8,000 scenes fall outside it.

Usage: python benchmarks/vladva_shapes.py [--steps 120] [--seeds 0,1] [--lambdas 1,0.1,0] [--quick]
       python benchmarks/vladva_shapes.py --vocabulary     (seconds: only the vocabulary coverage)
Writes benchmarks/results/vladva_shapes.json (and docs/generative/vladva_curves.png unless
--quick; vladva_vocabulary.json with --vocabulary) and prints a one-line summary.
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
RESULTS = ROOT / "benchmarks" / "results" / "vladva_shapes.json"
FIGURE = ROOT / "docs" / "generative" / "vladva_curves.png"


def load_data(n: int, n_pairs: int, seed: int = 0) -> dict:
    """The test sets and their frozen image features' inputs."""
    from cliplab.data.shapes import shapes_task

    return {"retrieval": shapes_task("retrieval", "test", n, seed=seed),
            "pairs": shapes_task("pairs", "test", n_pairs, seed=seed),
            "relation": shapes_task("relation", "test", n, seed=seed),
            "count": shapes_task("count", "test", n, seed=seed)}


def image_feats(backbone, data: dict) -> dict:
    return {k: backbone.encode_images(list(d.items), progress=False).features for k, d in data.items()}


def scores(backbone, data: dict, feats: dict) -> dict:
    """Retrieval R@1 and the fine-grained accuracies of ``backbone``'s text tower."""
    from cliplab.data.shapes.finegrained import PAIR_DETAILS
    from cliplab.eval.metrics import pair_accuracy, retrieval_recall

    enc = lambda texts: backbone.encode_texts(texts, progress=False)          # noqa: E731
    r = data["retrieval"]
    texts = [c for caps in r.captions for c in caps]
    t2i = np.repeat(np.arange(len(r.captions)), [len(c) for c in r.captions])
    rec = retrieval_recall(feats["retrieval"], enc(texts), t2i, ks=(1,))
    p = data["pairs"]
    tp = enc([c[0] for c in p.captions])
    pair = np.asarray(p.attributes["pair"])
    detail = np.asarray(p.attributes["detail"])
    out = {"t2i_r1": rec["image_retrieval_recall@1"], "i2t_r1": rec["text_retrieval_recall@1"],
           "pair_acc": pair_accuracy(feats["pairs"], tp, pair)}
    for d in PAIR_DETAILS:
        on = detail == d
        out[f"pair_acc[{d}]"] = pair_accuracy(feats["pairs"][on], tp[on], pair[on])
    rel = data["relation"]
    caps = rel.attributes["captions"]
    t = enc([c for cs in caps for c in cs]).reshape(len(caps), len(caps[0]), -1)
    out["relation_choice_acc"] = float((np.einsum("nd,nkd->nk", feats["relation"], t).argmax(1) == rel.labels).mean())
    cnt = data["count"]
    tc = enc([f"a photo of {c}." for c in cnt.classnames])
    out["count_acc"] = float(((feats["count"] @ tc.T).argmax(1) == cnt.labels).mean())
    return out


def vocabulary_coverage(backbone, n_vocab: int = 1024, n_check: int = 8000) -> dict:
    """The LM head's vocabulary (token ids of the first ``n_vocab`` training long captions, as
    ``train_vladva`` builds it) and how many next-token targets of the following ``n_check``
    scenes fall outside it (those targets are ignored in training)."""
    import torch

    from cliplab.generative.vladva import VladVASet, ntp_vocabulary, vladva_world

    data = VladVASet(vladva_world())
    tokenize = lambda texts: backbone.tokenizer(list(texts))   # noqa: E731  (cut at the context, as in training)
    vocab = ntp_vocabulary(tokenize, data.long_captions(n_vocab))                 # (V,)
    later = [data.world.scene("train", i).long_caption for i in range(n_vocab, min(n_vocab + n_check, len(data)))]
    ids = tokenize(later)[:, 1:]                                                  # (N, T - 1), the targets
    outside = (ids != 0) & ~torch.isin(ids, vocab)
    return {"size": int(len(vocab)), "vocab_scenes": n_vocab, "checked_scenes": len(later),
            "targets_outside": int(outside.sum()), "scenes_with_targets_outside": int(outside.any(1).sum())}


def run_name(lam: float) -> str:
    return "contrastive only (λ=0)" if lam == 0 else f"joint (λ={lam:g})"


def curves_figure(rows: list, lambdas: list, out: Path) -> None:
    """Test R@1 and pair accuracy against training steps (mean over seeds, min-max band); step 0 is the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.8))
    colors = ["tab:blue", "tab:green", "tab:red", "tab:purple"]
    for k, lam in enumerate(lambdas):
        name, color = run_name(lam), "tab:orange" if lam == 0 else colors[k % len(colors)]
        base = {k: rows[0][k] for k in ("t2i_r1", "pair_acc")}
        runs = [[{"step": 0, **base}] + r["curve"] for r in rows if r["run"] == name]
        steps = [c["step"] for c in runs[0]]
        for ax, key, title in ((axes[0], "t2i_r1", "text→image R@1"), (axes[1], "pair_acc", "pair accuracy")):
            vals = np.array([[c[key] for c in run] for run in runs])           # (seeds, evals)
            ax.plot(steps, vals.mean(0), color=color, label=name)
            if len(runs) > 1:
                ax.fill_between(steps, vals.min(0), vals.max(0), color=color, alpha=0.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lambdas", default="1,0.1,0", help="comma-separated ntp weights; 0 is contrastive only")
    ap.add_argument("--n", type=int, default=300, help="test scenes of retrieval, relation and count")
    ap.add_argument("--n-pairs", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a few steps on tiny sets (a smoke test)")
    ap.add_argument("--vocabulary", action="store_true",
                    help="only the LM head's vocabulary coverage (seconds; writes vladva_vocabulary.json)")
    ap.add_argument("--out", default=None, help=f"JSON result (default {RESULTS.name} in benchmarks/results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seeds, args.n, args.n_pairs, args.eval_every = 3, 8, "0", 24, 12, 3
        args.lambdas = "1,0"
    lambdas = [float(v) for v in args.lambdas.split(",") if v]

    import torch

    torch.set_num_threads(args.threads)
    import cliplab
    from cliplab.generative.vladva import train_vladva

    if args.vocabulary:
        cov = vocabulary_coverage(cliplab.load("shapes-tiny"))
        path = Path(args.out) if args.out else RESULTS.parent / "vladva_vocabulary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": "vladva_shapes --vocabulary", "vocabulary": cov}, indent=2) + "\n")
        print(f"vladva vocabulary: {cov}; wrote {path}")
        return cov
    args.out = args.out or str(RESULTS)

    t0 = time.perf_counter()
    base = cliplab.load("shapes-tiny")
    data = load_data(args.n, args.n_pairs)
    feats = image_feats(base, data)
    rows = [{"run": "shapes-tiny (not adapted)", "ntp_weight": None, "seed": None, **scores(base, data, feats)}]
    coverage = vocabulary_coverage(base, n_check=64 if args.quick else 8000)
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for lam in lambdas:
            name, curve = run_name(lam), []

            def evaluate(model, curve=curve):
                s = scores(base.with_model(model.clip, name="step"), data, feats)
                curve.append({"t2i_r1": s["t2i_r1"], "pair_acc": s["pair_acc"]})
                return {"t2i_r1": s["t2i_r1"], "pair_acc": s["pair_acc"]}

            tic = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                tuned = train_vladva(base, steps=args.steps, ntp_weight=lam, batch_size=args.batch_size, lr=args.lr,
                                     seed=seed, out_dir=tmp, log_every=max(args.steps // 10, 1), evaluate=evaluate,
                                     eval_every=args.eval_every)
                rows_log = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            train_s = time.perf_counter() - tic
            steps = [r["step"] for r in rows_log if "eval_t2i_r1" in r]
            for c, s in zip(curve, steps):
                c["step"] = s
            last = rows_log[-1]
            rows.append({"run": name, "ntp_weight": lam, "seed": seed, **scores(tuned, data, feats),
                         "train_s": round(train_s, 1), "curve": curve,
                         "final_loss": {k: round(v, 4) for k, v in last.items() if k.startswith("loss")}})
    summary = {}
    for lam in lambdas:
        name = run_name(lam)
        runs = [r for r in rows if r["run"] == name]
        summary[name] = {k: {"mean": float(np.mean([r[k] for r in runs])), "std": float(np.std([r[k] for r in runs]))}
                         for k in rows[0] if k not in ("run", "ntp_weight", "seed")}
        summary[name]["n_seeds"] = len(runs)
    out = {"benchmark": "vladva_shapes", "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
           "seeds": args.seeds, "n": args.n, "n_pairs": args.n_pairs, "threads": args.threads,
           "command": "python benchmarks/vladva_shapes.py" + (" --quick" if args.quick else " " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "quick", "vocabulary"))),
           "seconds": round(time.perf_counter() - t0, 1), "vocabulary": coverage, "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    if not args.quick:
        curves_figure(rows, lambdas, FIGURE)
    print("vladva_shapes: " + "; ".join(
        f"{name}: t2i R@1 {v['t2i_r1']['mean']:.3f}, pair acc {v['pair_acc']['mean']:.3f}, "
        f"count acc {v['count_acc']['mean']:.3f}" for name, v in summary.items())
        + f" (base t2i R@1 {rows[0]['t2i_r1']:.3f}); {out['seconds']:.0f} s; results {args.out}")
    return out


if __name__ == "__main__":
    main()
