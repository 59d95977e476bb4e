"""GDA: Gaussian discriminant analysis on CLIP features, ensembled with zero-shot.

Paper: Zhengbo Wang, Jian Liang, Lijun Sheng, Ran He, Zilei Wang, Tieniu Tan,
"A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation", ICLR 2024,
arXiv:2402.04087.  Reference code: github.com/mrflogs/ICLR24, ``main_few_shots.py``
(commit c83409b5e3c29d2f49dc44fb8b361add2b49fbba).

Algorithm (equation numbers refer to the lines below, written from the reference code;
the paper's own equation numbers were not checked against the PDF here):

    (1) mu_k = mean of the class-k features                                    (C, D)
    (2) X_c  = every feature minus its class mean;  Sigma = X_c^T X_c / (N - 1)
        P    = D * pinv((N - 1) Sigma + tr(Sigma) I_D)   "KS" ridge precision  (D, D)
    (3) w_k  = P mu_k,   b_k = log pi_k - 1/2 mu_k^T P mu_k,  pi_k = 1/C        (C, D), (C,)
    (4) logits = logit_scale * f T^T + alpha * (f W^T + b)                     (N, C)

Defaults: ``alpha`` chosen on validation from {1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100} (the
reference grid), the first strictly better one kept, as the reference's loop does;
0.1 (the reference's initial value) when every candidate scores 0 on validation (the
reference keeps a candidate only above accuracy 0) or no validation split can be had; uniform prior; ridge "ks".  Without ``text_weights`` the model is plain
LDA ``f W^T + b`` and ``alpha`` plays no part.  The paper calls the ridge estimator by
Kubokawa and Srivastava; the reference code only labels it "KS Estimator" — the name is
not checked here, the formula is the code's.

Deviations
----------
- ``alpha`` is chosen on a validation split (given, or carved from the training data);
  the reference searches ImageNet's alpha on the test set.
- The reference encodes 10 random-augmented views of every training image and keeps
  each view as a sample; an estimator on features cannot augment — pass the views as rows
  of ``X`` (with their labels) to reproduce it.
- ``ridge="none"`` (no shrinkage, ``P = D * pinv(X_c^T X_c)``) is an addition, for tests
  and comparison with scikit-learn's LDA.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..validation import check_choice
from . import METHODS
from ._base import FeatureAdapter, best_of

__all__ = ["GDA", "class_means", "shared_precision", "gda_head", "ALPHAS"]

#: The reference's alpha grid.
ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
DEFAULT_ALPHA = 0.1


def class_means(X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean feature of each class: (C, D).  ``y`` holds class indices 0..C-1."""
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < 1:
        raise UsageError("every class needs at least one training example")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.add.reduceat(X[order], starts, axis=0)                          # (C, D)
    return sums / counts[:, None]                                             # eq. (1)


def shared_precision(X: np.ndarray, y: np.ndarray, means: np.ndarray, ridge: str = "ks") -> np.ndarray:
    """Precision (D, D) of the pooled within-class covariance.

    ``ridge="ks"``: ``D * pinv((N-1) Sigma + tr(Sigma) I)`` (eq. 2, the reference's "KS"
    estimator); ``ridge="none"``: ``D * pinv((N-1) Sigma)``.
    """
    n, d = X.shape
    xc = X - means[y]                                                         # (N, D), eq. (2)
    scatter = xc.T @ xc                                                       # (D, D) = (N-1) Sigma
    if ridge == "ks":
        tr = np.trace(scatter) / max(n - 1, 1)                                # tr(Sigma)
        scatter = scatter + tr * np.eye(d)                                    # + tr(Sigma) I
        if tr > 0:   # positive definite: pinv = inverse, and inv is several times faster
            try:
                return d * np.linalg.inv(scatter)                             # eq. (2)
            except np.linalg.LinAlgError:  # numerically singular (tiny tr): fall back to pinv
                pass
    # 1 shot per class leaves Sigma = 0; pinv(0) = 0 then, as in the reference
    return d * np.linalg.pinv(scatter, hermitian=True)                       # eq. (2)


