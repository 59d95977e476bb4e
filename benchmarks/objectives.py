"""Equal-budget comparison of the training objectives and caption data on ShapesWorld.

Rows: every objective registered in ``cliplab.train.losses`` (read from the registry, so an
objective added later is a row without editing this file), each trained on the
``shapes-tiny`` recipe's data (its scenes' phrasings), and the data-side methods, all with
``infonce`` on one pool of ``--pool`` scenes (80 % one object, 20 % two or three):

- ``noisy``: one alt-text-like caption per scene (``cliplab.data.shapes.alt_text``);
- ``filtered``: the noisy pairs in the best half by CLIPScore of the bundled shapes-tiny;
- ``recaptioned``: the canonical caption written from the ground truth;
- ``<variant>+rewrites``: the same with ``--rewrites`` LaCLIP rewrites of every caption.

The budget is the same for every row: the shapes-tiny model config from the same seeded
initialisation, ``--steps`` steps of ``--batch-size`` (default 600 x 64, smaller than the
recipe's 4,000 x 128), lr ``--lr`` with ``--warmup`` warm-up steps, seed 0.

Columns (the model after training; eval code reused from ``shapes_tiny_quality.py`` and
``cliplab.eval.tasks``):

- ``seen`` / ``heldout``: 64-way colour x shape zero-shot top-1 on ``--n-eval`` single-object
  test scenes, on seen and on held-out compositions;
- ``domains``: mean 64-way top-1 (``zeroshot_classification``) over ``--domains`` of
  ShapesWorld 2 (``shapes:color-shape@<domain>``, ``--n-domain`` scenes each);
- ``i2t R@1/5``, ``t2i R@1/5``: retrieval among ``--n-pairs`` 1-3 object test scenes and
  their canonical captions;
- ``mIoU``: ``zeroshot_segmentation`` with ``maskclip`` on ``--n-seg`` ``shapes:seg`` test
  scenes (one resize to the model input, background threshold 0);
- ``samples/s`` (median over the run's metric rows after the first), ``peak MB`` (peak RSS
  of the row's process at the end of training), ``cost``: infonce's samples/s over the row's
  (per-step cost relative to InfoNCE; on a shared machine a noisy number).

Each row runs in its own forked process (so peak memory is per row), trains with
checkpoints (an interrupted row resumes from its last one) and writes its result next to
its run; finished rows with the same budget are skipped, and rows of several invocations
(``--only``) accumulate in the results JSON.

Usage: python benchmarks/objectives.py [--only infonce,cloob,noisy] [--steps 600] [--threads 1]
           [--docs] [--force] [--list]
Writes benchmarks/results/objectives.json (rows merged), with ``--docs`` the table in
docs/objectives.md between its markers, and prints one line per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("CLIPLAB_PROGRESS", "0")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "objectives.json"
DOCS = HERE.parent / "docs" / "objectives.md"
START, END = "<!-- objectives-table:start -->", "<!-- objectives-table:end -->"

#: The data-side rows: recipe options on top of ``infonce`` (``pool`` and ``rewrites`` filled in).
DATA_VARIANTS = {
    "noisy": {"captions": "noisy"},
    "noisy+rewrites": {"captions": "noisy", "rewrites": True},
    "filtered": {"captions": "filtered"},
    "filtered+rewrites": {"captions": "filtered", "rewrites": True},
    "recaptioned": {"captions": "recaptioned"},
    "recaptioned+rewrites": {"captions": "recaptioned", "rewrites": True},
}

#: Budget fields: a stored row counts as done only if all of them match.
BUDGET = ("steps", "batch_size", "lr", "warmup", "seed", "pool", "rewrites", "n_eval", "n_pairs", "n_domain",
          "n_seg", "domains")


def row_names() -> list[str]:
    """Every objective of the registry that trains on captions alone, then the data variants.

    Objectives that read stored teacher outputs (``needs_teacher``: ``mobileclip-dr``)
    need reinforced shards and have their own comparison (``benchmarks/distill_shapes.py``).
    """
    from cliplab.train.losses import get_loss_class, list_losses

    return [*(n for n in list_losses() if not get_loss_class(n).needs_teacher), *DATA_VARIANTS]


def row_spec(name: str, args) -> dict:
    """Loss and recipe options of row ``name``."""
    if name in DATA_VARIANTS:
        opts = dict(DATA_VARIANTS[name])
        if opts.pop("rewrites", False):
            opts["rewrites"] = args.rewrites
        return {"loss": "infonce", "options": {**opts, "pool": args.pool}}
    return {"loss": name, "options": {}}


def budget(args) -> dict:
    return {k: getattr(args, k) for k in BUDGET}


# --------------------------------------------------------------------------- one row
def median_samples_per_s(metrics_jsonl: Path) -> float:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    rates = rates[1:] or rates                                  # the first window includes warm-up
    return float(sorted(rates)[len(rates) // 2]) if rates else float("nan")


def evaluate_row(bb, args) -> dict:
    """The columns of one trained model (see the module docstring)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from shapes_tiny_quality import evaluate

    from cliplab.data.datasets import load_dataset
    from cliplab.eval.tasks import zeroshot_classification
    from cliplab.eval.tasks.segmentation import zeroshot_segmentation

    q = evaluate(bb, n=args.n_eval, n_pairs=args.n_pairs, seed=args.seed)
    domains = {}
    for d in args.domains.split(","):
        data = load_dataset(f"shapes:color-shape@{d}", "test", n=args.n_domain)
        domains[d] = zeroshot_classification(bb, data, templates=["a photo of a {c}."]).metrics["acc1"]
    seg = zeroshot_segmentation(bb, load_dataset("shapes:seg", "test", n=args.n_seg), method="maskclip",
                                templates=["a photo of a {c}."], overlays=0)
    return {"seen": q["colour_shape_64way_seen"], "heldout": q["colour_shape_64way_heldout"],
            "domains": float(np.mean(list(domains.values()))), "per_domain": domains,
            "i2t_r1": q["image_to_text"]["R@1"], "i2t_r5": q["image_to_text"]["R@5"],
            "t2i_r1": q["text_to_image"]["R@1"], "t2i_r5": q["text_to_image"]["R@5"],
            "miou": seg.metrics["mIoU"]}


