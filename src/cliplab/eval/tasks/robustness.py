"""Eval task ``robustness``: zero-shot accuracy on the clean dataset and on shifted versions of it.

``--dataset`` is the in-distribution (clean) set; ``--shifted`` lists the shifted sets, as
dataset specs separated by commas (a user's folders: ``photos/,photos_blurred/,sketches/``;
ShapesWorld domains: ``shapes:color-shape@outline,shapes:color-shape@noise-3``; ``@*``
after a ShapesWorld task expands to every registered domain but ``original``).  Every shifted set must have
the clean set's classes.  Sets named ``<corruption>-<severity>`` (``noise-3``) are grouped
by corruption for the corruption error; ``--baseline RESULTS.json`` (this task's results for
a baseline model) adds mCE and relative mCE (:mod:`cliplab.eval.robustness`).

Metrics: ``acc1`` (clean), ``acc1@<shift>`` per shifted set, ``mean_shift_acc1``,
``relative_robustness`` (mean shifted / clean accuracy), ``mce`` and ``relative_mce`` with
a baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...errors import DataError, UsageError
from ...zeroshot import class_weights
from ..robustness import corruption_errors, split_severity
from . import EvalRequest, TaskResult, _timed, register_task


def expand_shifted(spec: str) -> list[str]:
    """The shifted dataset specs of ``--shifted``: split on commas, ``shapes:<task>@*`` expanded."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.startswith("shapes:") and part.endswith("@*"):
            from ...data.shapes import list_domains

            out += [f"{part[:-2]}@{d}" for d in list_domains() if d != "original"]
        else:
            out.append(part)
    if not out:
        raise UsageError("--shifted is empty; give dataset specs separated by commas")
    return out


def shift_name(spec: str, clean: str) -> str:
    """The short name of a shifted set: its ShapesWorld domain, or the spec itself."""
    base, _, domain = spec.rpartition("@")
    return domain if base and domain and spec.startswith("shapes:") else spec


def _accuracy(request: EvalRequest, data, weights) -> float:
    x, y, _ = request.labelled_features(data, data.name)
    if not len(y):
        raise DataError(f"none of the {len(data.items)} images of {data.name} could be read")
    return float(np.mean((x @ weights.T).argmax(axis=1) == y))


def _run(request: EvalRequest, data) -> TaskResult:
    spec = request.options.get("shifted")
    if not spec:
        raise UsageError("task robustness needs --shifted (dataset specs of the shifted sets, separated by commas)")
    shifted = expand_shifted(spec)
    timings: dict = {}
    templates = request.templates_for(data)
    with _timed(timings, "text_features"):
        w = class_weights(request.backbone, list(data.classnames), templates, store=request.store,
                          progress=request.progress)
    clean = _accuracy(request, data, w)
    accs: dict[str, float] = {}
    for s in shifted:
        other = request.load(spec=s, split=request.split, n=request.n)
        if list(getattr(other, "classnames", [])) != list(data.classnames):
            raise DataError(f"{s} does not have the classes of {data.name}; a shifted set needs the same classes")
        accs[shift_name(s, request.dataset)] = _accuracy(request, other, w)
    metrics = {"acc1": clean, **{f"acc1@{k}": v for k, v in accs.items()}}
    metrics["mean_shift_acc1"] = float(np.mean(list(accs.values())))
    metrics["relative_robustness"] = metrics["mean_shift_acc1"] / clean if clean > 0 else float("nan")
    errors = {k: 1 - v for k, v in accs.items()}
    baseline = baseline_clean = None
    if request.options.get("baseline"):
        path = Path(request.options["baseline"])
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the baseline results ({e})") from None
        rec = rec[0] if isinstance(rec, list) else rec
        if rec.get("task") != "robustness":
            raise DataError(f"{path}: not results of the robustness task (task {rec.get('task')!r})")
        bm = rec["metrics"]
        baseline = {k[len("acc1@"):]: 1 - v for k, v in bm.items() if k.startswith("acc1@")}
        baseline_clean = 1 - bm["acc1"]
    ce = corruption_errors(errors, 1 - clean, baseline, baseline_clean)
    if baseline is not None:
        metrics.update({"mce": ce["mce"], "relative_mce": ce["relative_mce"]})
    details = {"shifted": shifted, "accuracy": accs, "corruptions": ce, "classnames": list(data.classnames),
               "templates": templates, "baseline": request.options.get("baseline")}
    return TaskResult("robustness", data.name, metrics, details, timings)


def robustness_plot(record: dict) -> bytes:
    """Accuracy against severity per corruption, and per other shift, with the clean accuracy dashed."""
    from ..report import figure_png, new_figure

    accs = record["cliplab"]["accuracy"]
    clean = record["metrics"]["acc1"]
    curves: dict[str, dict[int, float]] = {}
    others = {}
    for k, v in accs.items():
        name, sev = split_severity(k)
        if sev is None:
            others[k] = v
        else:
            curves.setdefault(name, {})[sev] = v
    fig = new_figure(10 if curves and others else 6, 3.8)
    n = int(bool(curves)) + int(bool(others))
    i = 1
    if curves:
        ax = fig.add_subplot(1, n, i)
        i += 1
        for j, (name, pts) in enumerate(sorted(curves.items())):
            sev = sorted(pts)
            ax.plot(sev, [100 * pts[s] for s in sev], marker="o", label=name, color=f"C{j % 10}")
        ax.axhline(100 * clean, color="k", linestyle="--", linewidth=1, label="clean")
        ax.set_xticks(sorted({s for pts in curves.values() for s in pts}))
        ax.set_xlabel("severity")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("corruptions")
        ax.legend(fontsize=7, ncol=2)
    if others:
        ax = fig.add_subplot(1, n, i)
        names = list(others)
        bars = ax.bar(range(len(names)), [100 * others[k] for k in names], color="C0")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.axhline(100 * clean, color="k", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title("other shifts (dashed: clean)")
    return figure_png(fig)


@register_task("robustness", data="classification", run=_run,
               options={"shifted": "shifted dataset specs, comma-separated (shapes:TASK@* = every ShapesWorld domain)",
                        "baseline": "this task's results JSON of a baseline model, for mCE and relative mCE"},
               report={"heading": "Robustness", "plot": robustness_plot,
                       "explain": "Zero-shot top-1 accuracy on each shifted set: corruptions against their "
                                  "severity (left), other shifts as bars; the dashed line is the clean accuracy."},
               help="zero-shot accuracy under distribution shift: per shift, relative robustness, mCE")
def robustness(request: EvalRequest, data) -> TaskResult:
    """Zero-shot robustness to distribution shift (see the module docstring)."""
    return _run(request, data)
