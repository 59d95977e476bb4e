"""``cliplab report``: comparison table and HTML page from results files."""

from __future__ import annotations

import sys

HELP = "build a comparison report from results JSON files"


def add_parser(sub) -> None:
    p = sub.add_parser("report", help=HELP,
                       description="Read results files (cliplab eval --out, or CLIP_benchmark JSON) and "
                                   "write report.md, report.csv, report.html and figures/ to --out.")
    p.add_argument("results", nargs="+", metavar="RESULTS",
                   help="results JSON files (one record or a list each), or folders of them "
                        "(every *.json inside, as clip_benchmark build reads them)")
    p.add_argument("--out", required=True, help="output folder (or an .html file)")
    p.add_argument("--title", default="cliplab evaluation report")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..eval.report import build_report
    from ..eval.results import read_results

    paths = build_report(read_results(args.results), args.out, title=args.title)
    for key in ("md", "csv", "html"):
        print(paths[key])
    summary = paths["md"].read_text(encoding="utf-8").split("\n## ")[1]   # the Summary section
    print("\n".join(line for line in summary.splitlines() if line.startswith("|")), file=sys.stderr)
    return 0
