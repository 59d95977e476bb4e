"""Linear probe: L2-regularised multinomial logistic regression on frozen features.

Paper: Alec Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, arXiv:2103.00020, Sec. 3.2 and App. A.3; the few-shot protocol
follows CoOp's re-implementation (Kaiyang Zhou et al., "Learning to Prompt for
Vision-Language Models", IJCV 2022, arXiv:2109.01134; ``lpclip/linear_probe.py``).

Algorithm:

    (1) logits = f W^T + b,  W, b = argmin  CE(f W^T + b, y) + ||W||^2 / (2 C)    (L-BFGS)
    (2) C chosen on validation by :func:`search_C`, CoOp's ``lpclip`` search: fit
        C in (1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6), take the first best c*; then 8 steps of
        a binary search in log10 C on [c*/10, 10 c*]: fit both ends, keep the better
        (the left on ties), shrink the interval to the half between the winner and the
        log-midpoint.  C is the winner of the last step.

Defaults: ``C=None`` (searched on validation); 1.0 when no validation split can be had;
``max_iter=1000``; the estimator is :func:`logistic_regression`.  ``refit=True`` fits the
final probe on train + validation once C is chosen (the benchmark protocol of
:func:`cliplab.eval.tasks.linear_probe`); ``refit=False`` (default) on the training data only,
as CoOp's ``lpclip``.

Deviations
----------
- The CLIP paper and CoOp feed unnormalised image features; cliplab's features are
  L2-normalised at the boundary, and the probe uses them as they are.
- Checked against KaiyangZhou/CoOp@ff61507c ``lpclip/linear_probe.py``, run unmodified on
  the same few-shot features (1-16 shots): MATCH (see :func:`search_C`).
- The CLIP paper (App. A.3) describes a parametric binary search that halves the interval
  around the peak to 8 steps per decade; the search here is CoOp's code for it, the one
  cliplab uses everywhere (the benchmark task included).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from .._progress import progress_bar
from . import METHODS
from ._base import FeatureAdapter

__all__ = ["LinearProbe", "search_C", "logistic_regression", "quiet_fits", "SINGLE_THREAD_BELOW"]

DEFAULT_C = 1.0
#: CoOp ``lpclip``'s initial C values, in its order.
C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


#: Below this many feature values (N * D) fits run with one BLAS/OpenMP thread: small
#: L-BFGS problems are dominated by thread start-up and, on a busy machine, by spinning
#: threads (measured on 2 cores beside a training run: 1280 x 128 features, 8 classes,
#: one fit 2.5-15 s with 2 threads, 0.01 s with 1).
SINGLE_THREAD_BELOW = 4_000_000


def logistic_regression(C: float = 1.0, *, random_state: int = 0, max_iter: int = 1000):
    """The linear-probe estimator: scikit-learn L-BFGS multinomial logistic regression, eq. (1)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, random_state=random_state)


