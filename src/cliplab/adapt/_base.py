"""What every feature adapter shares: validation, the validation split, scoring.

An adapter is a scikit-learn classifier on image features (N, D).  Subclasses implement
``_fit(X, y, X_val, y_val, **extra)`` (``y`` and ``y_val`` are class indices 0..C-1,
``X_val`` is ``None`` when no validation split can be had) and ``_logits(X)`` -> (N, C).

Hyper-parameters are chosen on a validation split, never on test:

- ``fit(X, y, X_val, y_val)`` with a validation split: chosen on it;
- without one, a stratified split is carved from ``X`` with
  :func:`cliplab.data.datasets.split_train_val` (``val_fraction``, seed
  ``random_state``; each class with at least two examples gives
  ``round(val_fraction * n_c)`` of them, at least one, never all), the hyper-parameters are
  chosen on it and the final model is refit on all of ``X``;
- when some class has a single example (1-shot), no split is carved and the paper's
  default values are used.

The one scorer is :func:`val_accuracy`; every candidate of every search goes through it.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import UsageError
from ..zeroshot.classifier import softmax

__all__ = ["FeatureAdapter", "val_accuracy", "best_of"]


def val_accuracy(logits: np.ndarray, y_val: np.ndarray) -> float:
    """Validation accuracy of logits (N, C) against class indices (N,): the one scorer."""
    return float(np.mean(np.argmax(logits, axis=1) == y_val))


def best_of(candidates, y_val: np.ndarray, fallback: dict | None = None) -> tuple[dict, float]:
    """The candidate ``(params, logits)`` with the best validation accuracy.

    Ties go to the earlier candidate: the reference implementations keep the first strictly
    better one, so callers yield candidates in the reference's loop order.  With a
    ``fallback``, a candidate must score above 0 to be kept, as in the references (they
    start from accuracy 0 and their initial values); when none does, ``(fallback, 0.0)``
    is returned.  Without one, the first candidate is kept then.  Each candidate is scored
    before the next is drawn, so a generator may reuse one logits buffer.
    """
    best, best_acc = (fallback, 0.0) if fallback is not None else (None, -1.0)
    for params, logits in candidates:
        acc = val_accuracy(logits, y_val)
        if acc > best_acc:
            best, best_acc = params, acc
    return best, best_acc


def carve_validation(y: np.ndarray, val_fraction: float, random_state: int):
    """Stratified (train_idx, val_idx) of class indices ``y``, or ``None`` for a class of 1."""
    from ..data.datasets import ClassificationData, split_train_val

    counts = np.bincount(y)
    if len(counts) == 0 or counts.min() < 2:
        return None
    data = ClassificationData(list(range(len(y))), y, [str(c) for c in range(len(counts))], "train")
    tr, va = split_train_val(data, val_fraction=val_fraction, seed=random_state)
    return np.asarray(tr.items, dtype=np.int64), np.asarray(va.items, dtype=np.int64)


class FeatureAdapter(ClassifierMixin, BaseEstimator):
    """Base class: fit/validation plumbing and the prediction methods.

    Subclasses define ``__init__`` (keyword-only, stores params verbatim), ``_fit`` and
    ``_logits``.  ``decision_function`` follows scikit-learn: (N, C), or (N,) for two
    classes (the logit difference); ``predict_proba`` is the softmax of the logits.
    """

    _dtype = np.float64
    input_kind = "features"
    #: Names of the extra keyword inputs ``fit`` needs beyond ``X, y`` (e.g. CapS-Adapter's
    #: ``("captions_X",)``); :func:`cliplab.adapt.fewshot.fit_adapter` provides them.
    fit_inputs: tuple[str, ...] = ()
    #: Small constructor parameters that keep the searches short in tests (the scikit-learn
    #: estimator checks run on ``cls(**cls.test_preset)``); not used by the library.
    test_preset: dict = {}
    #: The Backbone whose image features the adapter scores (the prediction protocol of
    #: :func:`cliplab.zeroshot.classify_images`).  Not a parameter: an adapter works on
    #: features; :func:`cliplab.adapt.fewshot.load_fitted` and ``fit_adapter`` set it.
    image_encoder = None

    # ------------------------------------------------------------------ helpers
    def _check_text_weights(self, n_classes: int, n_features: int):
        tw = getattr(self, "text_weights", None)
        if tw is None:
            return None
        tw = np.asarray(tw, dtype=self._dtype)
        if tw.shape != (n_classes, n_features):
            raise UsageError(f"text_weights must be (C, D) = ({n_classes}, {n_features}), one row per "
                             f"class in sorted label order; got {tw.shape}")
        return tw

    def _zero_shot(self, X: np.ndarray) -> np.ndarray | float:
        """``logit_scale * X T^T`` (N, C), or 0.0 without text weights."""
        if self.text_weights_ is None:
            return 0.0
        return self.logit_scale * (X @ self.text_weights_.T)                     # (N, C)

    # ---------------------------------------------------------------------- fit
    def fit(self, X, y, X_val=None, y_val=None, **extra):
        """Fit on features ``X`` (N, D) and labels ``y`` (N,).

        ``X_val``, ``y_val``: an optional validation split for the hyper-parameters the
        method searches; without it one is carved from ``X`` (see the module notes).
        Test data must never be passed here.
        """
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        X = X.astype(self._dtype, copy=False)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise UsageError(f"an adapter needs at least 2 classes; got one class ({self.classes_[0]!r})")
        self.text_weights_ = self._check_text_weights(len(self.classes_), X.shape[1])
        if (X_val is None) != (y_val is None):
            raise UsageError("give both X_val and y_val, or neither")
        if X_val is not None:
            X_val = validate_data(self, X_val, reset=False, dtype=[np.float64, np.float32])
            X_val = X_val.astype(self._dtype, copy=False)
            y_val = np.asarray(y_val)
            if len(y_val) != len(X_val):
                raise UsageError(f"X_val has {len(X_val)} rows but y_val has {len(y_val)} labels")
            unknown = np.setdiff1d(y_val, self.classes_)
            if len(unknown):
                raise UsageError(f"y_val has labels absent from y: {unknown[:5].tolist()}")
            yv_idx = np.searchsorted(self.classes_, y_val)
            self.selection_ = "validation"
        else:
            yv_idx = None
            self.selection_ = "default"
        self._fit(X, y_idx.astype(np.int64), X_val, yv_idx, **extra)
        return self

    def _carve(self, y_idx: np.ndarray):
        """(train_idx, val_idx) carved from the training labels, or None (see module notes)."""
        split = carve_validation(y_idx, self.val_fraction, self.random_state)
        if split is not None:
            self.selection_ = "carved"
        return split

    # ------------------------------------------------------------------ predict
    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return X.astype(self._dtype, copy=False)

    def decision_function(self, X) -> np.ndarray:
        """Logits (N, C); for two classes the difference ``logit_1 - logit_0`` (N,)."""
        check_is_fitted(self)
        z = self._logits(self._check_X(X))
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the logits over the classes: (N, C), rows sum to 1."""
        check_is_fitted(self)
        return softmax(self._logits(self._check_X(X)))

    def predict_proba_features(self, X) -> np.ndarray:
        """:meth:`predict_proba` of features of :attr:`image_encoder` (the prediction protocol)."""
        return self.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row: (N,), values from ``classes_``."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self._logits(self._check_X(X)), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags
