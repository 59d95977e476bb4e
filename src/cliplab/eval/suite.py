"""Run evaluation tasks on dataset specs and the ShapesWorld suite; returns results records.

:func:`evaluate` is what ``cliplab eval --task`` calls: it loads the dataset, computes
(cached) features and runs one task of :mod:`cliplab.eval.tasks`.  :func:`run_suite`
runs a named list of such evaluations (``SUITES``).  :func:`check_request` checks a
``cliplab eval`` request before anything is loaded, and :func:`evaluate_interpolation`
evaluates WiSE-FT mixes (``cliplab interpolate --sweep``).

The ``shapes`` suite; with shapes-tiny it takes well under a minute on 2 CPU cores
(``benchmarks/eval_suite.py`` measures it).  Test sets are shared between tasks, so their
features are computed once.  Linear probe and few-shot use the 8-way shape task, whose
classes all occur in train (the colour x shape task holds out compositions that train
never shows):

=============================  ==========================  ========================================
dataset                        task                        images
=============================  ==========================  ========================================
shapes:color-shape             zeroshot_classification     test 1280
shapes:shape                   zeroshot_classification     test 800 ("a photo of a {c}.")
shapes:color                   zeroshot_classification     test 800 ("a photo of a {c} shape.")
shapes:color-shape-heldout     zeroshot_classification     test 400
shapes:retrieval               zeroshot_retrieval          test 1000 (all captions)
shapes:shape                   linear_probe                train 2560 (20 % val), test 800
shapes:shape                   fewshot (linear probe)      same; k 1,2,4,8,16; seeds 0,1,2
=============================  ==========================  ========================================
"""

from __future__ import annotations

from typing import Sequence

from ..errors import UsageError
from ..validation import check_positive_int
from .results import make_result
from .tasks import FEWSHOT_C_GRID, TASKS, EvalRequest

__all__ = ["TASKS", "SUITES", "evaluate", "run_suite", "check_request", "evaluate_interpolation",
           "FEWSHOT_C_GRID"]

SUITES = {
    "shapes": [
        dict(task="zeroshot_classification", dataset="shapes:color-shape", n=1280),
        dict(task="zeroshot_classification", dataset="shapes:shape", n=800, templates="a photo of a {c}."),
        dict(task="zeroshot_classification", dataset="shapes:color", n=800,
             templates="a photo of a {c} shape."),
        dict(task="zeroshot_classification", dataset="shapes:color-shape-heldout", n=400),
        dict(task="zeroshot_retrieval", dataset="shapes:retrieval", n=1000),
        dict(task="linear_probe", dataset="shapes:shape", n=800, n_train=2560),
        dict(task="fewshot", dataset="shapes:shape", n=800, n_train=2560),
    ],
    # zero-shot accuracy on every ShapesWorld domain and corruption severity
    "robustness": [
        dict(task="robustness", dataset="shapes:color-shape", n=500, options={"shifted": "shapes:color-shape@*"}),
    ],
    # the model-risk report: robustness, calibration, OOD detection, subgroups and shortcuts
    "risk": [
        dict(task="robustness", dataset="shapes:color-shape", n=500, options={"shifted": "shapes:color-shape@*"}),
        dict(task="calibration", dataset="shapes:shape", n=800),
        dict(task="ood_detection", dataset="shapes:shape", n=800, n_train=1600, options={"ood_dataset": "shapes:ood"}),
        dict(task="fairness", dataset="shapes:spurious", n=800, n_train=1600,
             options={"attributes": "site,protected", "shortcut": "site", "predictor": "linear-probe"}),
    ],
}


_KIND_WORDS = {"classification": "a classification dataset (images with class labels)",
               "retrieval": "an image-caption dataset (try shapes:retrieval or a CSV/JSONL of image,caption)"}


def _require_kind(data, task, name=None):
    """Raise unless ``data`` (a dataset, or its ``kind``) is the kind that ``task`` evaluates (``TASKS.meta``)."""
    kind = data if isinstance(data, str) else data.kind
    need = TASKS.meta(task)["data"]
    if kind == need:
        return
    name = name or data.name
    article = "an" if kind[:1] in "aeiou" else "a"
    raise UsageError(f"task {task} needs {_KIND_WORDS.get(need, f'a {need} dataset')}; "
                     f"{name} is {article} {kind} dataset")


def _require_shapes_kind(task, dataset):
    """:func:`_require_kind` for a ``shapes:<task>`` spec whose registration declares its ``data`` kind."""
    if not (task in TASKS and isinstance(dataset, str) and dataset.startswith("shapes:")):
        return
    from ..data.shapes import SHAPES_TASKS

    name = dataset.split(":", 1)[1]
    if name in SHAPES_TASKS and "data" in SHAPES_TASKS.meta(name):
        _require_kind(SHAPES_TASKS.meta(name)["data"], task, dataset)


