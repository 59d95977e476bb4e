"""Results files that CLIP_benchmark's ``clip_benchmark build`` reads as its own.

One record per (model, dataset, task), one record per file::

    {"dataset": "shapes:color-shape", "model": "shapes-tiny", "pretrained": "bundled",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.81, ...}, "language": "en",
     "cliplab": {"version", "model_spec", "fingerprint", "timings", "skipped", "seeds",
                 "confusion_matrix", "classnames", "fewshot", ...}}

The format is CLIP_benchmark's (1.6, ``clip_benchmark/cli.py``: ``run`` writes a record,
``main_build`` reads them):

- ``build`` takes files, or folders whose ``*.json`` files it reads (not recursively);
  each file must hold one JSON object.  Its ``metrics`` and its other top-level keys become
  the columns of one CSV row.  A suite is therefore written as a folder with one file per
  evaluation (:func:`write_results` with a list), each named as CLIP_benchmark's default
  ``--output`` template names them, ``{dataset}_{pretrained}_{model}_{language}_{task}.json``
  (:func:`result_filename`).
- Metric names are CLIP_benchmark's: zero-shot ``acc1``, ``acc5``,
  ``mean_per_class_recall``; linear probe ``lp_acc1``, ``lp_acc5``,
  ``lp_mean_per_class_recall``; retrieval ``image_retrieval_recall@k`` (text -> image) and
  ``text_retrieval_recall@k`` (image -> text).  Few-shot (``acc1@{k}shot``) is a cliplab
  task with no CLIP_benchmark counterpart; its columns are its own.
- ``acc5`` with fewer than 5 classes is NaN.  Non-finite numbers are written as Python's
  ``json`` writes them (``NaN``, ``Infinity``), as CLIP_benchmark does; strict JSON
  parsers (``jq``, browsers) reject these tokens.
- Everything cliplab adds lives under ``"cliplab"`` (one column in ``build``'s CSV).

A file holding a JSON list of records (what ``cliplab eval --suite`` wrote before, and what
the benchmark scripts write to collect records) is read by :func:`read_results` and
``cliplab report``, but not by ``clip_benchmark build``.  Linear-probe records written
before the ``lp_`` names are read with their metrics renamed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

from ..errors import DataError, UsageError

logger = logging.getLogger("cliplab.eval.results")

__all__ = ["make_result", "write_results", "read_results", "result_filename", "results_folder",
           "split_model_spec", "BENCHMARK_KEYS"]

BENCHMARK_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")

#: Linear-probe metric names of records written before they followed CLIP_benchmark.
_LEGACY_NAMES = {"linear_probe": {"acc1": "lp_acc1", "acc5": "lp_acc5",
                                  "mean_per_class_recall": "lp_mean_per_class_recall"}}


def split_model_spec(spec: str) -> tuple[str, str]:
    """CLIP_benchmark's (model, pretrained) pair for a cliplab model spec.

    ``ViT-B-32:laion2b_s34b_b79k`` -> (``ViT-B-32``, ``laion2b_s34b_b79k``);
    ``hf-hub:org/name`` -> (``hf-hub:org/name``, ``hf-hub``); a bundled name -> (name,
    ``bundled``); a folder or file -> (its name, its path).
    """
    spec = str(spec)
    if spec.startswith("hf-hub:"):
        return spec, "hf-hub"
    if os.sep in spec or "/" in spec or Path(spec).exists():
        return Path(spec).name or spec, spec
    if ":" in spec:
        arch, tag = spec.split(":", 1)
        return arch, tag
    return spec, "bundled"


def _clean(v):
    """JSON-ready: NumPy scalars/arrays to Python; NaN and inf stay floats (written ``NaN``)."""
    import numpy as np

    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    return v


def make_result(task_result, *, model_spec: str, fingerprint: str | None = None,
                seeds=None, extra: dict | None = None, language: str = "en") -> dict:
    """A results record from a :class:`~cliplab.eval.tasks.TaskResult`."""
    from .. import __version__

    model, pretrained = split_model_spec(model_spec)
    details = dict(task_result.details)
    ours = {"version": __version__, "model_spec": str(model_spec), "fingerprint": fingerprint,
            "timings": dict(task_result.timings), "skipped": list(task_result.skipped),
            "n_skipped": len(task_result.skipped)}
    if seeds is not None:
        ours["seeds"] = list(seeds)
    ours.update(details)
    ours.update(extra or {})
    return _clean({"dataset": task_result.dataset, "model": model, "pretrained": pretrained,
                   "task": task_result.task, "metrics": dict(task_result.metrics),
                   "language": language, "cliplab": ours})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=@-]+", "_", text).strip("_") or "x"


def result_filename(record: dict) -> str:
    """The file name CLIP_benchmark gives a record: ``{dataset}_{pretrained}_{model}_{language}_{task}.json``.

    As its ``run`` does, a ``pretrained`` that is a path contributes its last part; characters
    that are not safe in file names on every system (``/``, ``:``, spaces...) become ``_``.
    """
    pretrained = str(record.get("pretrained") or "")
    if "/" in pretrained or os.sep in pretrained:
        pretrained = Path(pretrained).name or pretrained
    parts = [record["dataset"], pretrained, record["model"], record.get("language") or "en", record["task"]]
    return _slug("_".join(str(p) for p in parts))[:200] + ".json"


def results_folder(path) -> Path:
    """Check that ``path`` can be a folder of results files (one per record).

    Raises
    ------
    UsageError
        ``path`` ends in ``.json`` or is an existing file: several records cannot go in one
        file that ``clip_benchmark build`` reads.
    """
    path = Path(path)
    if path.suffix.lower() == ".json" or (path.exists() and not path.is_dir()):
        folder = path.with_suffix("")
        raise UsageError(f"{path} must be a folder: each evaluation is written to its own JSON file in it, "
                         f"as CLIP_benchmark writes them (e.g. --out {folder}; read them back with "
                         f"`cliplab report {folder}` or `clip_benchmark build {folder}`)")
    return path


def _write_json(path: Path, obj) -> Path:
    """Write ``obj`` as JSON atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_clean(obj), f, indent=2)   # allow_nan: NaN/Infinity, as CLIP_benchmark writes
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_results(path, results) -> Path:
    """Write results records as JSON files, atomically.

    Parameters
    ----------
    path : path
        For one record (a dict): the file, or an existing folder to put
        :func:`result_filename` in.  For a list: a folder that gets one file per record
        (``clip_benchmark build FOLDER`` reads it); a path ending in ``.json`` instead gets
        one JSON list, which :func:`read_results` reads and ``clip_benchmark build`` does not.
    results : dict or list of dict

    Returns
    -------
    Path
        The file written, or the folder.
    """
    path = Path(path)
    if isinstance(results, dict):
        return _write_json(path / result_filename(results) if path.is_dir() else path, results)
    if path.suffix.lower() == ".json":
        return _write_json(path, list(results))
    results_folder(path).mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for r in results:
        name = result_filename(r)
        stem, i = name[:-len(".json")], 1
        while name in used:                       # same dataset, model and task twice
            i += 1
            name = f"{stem}_{i}.json"
        used.add(name)
        _write_json(path / name, r)
    return path


