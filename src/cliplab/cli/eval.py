"""``cliplab eval``: evaluate a model on a task and dataset, or on a whole suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..eval.tasks import TASKS
from ._common import add_model_args, load_backbone, write_rows

HELP = "evaluate a model: zero-shot, retrieval, linear probe, few-shot"


def default_cache() -> Path:
    """``$CLIPLAB_CACHE`` or ``~/.cache/cliplab/features``."""
    return Path(os.environ.get("CLIPLAB_CACHE") or Path.home() / ".cache" / "cliplab" / "features")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help=HELP,
        description="Evaluate a model on one task and dataset (--task, --dataset) or on a suite "
                    "(--suite shapes). Writes results JSON that CLIP_benchmark's `clip_benchmark "
                    "build` reads as its own (one file per evaluation) and an optional HTML report. "
                    "Datasets: an image folder (one sub-folder per class), "
                    "a CSV/JSONL, WebDataset shards, or shapes:color-shape, shapes:shape, "
                    "shapes:color, shapes:color-shape-heldout, shapes:retrieval; "
                    "shapes:TASK@DOMAIN renders the same scenes in a domain (a controlled "
                    "shift such as shapes:color-shape@blur-3; see cliplab shapes export --help).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=TASKS.names())
    what.add_argument("--suite", help="a named suite of evaluations: 'shapes' = zero-shot colour-shape, "
                                      "shape, colour and held-out compositions, retrieval, linear probe "
                                      "and few-shot on ShapesWorld (under a minute with shapes-tiny on 2 CPU cores)")
    p.add_argument("--dataset", help="dataset spec (required with --task)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--templates", default=None,
                   help="zero-shot template set (default, openai-7, openai-80), a file, or a string "
                        "with {c} (default: the dataset's own templates, else 'default')")
    p.add_argument("--out", help="results: with --task a JSON file (or an existing folder to put it in); "
                                 "with --suite a folder that gets one JSON file per evaluation, named "
                                 "as CLIP_benchmark names its own "
                                 "({dataset}_{pretrained}_{model}_{language}_{task}.json)")
    p.add_argument("--report", help="HTML report to write (Markdown, CSV and PNGs go beside it)")
    p.add_argument("--cache", help="feature cache folder (default: $CLIPLAB_CACHE or "
                                   "~/.cache/cliplab/features)")
    p.add_argument("--no-cache", action="store_true", help="compute features without the cache")
    p.add_argument("--n", type=int, help="use at most N images of the evaluated split")
    p.add_argument("--n-train", type=int, help="train images for linear_probe/fewshot (default: 2*N)")
    p.add_argument("--seeds", default="0,1,2", help="few-shot seeds (default: 0,1,2)")
    p.add_argument("--shots", default="1,2,4,8,16", help="few-shot k values (default: 1,2,4,8,16)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="how to print the metrics (default: table)")
    add_model_args(p)
    p.set_defaults(run=run)


def _ints(text: str, option: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not vals:
        raise UsageError(f"{option} is empty")
    return vals


def metric_rows(records) -> list[dict]:
    return [{"dataset": r["dataset"], "task": r["task"], "metric": k, "value": v}
            for r in records for k, v in r["metrics"].items()]


def run(args) -> int:
    from ..eval.results import write_results
    from ..eval.suite import check_request, evaluate, run_suite

    seeds = _ints(args.seeds, "--seeds")
    shots = _ints(args.shots, "--shots")
    check_request(task=args.task, suite=args.suite, dataset=args.dataset, n=args.n, n_train=args.n_train,
                  shots=shots, out=args.out, report=args.report)
    backbone = load_backbone(args)
    store = None
    if not args.no_cache:
        from ..features import FeatureStore

        store = FeatureStore(args.cache or default_cache(), backbone)
    if args.suite:
        done = []

        def show(rec):
            done.append(rec)
            print(f"[{len(done)}] {rec['dataset']} {rec['task']}: "
                  + ", ".join(f"{k}={v:.4f}" for k, v in rec["metrics"].items() if isinstance(v, float)),
                  file=sys.stderr)

        records = run_suite(backbone, args.suite, model_spec=args.model, store=store, seeds=seeds,
                            shots=shots, on_result=show)
    else:
        records = [evaluate(backbone, model_spec=args.model, task=args.task, dataset=args.dataset,
                            split=args.split, templates=args.templates, store=store, n=args.n,
                            n_train=args.n_train, seeds=seeds, shots=shots)]
    if args.out:
        written = write_results(args.out, records if args.suite else records[0])
        print(f"results: {written}", file=sys.stderr)
    if args.report:
        from ..eval.report import build_report

        paths = build_report(records, args.report)
        print(f"report: {paths['html']}", file=sys.stderr)
    write_rows(metric_rows(records), args.format)
    n_skipped = sum(len(r["cliplab"].get("skipped") or []) for r in records)
    if n_skipped:
        print(f"skipped {n_skipped} unreadable image(s); they are listed in the results", file=sys.stderr)
    return 0
