"""Reports from results records: a comparison table (Markdown + CSV) and an HTML page.

The HTML page is self-contained (plots embedded as base64 PNG); the same plots are
also written as PNG files, which the Markdown file links to.  Sections:

- summary table: one row per (dataset, task, metric), one column per model;
- confusion matrices of zero-shot classification (row-normalised, with class names);
- few-shot curves: accuracy against shots, mean ± std over seeds, one line per
  (model, method), with the model's zero-shot accuracy as a dashed line;
- retrieval recall bars (text -> image and image -> text, R@k per model);
- skipped files and seconds per stage.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import re
from pathlib import Path

import numpy as np

__all__ = ["build_report", "comparison_rows", "model_label", "MAIN_METRICS", "new_figure", "figure_png"]

MAIN_METRICS = {
    "zeroshot_classification": ["acc1", "acc5", "mean_per_class_recall"],
    "linear_probe": ["lp_acc1", "lp_mean_per_class_recall"],
    "zeroshot_retrieval": ["image_retrieval_recall@1", "image_retrieval_recall@5",
                           "text_retrieval_recall@1", "text_retrieval_recall@5"],
}

_EXPLAIN = {
    "table": "Main metrics (higher is better), one column per model; the best value of each row is bold. "
             "acc1/acc5: top-1/top-5 accuracy (acc5 is empty with fewer than 5 classes); "
             "mean_per_class_recall: accuracy averaged over classes; lp_: the same for the linear probe; "
             "image_retrieval_recall@k: text-to-image, a caption's image is in the top k; "
             "text_retrieval_recall@k: image-to-text, one of an image's captions is in the top k; "
             "acc1@Nshot: few-shot accuracy with N labelled images per class (mean over seeds); "
             "mIoU/aAcc/mAcc: segmentation as mmsegmentation computes them, IoU/<class>: per-class IoU.",
    "confusion": "Zero-shot confusion matrices, rows = true class, columns = predicted class, "
                 "each row normalised to 1 (the diagonal is per-class recall).",
    "fewshot": "Few-shot accuracy on the test split against the number of labelled images per class; "
               "line = mean over seeds, band = ± one standard deviation; dashed line = zero-shot top-1 "
               "of the same model on the same dataset. Hyper-parameters were chosen on a validation split.",
    "retrieval": "Retrieval recall@k. Text→image: a caption finds its image in the top k; "
                 "image→text: an image finds at least one of its captions in the top k.",
    "skipped": "Images that could not be read and were left out of the metrics.",
    "timings": "Wall-clock seconds per stage (features come from the cache when warm).",
}


def model_label(r: dict) -> str:
    """The column name of a record's model: ``model`` or ``model:pretrained`` (open_clip tags).

    Inside :func:`build_report` a second run of the same model on the same dataset and
    task gets its own column, ``model (2)``.
    """
    if "_column" in r:
        return r["_column"]
    pre = str(r.get("pretrained") or "")
    if not pre or pre in ("bundled", "hf-hub") or "/" in pre or "\\" in pre:
        return str(r["model"])
    return f"{r['model']}:{pre}"


def _with_columns(results: list[dict]) -> list[dict]:
    """Copies of the records with a ``_column`` label, unique per (dataset, task)."""
    used: set = set()
    out = []
    for r in results:
        base, i = model_label(r), 1
        label = base
        while (label, r["dataset"], r["task"]) in used:
            i += 1
            label = f"{base} ({i})"
        used.add((label, r["dataset"], r["task"]))
        out.append({**r, "_column": label})
    return out


def _metric_names(r: dict) -> list[str]:
    main = MAIN_METRICS.get(r["task"])
    return [m for m in main if m in r["metrics"]] if main else list(r["metrics"])


def comparison_rows(results: list[dict]) -> tuple[list[str], list[dict]]:
    """Rows ``{"dataset", "task", "metric", <model>: value...}`` and the model columns."""
    models: list[str] = []
    table: dict[tuple, dict] = {}
    for r in results:
        m = model_label(r)
        if m not in models:
            models.append(m)
        for name in _metric_names(r):
            key = (r["dataset"], r["task"], name)
            table.setdefault(key, {})[m] = r["metrics"][name]
    rows = [{"dataset": d, "task": t, "metric": n, **{m: vals.get(m) for m in models}}
            for (d, t, n), vals in table.items()]
    return models, rows


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.1f}"


def _best(row, models):
    vals = [row[m] for m in models if isinstance(row[m], (int, float)) and np.isfinite(row[m])]
    return max(vals) if len(vals) > 1 and max(vals) > min(vals) else None  # bold only a clear best


# ------------------------------------------------------------------------------ plots
def new_figure(w: float, h: float):
    """A matplotlib ``Figure`` of ``w`` x ``h`` inches, 100 dpi, constrained layout (no pyplot state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def figure_png(fig) -> bytes:
    """The PNG bytes of ``fig``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


_figure, _png = new_figure, figure_png

#: Built-in plot sections: (section, heading).  A task adds its own with the ``report``
#: metadata of :func:`cliplab.eval.tasks.register_task`.
_SECTIONS = [("confusion", "Confusion matrices"), ("fewshot", "Few-shot curves"), ("retrieval", "Retrieval")]


def _task_report(task: str) -> dict | None:
    from .tasks import TASKS

    return TASKS.meta(task).get("report") if task in TASKS else None


def _sections(plots) -> list[tuple[str, str, str]]:
    """(section, heading, explanation) of every section that has plots, built-in ones first."""
    out = [(sec, head, _EXPLAIN[sec]) for sec, head in _SECTIONS]
    seen = {sec for sec, _ in _SECTIONS}
    for section, _, _, _ in plots:
        if section not in seen:
            seen.add(section)
            spec = _task_report(section) or {}
            out.append((section, spec.get("heading", section), spec.get("explain", "")))
    present = {p[0] for p in plots}
    return [s for s in out if s[0] in present]


def _confusion_plot(r: dict) -> bytes:
    cm = np.asarray(r["cliplab"]["confusion_matrix"], dtype=float)
    names = r["cliplab"].get("classnames") or [str(i) for i in range(len(cm))]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    c = len(cm)
    side = min(14.0, max(4.0, 0.18 * c + 2.5))
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fs = max(4, min(9, int(300 / max(c, 1))))
    ax.set_xticks(range(c), names, rotation=90, fontsize=fs)
    ax.set_yticks(range(c), names, fontsize=fs)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = r["metrics"].get("acc1")
    ax.set_title(f"{model_label(r)} — {r['dataset']}" + (f" (top-1 {100 * acc:.1f}%)" if acc is not None else ""))
    if c <= 12:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="black" if norm[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class")
    return _png(fig)


def _fewshot_plot(dataset: str, curves: list[tuple[str, dict, float | None]]) -> bytes:
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    for i, (label, curve, zs) in enumerate(curves):
        ks = np.asarray(curve["ks"], float)
        mean, std = np.asarray(curve["mean"], float), np.asarray(curve["std"], float)
        col = colors[i % len(colors)]
        ax.plot(ks, 100 * mean, marker="o", color=col, label=f"{label} — {curve.get('method', '')}")
        ax.fill_between(ks, 100 * (mean - std), 100 * (mean + std), color=col, alpha=0.2)
        if zs is not None:
            ax.axhline(100 * zs, color=col, linestyle="--", linewidth=1, label=f"{label} — zero-shot")
    ax.set_xscale("log", base=2)
    all_ks = sorted({k for _, c, _ in curves for k in c["ks"]})
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.set_xlabel("labelled images per class (k)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"Few-shot — {dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _retrieval_plot(dataset: str, recs: list[dict]) -> bytes:
    fig = _figure(8, 3.8)
    for col, (prefix, title) in enumerate([("image_retrieval_recall@", "text → image"),
                                           ("text_retrieval_recall@", "image → text")]):
        ax = fig.add_subplot(1, 2, col + 1)
        ks = sorted({int(k[len(prefix):]) for r in recs for k in r["metrics"] if k.startswith(prefix)})
        width = 0.8 / max(len(recs), 1)
        for i, r in enumerate(recs):
            vals = [100 * (r["metrics"].get(f"{prefix}{k}") or 0.0) for k in ks]
            x = np.arange(len(ks)) + (i - (len(recs) - 1) / 2) * width
            bars = ax.bar(x, vals, width, label=model_label(r), color=f"C{i % 10}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(ks)), [f"R@{k}" for k in ks])
        ax.set_ylim(0, 105)
        ax.set_ylabel("recall (%)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(f"Retrieval — {dataset}")
    return _png(fig)


# ------------------------------------------------------------------------------ writers
def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:80] or "plot"


def _paths(out) -> dict:
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        return {"html": out, "md": out.with_suffix(".md"), "csv": out.with_suffix(".csv"),
                "figures": out.parent / f"{out.stem}_figures"}
    return {"html": out / "report.html", "md": out / "report.md", "csv": out / "report.csv",
            "figures": out / "figures"}


def _plots(results: list[dict]) -> list[tuple[str, str, str, bytes]]:
    """(section, caption, file stem, png bytes) for every plot of the report."""
    plots = []
    for r in results:
        if r["task"] == "zeroshot_classification" and r.get("cliplab", {}).get("confusion_matrix"):
            plots.append(("confusion", f"{model_label(r)} — {r['dataset']}",
                          _slug(f"confusion_{model_label(r)}_{r['dataset']}"), _confusion_plot(r)))
    zero = {(model_label(r), r["dataset"]): r["metrics"].get("acc1") for r in results
            if r["task"] == "zeroshot_classification"}
    by_ds: dict[str, list] = {}
    for r in results:
        for curve in (r.get("cliplab", {}).get("fewshot") or []):
            by_ds.setdefault(r["dataset"], []).append(
                (model_label(r), curve, zero.get((model_label(r), r["dataset"]))))
    for ds, curves in by_ds.items():
        plots.append(("fewshot", ds, _slug(f"fewshot_{ds}"), _fewshot_plot(ds, curves)))
    ret: dict[str, list] = {}
    for r in results:
        if r["task"] == "zeroshot_retrieval":
            ret.setdefault(r["dataset"], []).append(r)
    for ds, recs in ret.items():
        plots.append(("retrieval", ds, _slug(f"retrieval_{ds}"), _retrieval_plot(ds, recs)))
    for r in results:                                      # sections of tasks that bring their own plots
        spec = _task_report(r["task"])
        if spec and r.get("cliplab"):
            caption = f"{model_label(r)} — {r['dataset']}"
            plots.append((r["task"], caption, _slug(f"{r['task']}_{model_label(r)}_{r['dataset']}"), spec["plot"](r)))
    return plots


def _skipped(results):
    return [(model_label(r), r["dataset"], s) for r in results
            for s in (r.get("cliplab", {}).get("skipped") or [])]


def _timings(results):
    rows = []
    for r in results:
        t = r.get("cliplab", {}).get("timings") or {}
        if t:
            rows.append((model_label(r), r["dataset"], r["task"], t))
    return rows


def _markdown(title, models, rows, plots, paths, results) -> str:
    lines = [f"# {title}", "", f"Models: {', '.join(models)}", "", "## Summary", "", _EXPLAIN["table"],
             "", "| dataset | task | metric | " + " | ".join(models) + " |",
             "|---|---|---|" + "---:|" * len(models)]
    for row in rows:
        best = _best(row, models)
        cells = [(f"**{_fmt(row[m])}**" if best is not None and row[m] == best else _fmt(row[m]))
                 for m in models]
        lines.append(f"| {row['dataset']} | {row['task']} | {row['metric']} | " + " | ".join(cells) + " |")
    for section, heading, explain in _sections(plots):
        sec = [p for p in plots if p[0] == section]
        if sec:
            lines += ["", f"## {heading}", "", explain, ""]
            for _, caption, stem, _ in sec:
                rel = (paths["figures"] / f"{stem}.png").relative_to(paths["md"].parent)
                lines.append(f"![{caption}]({rel.as_posix()})")
    skipped = _skipped(results)
    if skipped:
        lines += ["", "## Skipped files", "", _EXPLAIN["skipped"], ""]
        lines += [f"- {m} / {d}: {s.get('source')} — {s.get('reason')}" for m, d, s in skipped[:200]]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
p.note{color:#555;font-size:14px}figure{display:inline-block;margin:0.5em}
figcaption{font-size:13px;color:#555;text-align:center}img{max-width:100%}"""


def _html(title, models, rows, plots, results) -> str:
    e = html.escape
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    versions = sorted({str(r.get("cliplab", {}).get("version")) for r in results if r.get("cliplab")})
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           f"<p class='note'>Models: <b>{e(', '.join(models))}</b> · {len(results)} results · "
           f"generated {when}" + (f" · cliplab {e(', '.join(versions))}" if versions else "") + "</p>",
           "<h2>Summary</h2>", f"<p class='note'>{e(_EXPLAIN['table'])}</p>",
           "<table><tr><th>dataset</th><th>task</th><th>metric</th>"
           + "".join(f"<th>{e(m)}</th>" for m in models) + "</tr>"]
    for row in rows:
        best = _best(row, models)
        cells = "".join(f"<td class='num'>{'<b>' if best is not None and row[m] == best else ''}"
                        f"{_fmt(row[m])}{'</b>' if best is not None and row[m] == best else ''}</td>"
                        for m in models)
        out.append(f"<tr><td>{e(row['dataset'])}</td><td>{e(row['task'])}</td>"
                   f"<td>{e(row['metric'])}</td>{cells}</tr>")
    out.append("</table>")
    for section, heading, explain in _sections(plots):
        sec = [p for p in plots if p[0] == section]
        if sec:
            out += [f"<h2>{e(heading)}</h2>", f"<p class='note'>{e(explain)}</p>"]
            for _, caption, _, png in sec:
                b64 = base64.b64encode(png).decode("ascii")
                out.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{b64}'>"
                           f"<figcaption>{e(caption)}</figcaption></figure>")
    skipped = _skipped(results)
    if skipped:
        out += ["<h2>Skipped files</h2>", f"<p class='note'>{e(_EXPLAIN['skipped'])}</p><ul>"]
        out += [f"<li>{e(m)} / {e(d)}: {e(str(s.get('source')))} — {e(str(s.get('reason')))}</li>"
                for m, d, s in skipped[:200]]
        out.append("</ul>")
    timings = _timings(results)
    if timings:
        out += ["<h2>Timings</h2>", f"<p class='note'>{e(_EXPLAIN['timings'])}</p>",
                "<table><tr><th>model</th><th>dataset</th><th>task</th><th>seconds per stage</th>"
                "<th>total</th></tr>"]
        for m, d, t, st in timings:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in st.items())
            out.append(f"<tr><td>{e(m)}</td><td>{e(d)}</td><td>{e(t)}</td><td>{e(stages)}</td>"
                       f"<td class='num'>{sum(st.values()):.2f}</td></tr>")
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def build_report(results: list[dict], out, *, title: str = "cliplab evaluation report") -> dict:
    """Write the Markdown table, CSV table, HTML page and PNG plots of ``results``.

    Parameters
    ----------
    results : list of dict
        Results records (:func:`cliplab.eval.results.read_results`).
    out : path
        A folder (gets ``report.html``, ``report.md``, ``report.csv``, ``figures/``) or an
        ``.html`` file (the others go beside it: ``NAME.md``, ``NAME.csv``, ``NAME_figures/``).

    Returns
    -------
    dict of str -> Path
        ``html``, ``md``, ``csv``, ``figures``.
    """
    if isinstance(results, dict):
        results = [results]
    results = _with_columns(results)
    paths = _paths(out)
    paths["html"].parent.mkdir(parents=True, exist_ok=True)
    models, rows = comparison_rows(results)
    plots = _plots(results)
    if plots:
        paths["figures"].mkdir(parents=True, exist_ok=True)
        for _, _, stem, png in plots:
            (paths["figures"] / f"{stem}.png").write_bytes(png)
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["dataset", "task", "metric", *models])
        w.writeheader()
        w.writerows(rows)
    paths["md"].write_text(_markdown(title, models, rows, plots, paths, results), encoding="utf-8")
    paths["html"].write_text(_html(title, models, rows, plots, results), encoding="utf-8")
    return paths