def run_row(name: str, args) -> dict:
    """Train and evaluate row ``name`` in this process; returns its result (also written to its folder)."""
    import torch

    torch.set_num_threads(args.threads)
    import cliplab
    from cliplab.train.recipes import get_recipe, run_recipe

    spec = row_spec(name, args)
    out = Path(args.runs) / name
    options = dict(spec["options"])
    t0 = time.perf_counter()
    filter_report = None
    if options.get("captions") == "filtered":
        from cliplab.dense.misalignment import ClipScorer

        options["scorer"] = ClipScorer(cliplab.load("shapes-tiny"))
    recipe = get_recipe("shapes-tiny", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup, seed=args.seed, loss=spec["loss"], out_dir=str(out),
                        ckpt_every=max(args.steps // 2, 1), eval_every=0, log_every=max(args.steps // 10, 1),
                        **options)
    data = recipe.train_set
    while getattr(data, "report", None) is None and hasattr(data, "base"):   # RewrittenSet(FilteredSet(...))
        data = data.base
    if getattr(data, "report", None) is not None:
        filter_report = dataclasses.asdict(data.report)
    recipe.evaluate = None
    prep_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = run_recipe(recipe, resume=True, progress=False)
    train_s = time.perf_counter() - t1
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    bb = cliplab.load(f"local-dir:{res['checkpoint']}")
    t2 = time.perf_counter()
    cols = evaluate_row(bb, args)
    row = {"name": name, "loss": spec["loss"],
           "options": {k: v for k, v in spec["options"].items()}, **cols,
           "samples_per_s": median_samples_per_s(out / "metrics.jsonl"), "peak_mb": peak_mb,
           "final_loss": res.get("loss"), "train_s": round(train_s, 1), "prep_s": round(prep_s, 1),
           "eval_s": round(time.perf_counter() - t2, 1), "n_train": len(recipe.train_set),
           "budget": budget(args), "threads": args.threads}
    if filter_report:
        row["filter"] = filter_report
    (out / "result.json").write_text(json.dumps(row, indent=2))
    return row


def _child(name: str, args) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    run_row(name, args)


def _row_in_child(name: str, args) -> dict:
    """Run a row in a forked child (its own peak memory; the parent's imports are shared)."""
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_child, args=(name, args))
    proc.start()
    proc.join()
    result = Path(args.runs) / name / "result.json"
    if proc.exitcode or not result.exists():
        raise SystemExit(f"{name}: the row's process failed (exit code {proc.exitcode}); run again to resume it")
    return json.loads(result.read_text())


def _preload() -> None:
    """Import what every row uses once, before forking (no torch computation runs here)."""
    import cliplab.data.datasets  # noqa: F401
    import cliplab.dense.misalignment  # noqa: F401
    import cliplab.eval.tasks.segmentation  # noqa: F401
    import cliplab.train.recipes  # noqa: F401
    from cliplab.train.losses import list_losses

    list_losses()


