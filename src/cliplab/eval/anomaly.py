"""Anomaly detection evaluation over an MVTec-style folder (MVTec AD, VisA, ShapesWorld inspection sets)
or an :class:`~cliplab.data.datasets.AnomalyData` (``shapes:inspection``; the ``anomaly`` eval task).

For each category: fit the method on ``shots`` normal training images (drawn with ``seed``;
zero-shot methods take none), score every test image, and compute the table row of
:func:`cliplab.eval.anomaly_metrics.anomaly_metrics` (image AUROC / AP / F1-max, and pixel
AUROC / AUPRO / F1-max where masks exist).  The mean over categories is added as ``"mean"``,
as the papers report it.  Masks are resized to the maps (the model's input size, S x S), so
images are assumed square, as in MVTec AD.
"""

from __future__ import annotations

import logging

import numpy as np

from ..data.anomaly_folder import AnomalyCategory, read_anomaly_folder, resize_mask
from ..errors import UsageError
from ..validation import check_positive_int
from .anomaly_metrics import anomaly_metrics

logger = logging.getLogger(__name__)

__all__ = ["evaluate_anomaly", "evaluate_categories", "evaluate_category", "categories_of"]


def evaluate_category(backbone, category: AnomalyCategory, *, method: str = "winclip", shots: int = 0,
                      seed: int = 0, prompt_name: str | None = None, batch_size: int = 32,
                      method_options: dict | None = None):
    """Metrics of one category, and the method's result (scores and maps).

    ``method_options`` are further keyword arguments of the method's class (AnomalyCLIP's
    ``prompts``).  Test images and masks may be files or arrays.

    Returns
    -------
    metrics : dict
        ``n_test``, ``n_defective``, ``shots`` and the metric values.
    result : AnomalyResult
    masks : ndarray (N, S, S) of bool
    """
    from ..dense.anomaly import ANOMALY_METHODS

    cls = ANOMALY_METHODS.get(method)
    shots = check_positive_int("shots", shots, minimum=0)
    if cls.needs_references and shots == 0:
        raise UsageError(f"anomaly method {method!r} is few-shot: give --shots K (K >= 1)")
    name = prompt_name or category.name.replace("_", " ")
    model = cls(backbone, category=name, batch_size=batch_size, **(method_options or {}))
    if shots:
        if len(category.train) < shots:
            raise UsageError(f"{category.name}: {shots} shots asked but train/good has {len(category.train)} images")
        pick = np.random.default_rng(seed).choice(len(category.train), shots, replace=False)
        model.fit([category.train[i] for i in sorted(pick)])
    result = model.predict(category.test)
    size = result.maps.shape[-1]
    masks = np.stack([resize_mask(m, size) if m is not None else np.zeros((size, size), bool)
                      for m in category.masks])
    has_masks = any(m is not None for m in category.masks)
    metrics = {"n_test": len(category.test), "n_defective": int(category.labels.sum()), "shots": shots}
    metrics.update(anomaly_metrics(category.labels, result.scores, masks if has_masks else None,
                                   result.maps if has_masks else None))
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in metrics.items()}, result, masks


def categories_of(test, train=None) -> list[AnomalyCategory]:
    """Group an :class:`~cliplab.data.datasets.AnomalyData` (and its normal training images) by category.

    Parameters
    ----------
    test : AnomalyData
        The evaluated images, masks and labels.
    train : AnomalyData, optional
        Normal images of the same categories (the few-shot references).

    Returns
    -------
    list of AnomalyCategory
        Sorted by name; ``masks`` are the data's masks (arrays or files) for defective
        images, None for normal ones.

    Raises
    ------
    DataError
        A category without both normal and defective test images.
    """
    from ..errors import DataError

    labels = np.asarray(test.labels)
    out = []
    for name in sorted(set(test.categories)):
        idx = [i for i, c in enumerate(test.categories) if c == name]
        if len(set(labels[idx].tolist())) < 2:
            raise DataError(f"{test.name}: category {name!r} needs both normal and defective test images")
        refs = [x for x, c, y in zip(train.items, train.categories, train.labels) if c == name and y == 0] \
            if train is not None else []
        out.append(AnomalyCategory(name, refs, [test.items[i] for i in idx], labels[idx].astype(np.int64),
                                   [test.defects[i] for i in idx],
                                   [test.masks[i] if labels[i] else None for i in idx]))
    return out


def evaluate_categories(backbone, categories, *, method: str = "winclip", shots: int = 0, seed: int = 0,
                        batch_size: int = 32, method_options: dict | None = None, progress: bool | None = None,
                        on_result=None) -> dict:
    """:func:`evaluate_category` on each of ``categories``, plus their ``"mean"`` (see :func:`evaluate_anomaly`)."""
    from .._progress import progress_bar

    cats = list(categories)
    out = {}
    for cat in progress_bar(cats, progress=progress, desc="anomaly categories"):
        out[cat.name], result, _ = evaluate_category(backbone, cat, method=method, shots=shots, seed=seed,
                                                     batch_size=batch_size, method_options=method_options)
        if on_result is not None:
            on_result(cat, result)
        logger.info("%s: %s", cat.name, out[cat.name])
    keys = [k for k in out[cats[0].name] if k not in ("n_test", "n_defective", "shots")
            and all(k in v for v in out.values())]
    out["mean"] = {k: float(np.mean([v[k] for v in out.values()])) for k in keys}
    return out


def evaluate_anomaly(backbone, root, *, method: str = "winclip", shots: int = 0, categories=None, seed: int = 0,
                     batch_size: int = 32, progress: bool | None = None, on_result=None,
                     method_options: dict | None = None) -> dict:
    """Evaluate an anomaly method on every category of an MVTec-style folder.

    Parameters
    ----------
    backbone : Backbone
    root : str or Path
        The dataset folder (or one category folder).
    method : str, default="winclip"
        A name of :data:`cliplab.dense.anomaly.ANOMALY_METHODS`.
    shots : int, default=0
        Normal reference images per category (few-shot methods).
    categories : sequence of str, optional
    seed : int, default=0
        Draws the reference images.
    batch_size : int, default=32
    progress : bool, optional
    on_result : callable, optional
        Called as ``on_result(category, result)`` with each category's
        :class:`~cliplab.dense.anomaly.AnomalyResult` (to save maps).
    method_options : dict, optional
        Further arguments of the method (``{"prompts": path}`` for AnomalyCLIP).

    Returns
    -------
    dict
        ``{category: metrics, ..., "mean": mean of each metric over categories}``.

    Raises
    ------
    DataError
        A malformed folder (:func:`cliplab.data.anomaly_folder.read_anomaly_folder`).
    UsageError
        An unknown method, or shots missing / more than the training images.
    """
    return evaluate_categories(backbone, read_anomaly_folder(root, categories), method=method, shots=shots,
                               seed=seed, batch_size=batch_size, method_options=method_options, progress=progress,
                               on_result=on_result)
