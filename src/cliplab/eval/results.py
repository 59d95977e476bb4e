"""Results files, compatible with CLIP_benchmark's.

One record per (model, dataset, task)::

    {"dataset": "shapes:color-shape", "model": "shapes-tiny", "pretrained": "bundled",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.81, ...}, "language": "en",
     "cliplab": {"version", "model_spec", "fingerprint", "timings", "skipped", "seeds",
                 "confusion_matrix", "classnames", "fewshot", ...}}

The first six keys are CLIP_benchmark's (``clip_benchmark build`` reads them); everything
cliplab adds lives under ``"cliplab"``.  A file holds one record or a list (a suite).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from ..errors import DataError

__all__ = ["make_result", "write_results", "read_results", "split_model_spec", "BENCHMARK_KEYS"]

BENCHMARK_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")

_DETAIL_KEYS = ("confusion_matrix", "classnames", "fewshot", "seeds", "C", "val_accuracy")


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
    """JSON-safe: NumPy scalars/arrays to Python, NaN/inf to None."""
    import numpy as np

    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
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


def write_results(path, results) -> Path:
    """Write one record (dict) or a list of records as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_clean(results), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(paths) -> list[dict]:
    """Records from one or more results files (each a record or a list); checks the keys."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = []
    for p in map(Path, paths):
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
            out.append(r)
    return out