# ------------------------------------------------------------------------ the table
def load_results(path: Path = RESULTS) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def add_costs(rows: dict) -> None:
    """``cost`` of each row: infonce's samples/s over the row's (same budget only)."""
    base = rows.get("infonce")
    for r in rows.values():
        ok = base and base.get("budget") == r.get("budget") and r.get("samples_per_s")
        r["cost"] = base["samples_per_s"] / r["samples_per_s"] if ok else None


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table_markdown(results: dict) -> str:
    """The comparison as a Markdown table (objectives first, then data variants, in registry order)."""
    rows = results["rows"]
    add_costs(rows)
    order = sorted(rows, key=lambda n: (n in DATA_VARIANTS, list(DATA_VARIANTS).index(n) if n in DATA_VARIANTS
                                        else 0, n))
    head = ("| row | loss | captions | seen | held-out | domains | i2t R@1 | i2t R@5 | t2i R@1 | t2i R@5 "
            "| mIoU | samples/s | peak MB | cost |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for n in order:
        r = rows[n]
        opts = r.get("options", {})
        caps = opts.get("captions", "scene") + (f" + {opts['rewrites']} rewrites" if opts.get("rewrites") else "")
        cost = "–" if r.get("cost") is None else f"{r['cost']:.2f}x"
        lines.append(f"| `{n}` | {r['loss']} | {caps} | {_pct(r['seen'])} | {_pct(r['heldout'])} | "
                     f"{_pct(r['domains'])} | {_pct(r['i2t_r1'])} | {_pct(r['i2t_r5'])} | {_pct(r['t2i_r1'])} | "
                     f"{_pct(r['t2i_r5'])} | {_pct(r['miou'])} | {r['samples_per_s']:.1f} | "
                     f"{r['peak_mb']:.0f} | {cost} |")
    return "\n".join(lines) + "\n"


def write_docs(results: dict, docs: Path = DOCS) -> None:
    """Replace the text between the table markers of ``docs`` with the table and its budget."""
    text = docs.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{docs}: no {START} ... {END} markers")
    budgets = {json.dumps(r.get("budget"), sort_keys=True) for r in results["rows"].values()}
    note = ""
    if len(budgets) == 1:
        b = json.loads(budgets.pop())
        note = (f"Budget of every row: {b['steps']} steps x batch {b['batch_size']}, lr {b['lr']}, "
                f"warm-up {b['warmup']}, seed {b['seed']}; data variants on a pool of {b['pool']} scenes.\n\n")
    block = f"{START}\n{note}{table_markdown(results)}{END}"
    docs.write_text(text[:text.index(START)] + block + text[text.index(END) + len(END):])


# --------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated rows (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=8192, help="scenes of the data-variant rows")
    ap.add_argument("--rewrites", type=int, default=4, help="LaCLIP rewrites per caption of the +rewrites rows")
    ap.add_argument("--n-eval", type=int, default=1000, help="single-object test scenes (seen / held-out)")
    ap.add_argument("--n-pairs", type=int, default=500, help="retrieval test pairs")
    ap.add_argument("--n-domain", type=int, default=300, help="test scenes per ShapesWorld 2 domain")
    ap.add_argument("--domains", default="outline,hand-drawn,color-cast")
    ap.add_argument("--n-seg", type=int, default=16, help="shapes:seg test scenes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default="runs/objectives", help="folder of the rows' runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--docs", action="store_true", help="write the table into docs/objectives.md")
    ap.add_argument("--force", action="store_true", help="re-run rows already done with this budget")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args(argv)

    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return
    _preload()
    names = row_names()
    if args.list:
        print("\n".join(names))
        return
    wanted = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {names}")
    results = load_results(args.out)
    for name in wanted:
        done = results["rows"].get(name)
        if done and done.get("budget") == budget(args) and not args.force:
            print(f"{name}: done with this budget (use --force to re-run)")
            continue
        cached = Path(args.runs) / name / "result.json"
        row = json.loads(cached.read_text()) if cached.exists() and not args.force else None
        if not row or row.get("budget") != budget(args):
            row = _row_in_child(name, args)
        results = load_results(args.out)                    # merge: another invocation may have added rows
        results["rows"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"{name}: seen {_pct(row['seen'])}, held-out {_pct(row['heldout'])}, domains "
              f"{_pct(row['domains'])}, i2t R@1 {_pct(row['i2t_r1'])}, t2i R@1 {_pct(row['t2i_r1'])}, "
              f"mIoU {_pct(row['miou'])}, {row['samples_per_s']:.1f} samples/s, {row['train_s']:.0f} s")
    if args.docs:
        write_docs(load_results(args.out))


if __name__ == "__main__":
    main()