def _upgrade(record: dict) -> dict:
    """A record written before the metric names followed CLIP_benchmark, renamed."""
    names = _LEGACY_NAMES.get(record.get("task"))
    metrics = record.get("metrics")
    if names and isinstance(metrics, dict) and not any(new in metrics for new in names.values()):
        if any(old in metrics for old in names):
            record = {**record, "metrics": {names.get(k, k): v for k, v in metrics.items()}}
    return record


def read_results(paths) -> list[dict]:
    """Records from results files and folders; checks the keys.

    Parameters
    ----------
    paths : path or list of paths
        Files holding one record or a list of records, or folders whose ``*.json`` files are
        read (not recursively, in name order), as ``clip_benchmark build`` reads them.

    Raises
    ------
    DataError
        A file cannot be read, is not JSON, or holds something that is not a record; a
        folder holds no ``.json`` file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix == ".json" and f.is_file())
            if not found:
                raise DataError(f"{p} holds no results files (*.json)")
            files.extend(found)
        else:
            files.append(p)
    out = []
    for p in files:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"cannot read results file {p}: {e.strerror or e}") from e
        except ValueError as e:
            raise DataError(f"{p} is not valid JSON: {e}") from e
        records = data if isinstance(data, list) else [data]
        for i, r in enumerate(records):
            missing = [k for k in ("dataset", "model", "task", "metrics") if not isinstance(r, dict) or k not in r]
            if missing:
                raise DataError(f"{p}: record {i} is not a results record (missing {', '.join(missing)})")
            out.append(_upgrade(r))
    return out
