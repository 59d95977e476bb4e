"""``cliplab demo``: the main job on the bundled model, offline."""

from __future__ import annotations

from ._common import add_model_args, load_backbone, table_string

HELP = "classify a fresh ShapesWorld test set zero-shot and write a report"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=HELP,
                       description="Render ShapesWorld test scenes, classify them zero-shot with the "
                                   "model (bundled shapes-tiny by default) and write demo-output/: "
                                   "images, predictions.csv, report.md and grid.png.")
    p.add_argument("--n", type=int, default=48, help="number of test scenes (default: 48)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--out", default="demo-output")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo
    from ..validation import check_positive_int

    check_positive_int("--n", args.n)
    bb = load_backbone(args)
    res = run_demo(bb, args.out, n=args.n, seed=args.seed)
    shown = [{k: r[k] for k in ("image", "true", "predicted", "prob", "correct")} for r in res.rows]
    print(table_string(shown), end="")
    print(f"\naccuracy {100 * res.accuracy:.1f}% on {len(res.rows)} scenes ({res.n_classes} classes); "
          f"seen compositions {_pct(res.accuracy_seen)}, held-out {_pct(res.accuracy_heldout)}")
    print(f"wrote {res.out_dir}/: images/, predictions.csv, report.md, grid.png")
    return 0


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"
