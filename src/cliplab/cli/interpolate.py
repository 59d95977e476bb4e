"""``cliplab interpolate``: WiSE-FT weight interpolation between a zero-shot and a fine-tuned
model (see :mod:`cliplab.surgery.wise_ft`)."""

from __future__ import annotations

import sys

from ..errors import UsageError
from ..eval.tasks import TASKS
from ._common import add_model_args, load_backbone, write_rows

HELP = "WiSE-FT: mix a zero-shot and a fine-tuned model's weights"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "interpolate", help=HELP,
        description="Mix two models of the same architecture, (1 - alpha) * ZERO_SHOT + alpha * "
                    "FINETUNED (WiSE-FT, arXiv:2109.01903). With --alpha, write the mixed model as an "
                    "open_clip folder (--out). With --sweep, evaluate the mixed model at each alpha on "
                    "--task/--dataset, print alpha vs metrics and optionally write the results records.")
    p.add_argument("zero_shot", metavar="ZERO_SHOT", help="model spec of the zero-shot model")
    p.add_argument("finetuned", metavar="FINETUNED", help="model spec of the fine-tuned model")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--alpha", type=float,
                      help="weight of the fine-tuned model (0 = zero-shot, 1 = fine-tuned)")
    what.add_argument("--sweep", help="comma-separated alphas to evaluate, e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--extrapolate", action="store_true", help="allow alpha outside [0, 1]")
    p.add_argument("--out", help="with --alpha: model folder to write (required); "
                                 "with --sweep: a folder that gets one results JSON file per alpha, "
                                 "as clip_benchmark build reads them")
    p.add_argument("--task", choices=TASKS.names(), default="zeroshot_classification",
                   help="with --sweep: evaluation task (default: zeroshot_classification)")
    p.add_argument("--dataset", help="with --sweep: dataset spec, e.g. shapes:shape (required)")
    p.add_argument("--split", default="test", help="with --sweep: split to evaluate (default: test)")
    p.add_argument("--templates", default=None, help="with --sweep: zero-shot template set")
    p.add_argument("--n", type=int, help="with --sweep: use at most N images of the evaluated split")
    p.add_argument("--cache", help="with --sweep: feature cache folder (default: no cache)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="how to print the sweep (default: table)")
    add_model_args(p, spec=False)  # applied to both models
    p.set_defaults(run=run)


def _alphas(text: str) -> list[float]:
    try:
        vals = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sweep takes comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UsageError("--sweep is empty")
    return vals


def _validate(args) -> list[float] | None:
    from ..validation import check_positive_int

    if args.alpha is not None:
        if not args.out:
            raise UsageError("--alpha needs --out (the model folder to write)")
        return None
    if not args.dataset:
        raise UsageError("--sweep needs --dataset (a folder, CSV/JSONL, shards or shapes:NAME)")
    check_positive_int("--n", args.n, allow_none=True)
    if args.out:
        from ..eval.results import results_folder

        results_folder(args.out)
    return _alphas(args.sweep)


def run(args) -> int:
    from ..surgery.wise_ft import check_alpha, interpolate

    alphas = _validate(args)
    for a in alphas or [args.alpha]:
        check_alpha(a, args.extrapolate)                      # before loading anything
    zero_shot, finetuned = load_backbone(args, args.zero_shot), load_backbone(args, args.finetuned)
    if alphas is None:
        out = interpolate(zero_shot, finetuned, args.alpha, extrapolate=args.extrapolate).save(args.out)
        print(f"alpha {args.alpha:g}: (1 - alpha) * {args.zero_shot} + alpha * {args.finetuned} -> {out}")
        return 0

    from ..eval.suite import evaluate_interpolation

    def show(i, alpha, rec):
        print(f"[{i + 1}/{len(alphas)}] alpha {alpha:g}: "
              + ", ".join(f"{k}={v:.4f}" for k, v in rec["metrics"].items() if isinstance(v, float)),
              file=sys.stderr)

    rows, records = evaluate_interpolation(
        zero_shot, finetuned, alphas, task=args.task, dataset=args.dataset, split=args.split,
        templates=args.templates, cache=args.cache, n=args.n, extrapolate=args.extrapolate,
        zero_shot_spec=args.zero_shot, finetuned_spec=args.finetuned, on_result=show)
    if args.out:
        from ..eval.results import write_results

        write_results(args.out, records)
    if args.format == "table":
        rows = [{**r, "alpha": f"{r['alpha']:g}"} for r in rows]
    write_rows(rows, args.format)
    return 0
