"""All dense-task benchmarks of shapes-tiny on ShapesWorld, one table per task.

Runs (with ``--run``) or reads (by default) the results of the per-task scripts and
prints one Markdown table per task; ``--docs`` also writes them into
``docs/anomaly_detection.md`` between the ``dense-tasks`` markers:

=====================  =========================================  ==================================
task                   script                                     results
=====================  =========================================  ==================================
anomaly detection      ``anomaly_shapes.py``                      ``anomaly_shapes.json``
AnomalyCLIP            ``anomaly_shapes.py --only anomalyclip``   ``anomalyclip_shapes.json``
Soft-NMS speed         ``soft_nms.py``                            ``soft_nms.json``
detection (COCO AP)    ``detect_shapes.py``                       ``detect_shapes.json``
caption misalignment   ``misalignment_shapes.py``                 ``misalignment_shapes.json``
region embeddings      ``cloc_shapes.py``                         ``cloc_shapes.json``
=====================  =========================================  ==================================

Every script fixes its seeds; their own docstrings give the settings.  ``--run`` takes about
two hours of one core on an idle 2-core machine (AnomalyCLIP and CLOC training dominate).

    python benchmarks/dense_tasks.py [--run] [--docs]

Writes ``benchmarks/results/dense_tasks.json`` (the tables' numbers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "anomaly_detection.md"
BEGIN, END = "<!-- dense-tasks:begin -->", "<!-- dense-tasks:end -->"

SCRIPTS = [["anomaly_shapes.py"], ["anomaly_shapes.py", "--only", "anomalyclip"], ["soft_nms.py"],
           ["detect_shapes.py"], ["misalignment_shapes.py"], ["cloc_shapes.py"]]


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def anomaly_table(r: dict, title: str) -> list[str]:
    cols = ["image_auroc", "image_ap", "pixel_auroc", "pixel_aupro"]
    out = [f"**{title}** (mean over categories: {', '.join(k for k in next(iter(r['runs'].values())) if k != 'mean')})",
           "", "| method | image AUROC | image AP | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        out.append(f"| {name} | " + " | ".join(_num(run["mean"].get(c)) for c in cols) + " |")
    return out


def soft_nms_table(r: dict) -> list[str]:
    out = [f"**Soft-NMS at {r['n_boxes']} boxes** (ms per call, best of repeats)", "",
           "| rule | vectorised | reference loop | speed-up | identical output |", "|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        out.append(f"| {name} | {m['vectorised_ms']:.1f} | {m['reference_loop_ms']:.1f} | {m['speedup']:.1f}x | "
                   f"{'yes' if m['identical_indices'] else 'no'} (max score diff {m['max_score_diff']:g}) |")
    return out


def detect_table(r: dict) -> list[str]:
    out = [f"**Open-vocabulary detection** ({r['config']['n']} `shapes:det` scenes, COCO AP % by pycocotools)", "",
           "| rule | jittered truth: AP | AP50 | AR@100 | `dense+windows`: AP | AP50 |", "|---|---|---|---|---|---|"]
    for name in r["jittered_truth"]["rules"]:
        j = r["jittered_truth"]["rules"][name]
        p = r["pipeline"]["rules"][name]
        jm, pm = j.get("all", j), p.get("all", p)
        out.append(f"| {name} | {_pct(jm.get('AP'))} | {_pct(jm.get('AP50'))} | {_pct(jm.get('AR@100'))} | "
                   f"{_pct(pm.get('AP'))} | {_pct(pm.get('AP50'))} |")
    return out


def misalignment_table(r: dict) -> list[str]:
    out = ["**Caption misalignment** (one wrong word per caption; word AUROC of CLIP4DM attribution, caption "
           "AUROC of CLIPScore)", "", "| wrong word | word AUROC | localisation | chance | caption AUROC |",
           "|---|---|---|---|---|"]
    for kind, k in r["kinds"].items():
        out.append(f"| {kind} | {_num(k['word_auroc'])} | {_num(k['localisation_accuracy'])} | "
                   f"{_num(k['chance'])} | {_num(k['caption_auroc_clipscore'])} |")
    return out


def cloc_table(r: dict) -> list[str]:
    out = [f"**Region embeddings (CLOC)** ({r['n_test_regions']} boxes of {r['n_test_scenes']} test scenes)", "",
           "| region embedding | region classification | text → region grounding |", "|---|---|---|"]
    for name, m in r["methods"].items():
        out.append(f"| {name} | {_num(m['region_accuracy'])} | {_num(m['grounding_accuracy'])} |")
    out.append(f"| chance | {_num(r['chance']['region_accuracy'])} | {_num(r['chance']['grounding_accuracy'])} |")
    return out


TABLES = [("anomaly_shapes.json", lambda r: anomaly_table(r, "WinCLIP / WinCLIP+ (inspection categories)")),
          ("anomalyclip_shapes.json", lambda r: anomaly_table(r, "AnomalyCLIP vs WinCLIP on unseen categories")),
          ("soft_nms.json", soft_nms_table), ("detect_shapes.json", detect_table),
          ("misalignment_shapes.json", misalignment_table), ("cloc_shapes.json", cloc_table)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run every task's benchmark first")
    ap.add_argument("--docs", action="store_true", help="write the tables into docs/anomaly_detection.md")
    args = ap.parse_args()
    if args.run:
        for script in SCRIPTS:
            print("running", " ".join(script), flush=True)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:]], check=True, cwd=ROOT)
    blocks, missing, numbers = [], [], {}
    for name, table in TABLES:
        path = RESULTS / name
        if not path.exists():
            missing.append(name)
            continue
        result = json.loads(path.read_text())
        numbers[name] = result
        blocks.append("\n".join(table(result)))
    text = "\n\n".join(blocks)
    print(text)
    if missing:
        print(f"\nmissing results (run their scripts or --run): {', '.join(missing)}", file=sys.stderr)
    (RESULTS / "dense_tasks.json").write_text(json.dumps({"tables": text, "missing": missing}, indent=2) + "\n")
    if args.docs:
        doc = DOC.read_text()
        if BEGIN not in doc:
            raise SystemExit(f"{DOC} has no {BEGIN} marker")
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
