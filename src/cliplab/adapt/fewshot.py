"""Fit a few-shot adapter or learner from a dataset spec and save/load it with its metadata.

What ``cliplab adapt`` and ``cliplab classify --adapter`` call.  The methods are those of
:data:`cliplab.adapt.METHODS`; an adapter whose ``fit`` needs more than features and labels
names those inputs in ``fit_inputs`` and :data:`FIT_INPUTS` provides them.  The adapter folder holds
what :func:`cliplab.adapt.save_adapter` writes plus ``cliplab_adapter.json``: the class
names, the method, the data it was fit on and the fingerprint of the model whose features
it was fit on, so a different model is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..data.text import read_text
from ..errors import DataError, UsageError
from ..validation import check_positive_int
from . import METHODS, list_methods

logger = logging.getLogger(__name__)

META_FILE = "cliplab_adapter.json"


def _has_val_split(spec: str) -> bool:
    return spec.startswith("shapes:") or (Path(spec) / "val").is_dir()


def _load_splits(spec: str, n_train, n_val, random_state: int):
    """(train, val) ClassificationData of ``spec``: its own val split, else 20 % of train."""
    from ..data.datasets import load_dataset, split_train_val

    if spec.startswith("shapes:") and spec.split(":", 1)[1].partition("@")[0] not in ("color-shape", "shape", "color"):
        raise UsageError(f"{spec}: adapt needs a ShapesWorld task with train and val splits: "
                         "shapes:color-shape, shapes:shape or shapes:color (each also @DOMAIN)")
    train = load_dataset(spec, "train", n=n_train, seed=0)
    if not hasattr(train, "labels"):
        raise UsageError(f"{spec} is an image-caption dataset; adapt needs images with class labels")
    if _has_val_split(spec):
        val = load_dataset(spec, "val", n=n_val, seed=0)
    else:
        train, val = split_train_val(train, seed=random_state)
    return train, val


def _caption_features(backbone, data, idx, store) -> np.ndarray:
    """Mean caption feature (unit norm) of each ShapesWorld training image ``idx``: (K*C, D)."""
    from ..data.shapes import ShapesWorld

    cfg = data.meta.get("world")
    if not cfg:
        raise UsageError("--method caps needs captions of the training images; the CLI has them for "
                         "ShapesWorld datasets (shapes:...) only")
    world = ShapesWorld(**cfg)
    caps = [world.scene("train", int(i)).captions for i in idx]
    flat = [c for cs in caps for c in cs]
    emb = store.text_features(flat) if store is not None else backbone.encode_texts(flat)   # (sum, D)
    out, s = [], 0
    for cs in caps:
        m = emb[s:s + len(cs)].mean(axis=0)
        out.append(m / np.linalg.norm(m))
        s += len(cs)
    return np.asarray(out, np.float32)                                                      # (N, D)


#: Providers of the extra ``fit`` inputs that adapters declare in ``fit_inputs``:
#: ``provider(backbone, train, idx, store) -> array`` for the training items ``idx``.
FIT_INPUTS = {"captions_X": _caption_features}


def _accepted(cls, params: dict) -> dict:
    accepted = cls().get_params()
    return {k: v for k, v in params.items() if k in accepted and v is not None}


def make_adapter(method: str, **params):
    """The training-free adapter ``method`` built with those of ``params`` it takes."""
    return METHODS.get(method)(**_accepted(METHODS.get(method), params))


def images_at_model_size(backbone, items) -> tuple[np.ndarray, np.ndarray]:
    """Items (paths, arrays, PIL images) as uint8 arrays (M, S, S, 3) at the model's input size.

    Arrays already at that size pass unchanged; others are decoded, resized (short side)
    and centre-cropped.  Returns the arrays and the indices of the items kept (unreadable
    ones are skipped and logged).
    """
    from PIL import Image, ImageOps

    from ..data.images import load_image
    from ..errors import BadImage

    size = int(backbone.image_size)
    out, kept = [], []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray) and item.shape == (size, size, 3) and item.dtype == np.uint8:
            out.append(item)
        else:
            try:
                img = Image.fromarray(item) if isinstance(item, np.ndarray) else load_image(item)
            except (BadImage, OSError, ValueError) as e:
                logger.warning("skipping unreadable image %s: %s", item, e)
                continue
            out.append(np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.BICUBIC)))
        kept.append(i)
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8), np.asarray(kept, np.int64)


def make_learner(method: str, backbone, classnames, **params):
    """The learner ``method`` over ``backbone`` and ``classnames`` with those ``params`` it takes."""
    cls = METHODS.get(method)
    return cls(backbone=backbone, classnames=list(classnames), **_accepted(cls, params))


def _fit_learner(backbone, method, train, val, idx, store, params):
    """Train a learner on the K-shot items ``idx`` of ``train``; returns (est, n_train, n_val, val_acc)."""
    from ..features import image_features

    names = list(train.classnames)
    est = make_learner(method, backbone, names, **params)
    if est.input_kind == "images":
        xt, kept_t = images_at_model_size(backbone, [train.items[i] for i in idx])
        xv, kept_v = images_at_model_size(backbone, val.items)
    else:
        xt, kept_t, _ = image_features(backbone, [train.items[i] for i in idx], store=store)
        xv, kept_v, _ = image_features(backbone, val.items, store=store)
    yt, yv = train.labels[idx[kept_t]], val.labels[kept_v]
    if len(np.unique(yt)) < 2:
        raise DataError(f"the few-shot draw has {len(np.unique(yt))} readable class(es); need at least 2")
    est.fit(xt, yt, X_val=xv, y_val=yv)
    return est, len(yt), len(yv), float(est.val_accuracy_), sorted(set(range(len(names))) - set(yt.tolist()))


def fit_adapter(backbone, *, method: str, dataset: str, shots: int, random_state: int = 0, store=None,
                templates="default", n_train=None, n_val=None, model_spec: str = "", **params):
    """Fit ``method`` on ``shots`` images per class of ``dataset``; returns (estimator, meta).

    ``random_state`` seeds the few-shot draw (and the validation split of a dataset without
    one).  ``store``: a FeatureStore or a cache folder for the image features.  ``params``
    go to a learner's constructor (``epochs``, ``lr``...; None means its default).

    Raises
    ------
    UsageError
        An unknown method, learner options for a training-free adapter, ``shots < 1``.
    DataError
        Fewer than two classes in the draw, or no validation image of a training class.
    """
    from ..data.datasets import ClassificationData, fewshot_subset
    from ..features import image_features
    from ..zeroshot import class_weights, get_templates

    kind = METHODS.meta(method).get("kind")          # UsageError naming the methods if unknown
    if isinstance(store, (str, Path)):
        from ..features import FeatureStore

        store = FeatureStore(store, backbone)
    given = sorted(k for k, v in params.items() if v is not None)
    if kind != "learner" and given:
        raise UsageError(f"{', '.join(given)} only apply to learners ({', '.join(list_methods('learner'))}); "
                         f"{method} chooses its hyper-parameters on the validation split")
    check_positive_int("--shots", shots)
    tpl = get_templates(templates)       # a bad template file fails before any image is read
    train, val = _load_splits(dataset, n_train, n_val, random_state)
    pool = ClassificationData(list(range(len(train))), train.labels, train.classnames, train.name)
    idx = np.asarray(fewshot_subset(pool, shots, random_state).items, dtype=np.int64)
    if kind == "learner":
        est, n_t, n_v, val_acc, missing = _fit_learner(backbone, method, train, val, idx, store, params)
        meta = {"method": method, "classnames": list(est.classnames_), "fingerprint": backbone.fingerprint,
                "model_spec": str(model_spec), "dataset": dataset, "shots": int(shots),
                "random_state": int(random_state), "n_train": n_t, "n_val": n_v, "val_accuracy": val_acc,
                "trainable_parameters": est.n_trainable_, "fit_seconds": round(est.fit_time_, 2)}
        if missing:
            meta["classes_without_examples"] = [train.classnames[c] for c in missing]
        return est, meta
    xt, kept_t, _ = image_features(backbone, [train.items[i] for i in idx], store=store)
    idx = idx[kept_t]
    yt = train.labels[idx]
    xv, kept_v, _ = image_features(backbone, val.items, store=store)
    yv = val.labels[kept_v]
    present = np.unique(yt)
    if len(present) < 2:
        raise DataError(f"{dataset}: the {shots}-shot draw has {len(present)} class(es); need at least 2")
    on = np.isin(yv, present)           # validation images of classes the adapter can predict
    if not on.any():
        raise DataError(f"{dataset}: no validation image belongs to a training class")
    names = list(train.classnames)
    text = class_weights(backbone, [names[c] for c in present], tpl)                       # (C', D)
    est = make_adapter(method, text_weights=text, logit_scale=backbone.logit_scale)
    extra = {name: FIT_INPUTS[name](backbone, train, idx, store) for name in est.fit_inputs}
    est.fit(xt, yt, X_val=xv[on], y_val=yv[on], **extra)
    est.image_encoder = backbone
    val_acc = float(np.mean(est.predict(xv) == yv))
    meta = {"method": method, "classnames": [names[int(c)] for c in est.classes_],
            "fingerprint": backbone.fingerprint, "model_spec": str(model_spec), "dataset": dataset,
            "shots": int(shots), "random_state": int(random_state), "templates": tpl, "n_train": int(len(yt)),
            "n_val": int(len(yv)), "val_accuracy": val_acc}
    if len(present) < len(names):
        meta["classes_without_examples"] = [n for c, n in enumerate(names) if c not in set(present.tolist())]
    return est, meta


def save_fitted(est, meta: dict, out) -> Path:
    """Write the adapter and ``cliplab_adapter.json`` (class names, model fingerprint...)."""
    from . import save_adapter

    out = Path(out)
    save_adapter(est, out)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def read_meta(path, backbone) -> dict:
    """``cliplab_adapter.json`` of an adapter folder, refusing an adapter fit on another model."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{path}: not an adapter folder (no {META_FILE}); make one with 'cliplab adapt'")
    text = read_text(meta_path, what="adapter metadata file")
    try:
        meta = json.loads(text)
        fp = str(meta["fingerprint"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: malformed adapter metadata ({e})") from None
    if fp != backbone.fingerprint:
        raise UsageError(f"adapter {path} was fit on the features of model {meta.get('model_spec') or '?'} "
                         f"(fingerprint {fp[:12]}), not of --model {backbone.name} "
                         f"({backbone.fingerprint[:12]}); pass the model it was fit with")
    return meta


def load_fitted(path, backbone):
    """(estimator, class names) of an adapter folder, refusing one fit on another model."""
    from . import load_adapter

    path = Path(path)
    meta = read_meta(path, backbone)
    if meta.get("method") == "ranking":
        raise UsageError(f"{path} is a ranking adapter; use it with 'cliplab rank --adapter'")
    try:
        names = list(meta["classnames"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{path / META_FILE}: malformed adapter metadata ({e})") from None
    est = load_adapter(path)
    if METHODS.meta(est.name).get("kind") == "learner":
        est.backbone = backbone          # learners keep using the towers of the model
    else:
        est.image_encoder = backbone     # adapters score the features of the model they were fit on
    if len(est.classes_) != len(names):
        raise DataError(f"{path}: the adapter has {len(est.classes_)} classes but {META_FILE} names {len(names)}")
    return est, names