def evaluate(backbone, *, model_spec: str, task: str, dataset: str, split: str = "test",
             templates=None, store=None, n: int | None = None, n_train: int | None = None,
             seeds: Sequence[int] = (0, 1, 2), shots: Sequence[int] = (1, 2, 4, 8, 16),
             val_fraction: float = 0.2, options: dict | None = None, progress=None) -> dict:
    """Run one task on one dataset spec; return a results record (see :mod:`.results`).

    ``n`` limits the evaluated split, ``n_train`` the train split of ``linear_probe`` and
    ``fewshot`` (default: ``2 * n`` when ``n`` is given); the validation split is
    ``val_fraction`` of train (fixed seed).  ``options`` are the task's own options
    (``TASKS.meta(task)["options"]``).  The task's ``run`` (:func:`.tasks.register_task`)
    does the work.
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: use one of {', '.join(TASKS.names())}")
    _require_shapes_kind(task, dataset)  # before the scenes are rendered
    meta = TASKS.meta(task)
    options = dict(options or {})
    unknown = sorted(set(options) - set(meta.get("options", {})))
    if unknown:
        raise UsageError(f"task {task} has no option {', '.join(unknown)}")
    request = EvalRequest(backbone, dataset, split=split, n=n, n_train=n_train, templates=templates, store=store,
                          seeds=list(seeds), shots=list(shots), val_fraction=val_fraction, options=options,
                          progress=progress)
    data = request.load()
    _require_kind(data, task)
    res = meta["run"](request, data)
    res.timings = {**request.timings, **{k: v for k, v in res.timings.items() if k not in request.timings}}
    seen = {id(s) for s in request.skipped}
    res.skipped = list(request.skipped) + [s for s in res.skipped if id(s) not in seen]
    return make_result(res, model_spec=model_spec, fingerprint=backbone.fingerprint,
                       seeds=list(seeds) if task == "fewshot" else None,
                       extra={"split": split, "n": n})


def check_request(*, task: str | None = None, suite: str | None = None, dataset: str | None = None,
                  n: int | None = None, n_train: int | None = None, shots: Sequence[int] = (1,),
                  out=None, report=None) -> None:
    """Check an evaluation request before any model or data is loaded (``cliplab eval``).

    Parameters
    ----------
    task, suite : str, optional
        One evaluation (``task`` on ``dataset``) or a suite of them.
    dataset : str, optional
        Required with ``task``.
    n, n_train : int, optional
        Positive when given.
    shots : sequence of int
        Few-shot k values, all positive.
    out : path, optional
        With ``suite``, a folder for one results file per evaluation
        (:func:`cliplab.eval.results.results_folder`).
    report : path, optional
        An ``.html`` file, or a folder (no suffix).

    Raises
    ------
    UsageError
        Naming the offending option as the command line spells it.
    """
    from pathlib import Path

    from .results import results_folder

    if min(shots) < 1:
        raise UsageError(f"--shots must be positive, got {','.join(map(str, shots))}")
    check_positive_int("--n", n, allow_none=True)
    check_positive_int("--n-train", n_train, allow_none=True)
    if task and not dataset:
        raise UsageError("--task needs --dataset (a folder, CSV/JSONL, shards or shapes:NAME)")
    _require_shapes_kind(task, dataset)
    if suite and out:
        results_folder(out)                              # before the suite runs
    if report and not str(report).lower().endswith((".html", ".htm")) and Path(report).suffix:
        raise UsageError(f"--report must be an .html file or a folder, got {report}")


def run_suite(backbone, name: str, *, model_spec: str, store=None, progress=None,
              seeds: Sequence[int] = (0, 1, 2), shots: Sequence[int] = (1, 2, 4, 8, 16),
              on_result=None) -> list[dict]:
    """Run every evaluation of ``SUITES[name]``; ``on_result(record)`` is called after each."""
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}: use one of {', '.join(SUITES)}")
    out = []
    for entry in SUITES[name]:
        kw = dict(entry)
        rec = evaluate(backbone, model_spec=model_spec, store=store, progress=progress, seeds=seeds,
                       shots=shots, task=kw.pop("task"), dataset=kw.pop("dataset"), **kw)
        out.append(rec)
        if on_result is not None:
            on_result(rec)
    return out


def evaluate_interpolation(zero_shot, finetuned, alphas: Sequence[float], *, task: str, dataset: str,
                           split: str = "test", templates=None, cache=None, n: int | None = None,
                           extrapolate: bool = False, zero_shot_spec: str = "", finetuned_spec: str = "",
                           on_result=None) -> tuple[list[dict], list[dict]]:
    """Evaluate the WiSE-FT mix of two Backbones at each alpha (``cliplab interpolate --sweep``).

    Parameters
    ----------
    zero_shot, finetuned : Backbone
        Same architecture (:func:`cliplab.surgery.wise_ft.check_compatible`).
    alphas : sequence of float
        Weights of ``finetuned``, each in [0, 1] unless ``extrapolate``.
    task, dataset, split, templates, n
        As for :func:`evaluate`.
    cache : path, optional
        Feature cache folder; each mixed model gets its own entries (by fingerprint).
    zero_shot_spec, finetuned_spec : str
        The models' specs, recorded in each record (``cliplab.alpha``, ``..._spec``).
    on_result : callable, optional
        ``on_result(index, alpha, record)`` after each alpha.

    Returns
    -------
    rows : list of dict
        ``{"alpha": a, **numeric metrics}`` per alpha, in the given order.
    records : list of dict
        The results record of each alpha (:func:`cliplab.eval.results.make_result`).
    """
    from ..surgery.wise_ft import sweep

    records = []

    def evaluate_fn(backbone):
        store = None
        if cache:
            from ..features import FeatureStore

            store = FeatureStore(cache, backbone)
        rec = evaluate(backbone, model_spec=finetuned_spec, task=task, dataset=dataset, split=split,
                       templates=templates, store=store, n=n)
        records.append(rec)
        if on_result is not None:
            on_result(len(records) - 1, alphas[len(records) - 1], rec)
        return {k: v for k, v in rec["metrics"].items() if isinstance(v, (int, float))}

    rows = sweep(zero_shot, finetuned, alphas, evaluate_fn, extrapolate=extrapolate)
    for a, rec in zip(alphas, records):
        rec["cliplab"].update({"alpha": a, "zero_shot_spec": str(zero_shot_spec),
                               "finetuned_spec": str(finetuned_spec)})
    return rows, records
