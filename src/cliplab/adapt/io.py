"""Save and load fitted adapters: ``adapter.json`` + ``adapter.safetensors``.

``adapter.json`` holds the class name, the cliplab version, the JSON-able constructor
parameters, the fitted scalars and string ``classes_``; ``adapter.safetensors`` holds
every fitted array (``fitted.<name>``) and array parameters (``param.<name>``, e.g.
``text_weights``).  Callable parameters (``CapSAdapter.caption_features``) are not saved:
they are only needed by ``fit``, and come back as ``None``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError, UsageError

__all__ = ["save_adapter", "load_adapter"]

FORMAT = 1


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _classes() -> dict:
    """Class name -> class of every saveable estimator: the methods of :data:`cliplab.adapt.METHODS`
    and :class:`~cliplab.adapt.ranking.RankingAdapter` (a scalar regressor, outside that registry of
    classifiers)."""
    from . import METHODS
    from .ranking import RankingAdapter

    return {**{c.__name__: c for _, c in METHODS.items()}, RankingAdapter.__name__: RankingAdapter}


def save_adapter(est, directory) -> Path:
    """Write a fitted adapter to ``directory`` (created if needed); returns the folder."""
    from safetensors.numpy import save_file
    from sklearn.utils.validation import check_is_fitted

    from .. import __version__

    cls = type(est).__name__
    if cls not in _classes():
        raise UsageError(f"save_adapter saves cliplab adapters; got {cls}")
    check_is_fitted(est)
    tensors, params, tuples, fitted = {}, {}, [], {}
    for name, v in est.get_params(deep=False).items():
        if name == "backbone":       # the model is not part of the adapter; load_fitted gives it back
            params[name] = None
        elif isinstance(v, np.ndarray):
            tensors[f"param.{name}"] = np.ascontiguousarray(v)
        elif callable(v):
            params[name] = None
        else:
            if isinstance(v, tuple):
                tuples.append(name)
            params[name] = _jsonable(v)
    for name, v in vars(est).items():
        if not name.endswith("_") or name.startswith("_"):
            continue
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            tensors[f"fitted.{name}"] = np.ascontiguousarray(v)
        elif isinstance(v, dict) and v and all(isinstance(a, np.ndarray) for a in v.values()):
            for key, a in v.items():             # e.g. trained tensors by parameter name
                tensors[f"fitted_dict.{name}.{key}"] = np.ascontiguousarray(a)
        elif isinstance(v, np.ndarray):
            fitted[name] = {"list": [_jsonable(x) for x in v.tolist()], "dtype": v.dtype.str}
        else:
            fitted[name] = {"value": _jsonable(v)}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "class": cls, "cliplab_version": __version__, "params": params,
            "tuple_params": tuples, "fitted": fitted}
    save_file(tensors, str(out / "adapter.safetensors"))
    (out / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def load_adapter(directory):
    """The fitted adapter saved in ``directory`` by :func:`save_adapter`."""
    from safetensors.numpy import load_file

    d = Path(directory)
    try:
        meta = json.loads((d / "adapter.json").read_text(encoding="utf-8"))
        tensors = load_file(str(d / "adapter.safetensors"))
    except (OSError, ValueError) as e:
        raise DataError(f"{d} is not a saved adapter (adapter.json + adapter.safetensors): {e}") from e
    classes = _classes()
    if meta.get("class") not in classes:
        raise DataError(f"{d}: unknown adapter class {meta.get('class')!r}")
    params = dict(meta["params"])
    for name in meta.get("tuple_params", []):
        params[name] = tuple(params[name])
    for key, v in tensors.items():
        if key.startswith("param."):
            params[key[len("param."):]] = v
    est = classes[meta["class"]](**params)
    for name, rec in meta["fitted"].items():
        if "list" in rec:
            setattr(est, name, np.asarray(rec["list"], dtype=np.dtype(rec["dtype"])))
        else:
            setattr(est, name, rec["value"])
    for key, v in tensors.items():
        if key.startswith("fitted."):
            setattr(est, key[len("fitted."):], v)
        elif key.startswith("fitted_dict."):
            name, sub = key[len("fitted_dict."):].split(".", 1)
            if not isinstance(getattr(est, name, None), dict):
                setattr(est, name, {})
            getattr(est, name)[sub] = v
    return est