def gda_head(means: np.ndarray, precision: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LDA weights (C, D) and biases (C,): ``w_k = P mu_k``, ``b_k = log pi_k - mu_k^T P mu_k / 2``."""
    coef = means @ precision                                                  # (C, D), eq. (3)
    intercept = np.log(priors) - 0.5 * np.einsum("cd,cd->c", coef, means)    # (C,), eq. (3)
    return coef, intercept


@METHODS.register("gda", kind="adapter", help="Gaussian discriminant analysis + zero-shot head (ICLR 2024)")
class GDA(FeatureAdapter):
    """Gaussian discriminant analysis with a shared, shrunk covariance, plus zero-shot logits.

    Parameters
    ----------
    alpha : float or None, default=None
        Weight of the GDA logits in eq. (4).  ``None``: chosen on validation from ``alphas``.
    alphas : tuple of float, default=ALPHAS
        Candidates for ``alpha`` (the reference grid).
    ridge : {"ks", "none"}, default="ks"
        Precision estimator (eq. 2).
    text_weights : ndarray (C, D) or None, default=None
        Zero-shot class embeddings, rows in the order of ``classes_`` (sorted labels).
    logit_scale : float, default=100.0
        Zero-shot logit scale ``s``.
    val_fraction : float, default=0.25
        Share of each class carved for validation when ``fit`` gets no validation split.
    random_state : int, default=0
        Seed of that split.

    Attributes
    ----------
    classes_ : ndarray (C,)
    means_ : ndarray (C, D)
    precision_ : ndarray (D, D)
    coef_ : ndarray (C, D)
    intercept_ : ndarray (C,)
    alpha_ : float
        The alpha used (chosen, given, or the default).
    val_score_ : float or None
        Validation accuracy of the chosen alpha.
    selection_ : str
        ``"validation"``, ``"carved"`` or ``"default"``: where alpha came from.

    Notes
    -----
    See the module docstring for eqs. (1)-(4).  With ``ridge="none"`` and balanced
    classes the predictions are those of scikit-learn's
    ``LinearDiscriminantAnalysis(solver="lsqr")``, whose ``coef_`` is ours times N/D.

    References
    ----------
    Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation",
    ICLR 2024, arXiv:2402.04087.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 8)); y = np.repeat(np.arange(4), 10)
    >>> X[np.arange(40), y] += 3
    >>> GDA().fit(X, y).score(X, y) > 0.9
    True
    """

    def __init__(self, *, alpha=None, alphas=ALPHAS, ridge="ks", text_weights=None,
                 logit_scale=100.0, val_fraction=0.25, random_state=0):
        self.alpha = alpha
        self.alphas = alphas
        self.ridge = ridge
        self.text_weights = text_weights
        self.logit_scale = logit_scale
        self.val_fraction = val_fraction
        self.random_state = random_state

    def _head(self, X, y, n_classes):
        means = class_means(X, y, n_classes)                                  # eq. (1)
        precision = shared_precision(X, y, means, self.ridge)                 # eq. (2)
        coef, intercept = gda_head(means, precision, np.full(n_classes, 1.0 / n_classes))  # eq. (3)
        return means, precision, coef, intercept

    def _fit(self, X, y, X_val, y_val):
        check_choice("ridge", self.ridge, ("ks", "none"))
        c = len(self.classes_)
        self.val_score_ = None
        head = None                                               # the final head, fit on all of X
        if self.text_weights_ is None:                      # plain LDA: alpha only scales
            self.alpha_, self.selection_ = 1.0, "none"
        elif self.alpha is not None:
            self.alpha_, self.selection_ = float(self.alpha), "fixed"
        else:
            if X_val is None:
                split = self._carve(y)
                if split is not None:
                    tr, va = split
                    _, _, coef, icpt = self._head(X[tr], y[tr], c)
                    X_val, y_val = X[va], y[va]
            else:
                head = self._head(X, y, c)
                coef, icpt = head[2], head[3]
            if X_val is None:
                self.alpha_ = DEFAULT_ALPHA
            else:
                zs = self._zero_shot(X_val)                                   # (Nv, C)
                g = X_val @ coef.T + icpt                                     # (Nv, C)
                best, self.val_score_ = best_of((({"alpha": a}, zs + a * g) for a in self.alphas), y_val,
                                                fallback={"alpha": DEFAULT_ALPHA})
                self.alpha_ = float(best["alpha"])                            # eq. (4)
        self.means_, self.precision_, self.coef_, self.intercept_ = head or self._head(X, y, c)

    def _logits(self, X):
        return self._zero_shot(X) + self.alpha_ * (X @ self.coef_.T + self.intercept_)  # eq. (4)