@contextmanager
def quiet_fits(n_values: int = 0):
    """Run small scikit-learn fits single-threaded and hide their expected warnings.

    Few-shot subsets have few samples per class ("unique classes > 50 % of samples") and
    the C search reaches values where L-BFGS stops at ``max_iter`` (ConvergenceWarning);
    both are part of the protocol, not user errors.  ``n_values``: N * D of the fit
    (:data:`SINGLE_THREAD_BELOW`).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1 if n_values < SINGLE_THREAD_BELOW else None):
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The number of unique classes is greater")
        yield


def search_C(train, val, *, steps: int = 8, random_state: int = 0, max_iter: int = 1000, tried: list | None = None,
             progress: bool | None = False) -> tuple[float, float]:
    """CoOp's linear-probe C search (``lpclip/linear_probe.py``): ``(C, its val accuracy)``.

    ``train`` and ``val`` are ``(X (N, D), y (N,))``.  Fits :data:`C_GRID`, takes the first
    best c*, then ``steps`` rounds on [c*/10, 10 c*]: fit both ends, keep the right one only
    if strictly better, continue on [log-midpoint, right] or [left, log-midpoint].  Only
    ``val`` is scored; with a ``tried`` list, every ``(C, val accuracy)`` is appended to it
    in the order fitted.
    """
    (xt, yt), (xv, yv) = train, val
    tried = [] if tried is None else tried
    bar = progress_bar(total=len(C_GRID) + 2 * int(steps), progress=progress, desc="linear probe C", unit="fit")

    def val_acc(C):
        with quiet_fits(np.size(xt)):
            est = logistic_regression(C, random_state=random_state, max_iter=max_iter).fit(xt, yt)
        acc = float(np.mean(est.predict(xv) == yv))
        tried.append((float(C), acc))
        bar.update(1)
        return acc

    with bar:
        accs = [val_acc(C) for C in C_GRID]
        peak = C_GRID[int(np.argmax(accs))]
        left, right = 0.1 * peak, 10.0 * peak
        best, best_acc = peak, max(accs)                      # steps=0: the coarse peak
        for _ in range(int(steps)):
            acc_l, acc_r = val_acc(left), val_acc(right)
            lo, hi = np.log10(left), np.log10(right)
            if acc_l < acc_r:
                best, best_acc, lo = right, acc_r, 0.5 * (hi + lo)
            else:
                best, best_acc, hi = left, acc_l, 0.5 * (hi + lo)
            left, right = np.power(10, lo), np.power(10, hi)       # through log10, as the reference
    return float(best), best_acc


@METHODS.register("linear", kind="adapter",
                  help="logistic regression on features, C chosen on validation (CLIP, CoOp lpclip)")
class LinearProbe(FeatureAdapter):
    """Logistic-regression probe with C chosen on validation.

    Parameters
    ----------
    C : float or None, default=None
        Inverse L2 strength.  ``None``: chosen on validation (eq. 2).
    max_iter : int, default=1000
    refit : bool, default=False
        With a validation split given to ``fit``: fit the final probe on train + validation
        once C is chosen (the benchmark protocol) instead of on the training data only.
    search_steps : int, default=8
        Binary-search rounds of :func:`search_C` (CoOp's 8).
    val_fraction : float, default=0.25
        Share of each class carved for validation when ``fit`` gets no validation split.
    random_state : int, default=0
        Seed of that split and of the solver.

    Attributes
    ----------
    classes_ : ndarray (C,)
    coef_ : ndarray (C, D)
        One row per class (two rows, ``-w/2`` and ``w/2``, for two classes).
    intercept_ : ndarray (C,)
    C_ : float
    search_path_ : list of (float, float)
        Every ``(C, validation accuracy)`` of the search, in the order fitted; empty when
        C was fixed or defaulted.
    n_iter_ : int
        L-BFGS iterations of the final fit.
    val_score_ : float or None
    selection_ : str

    References
    ----------
    Radford et al., ICML 2021, arXiv:2103.00020.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 8)); y = np.repeat(np.arange(4), 10)
    >>> X[np.arange(40), y] += 3
    >>> LinearProbe(C=1.0).fit(X, y).score(X, y) > 0.9
    True
    """

    def __init__(self, *, C=None, max_iter=1000, refit=False, search_steps=8, val_fraction=0.25, random_state=0,
                 progress=False):
        self.C = C
        self.max_iter = max_iter
        self.refit = refit
        self.search_steps = search_steps
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.progress = progress

    def _fit(self, X, y, X_val, y_val):
        self.text_weights_ = None
        self.val_score_ = None
        self.search_path_ = []
        given_val = X_val is not None
        if self.C is not None:
            self.C_, self.selection_ = float(self.C), "fixed"
        else:
            train = (X, y)
            if X_val is None:
                split = self._carve(y)
                if split is not None:
                    tr, va = split
                    train, X_val, y_val = (X[tr], y[tr]), X[va], y[va]
            if X_val is None:
                self.C_ = DEFAULT_C
            else:
                self.C_, self.val_score_ = search_C(train, (X_val, y_val), steps=self.search_steps,
                                                    random_state=self.random_state, max_iter=self.max_iter,
                                                    tried=self.search_path_, progress=self.progress)  # eq. (2)
        if self.refit and given_val:                         # the benchmark protocol: train + val
            X, y = np.concatenate([X, X_val]), np.concatenate([y, y_val])
        with quiet_fits(np.size(X)):
            lr = logistic_regression(self.C_, random_state=self.random_state, max_iter=self.max_iter).fit(X, y)
        self.n_iter_ = int(np.max(lr.n_iter_))
        coef, icpt = lr.coef_, lr.intercept_                                          # eq. (1)
        if coef.shape[0] == 1:                    # binary: softmax([-z/2, z/2]) = sigmoid(z)
            coef, icpt = np.concatenate([-coef, coef]) / 2, np.concatenate([-icpt, icpt]) / 2
        self.coef_, self.intercept_ = coef.astype(self._dtype), icpt.astype(self._dtype)

    def _logits(self, X):
        return X @ self.coef_.T + self.intercept_                                     # eq. (1)
