"""CapS-Adapter: a multimodal cache of image features and caption text features.

Paper: Qijie Wang, Guandu Liu, Bin Wang, "CapS-Adapter: Caption-based MultiModal Adapter
in Zero-Shot Classification", arXiv preprint arXiv:2405.16591 (v2, 2024; no venue
verified).  Reference code: github.com/WLuLi/CapS-Adapter, ``madapter.py`` (commit
29396b891c66abb1e65835871f25e92eadcb936a); its KL term comes
from SuS-X (Udandarao et al., "SuS-X: Training-Free Name-Only Transfer of Vision-Language
Models", ICCV 2023, arXiv:2211.16198).  Equation numbers below are this module's own.

Algorithm (support set = labelled images with captions; values L one-hot (N, C)):

    (1) A = (1 - delta) f K_img^T + delta f K_cap^T                 multimodal affinity (N_q, N)
    (2) cache = exp(-beta (1 - A)) L                                               (N_q, C)
    (3) p(x) = softmax_c(x T^T / tau), tau = 0.5  (signatures of queries and support images)
        KL_ij = sum_c p_i,c log(p_i,c / q_j,c);  KL rescaled to the range of A;  kl = -KL L
    (4) logits = logit_scale * f T^T + alpha * cache + gamma * kl

Grids (reference): alpha = 0.1 + i (50 - 0.1)/20 (20 values), beta = 1 + i (50 - 1)/n_beta,
gamma = 0.1 + i (30 - 0.1)/n_gamma, delta in {0, 0.1, ..., 1}.  Of equal validation scores
the first in the reference's loop order alpha -> beta -> delta -> gamma is kept (it keeps
the first strictly better candidate); when no candidate scores above 0, its initial values
alpha = beta = gamma = delta = 0 (zero-shot alone).
Defaults here: ``search_steps=(n_beta, n_alpha, n_gamma)=(50, 20, 10)`` — coarser than the
reference's (200, 20, 50) to keep the 4-D search affordable; pass (200, 20, 50) for the
reference grid.  Without validation: alpha=1, beta=1, gamma=0, delta=0.5 (not from the
paper; the reference always searches).

Captions.  The support set's caption features ``K_cap`` are text features (N, D) of one
caption per training image, in the same order as ``X``: pass them to ``fit`` as
``captions_X``, or give the constructor a ``caption_features`` callable that maps the
training image features (N, D) to them (for example: look up the captions of those images,
ShapesWorld's or a captioner's, and encode them with ``Backbone.encode_texts``).

Deviations
----------
- The paper builds the support set from Stable-Diffusion images generated from captions of
  sampled training images; cliplab caches the user's own labelled images and their
  captions (the reference's ``fewshot`` support type).  Generated images can be passed as
  ``X`` with the captions that produced them.
- Signatures follow the paper/SuS-X: ``softmax(x T^T / tau)`` over the classes.  The
  reference's ``compute_image_text_distributions`` computes ``x T^T`` and then overwrites
  it with ``softmax(x / tau)`` over the embedding dimensions — not copied.
- The reference rescales the KL matrix to the min/max of A over a whole batch of 8,192
  queries (so one query's logits depend on the others) and its KL loop leaves the last
  N mod 10 queries as zeros; here each query row of KL is rescaled to the range of its own
  row of A, and every row is computed.
- Checked against WLuLi/CapS-Adapter@bb2182a1 ``madapter.py`` ``hparam_search`` (the same
  function as at 29396b89), run unmodified on CPU on the same features (5 classes, 4 shots,
  16 dims, 4 validation images a class, the reference grid 200 x 20 x 50 x 11, KL
  matrix from :func:`kl_divergence`, its fp16 cast of the KL logits left out): MATCH, the
  same (alpha, beta, gamma, delta) = (30.04, 1.735, 0.1, 0.6) and identical test
  predictions, both with its batch-wide KL rescaling and with the per-query one above.
- Hyper-parameters are chosen on a validation split (given, or carved from the training
  data).  Without ``text_weights`` the zero-shot and KL terms are 0 and gamma is not searched.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..zeroshot.classifier import softmax
from . import METHODS, _base
from ._base import FeatureAdapter
from .tip import TipAdapter, linear_grid

__all__ = ["CapSAdapter", "multimodal_affinity", "kl_signatures", "kl_logits"]

DEFAULTS = {"alpha": 1.0, "beta": 1.0, "gamma": 0.0, "delta": 0.5}
TAU = 0.5


def multimodal_affinity(f, keys_img, keys_cap, delta: float):
    """``(1 - delta) f K_img^T + delta f K_cap^T``: (N_q, N), eq. (1)."""
    return (1.0 - delta) * (f @ keys_img.T) + delta * (f @ keys_cap.T)


def kl_signatures(X, text_weights, tau: float = TAU):
    """Class distributions ``softmax(X T^T / tau)``: (N, C), eq. (3)."""
    return softmax(X @ text_weights.T / tau)


def kl_divergence(p, q):
    """``KL(p_i || q_j)`` for all pairs: (N_p, N_q), eq. (3)."""
    p = np.clip(p, 1e-12, None)
    q = np.clip(q, 1e-12, None)
    return (p * np.log(p)).sum(1, keepdims=True) - p @ np.log(q).T


def kl_logits(kl, affinity, starts):
    """``-rescale(KL) L`` with each row of KL mapped onto the range of its row of A: (N_q, C)."""
    lo, hi = kl.min(1, keepdims=True), kl.max(1, keepdims=True)
    a_lo, a_hi = affinity.min(1, keepdims=True), affinity.max(1, keepdims=True)
    scaled = (kl - lo) / np.where(hi > lo, hi - lo, 1.0) * (a_hi - a_lo) + a_lo
    return -np.add.reduceat(scaled, starts, axis=1)                           # eq. (3)


def _noisy_copy(X):
    """Stand-in caption features for the estimator checks: ``X`` rotated slightly (N, D)."""
    X = np.asarray(X, dtype=np.float32)
    return np.roll(X, 1, axis=1) * 0.3 + X


@METHODS.register("caps", kind="adapter", help="image + caption cache with a KL term (arXiv:2405.16591)")
class CapSAdapter(FeatureAdapter):
    """Training-free multimodal (image + caption) cache with a KL-signature term.

    Parameters
    ----------
    alpha, beta, gamma, delta : float or None, default=None
        Eq. (4) weights, eq. (2) sharpness, eq. (1) mix.  ``None``: searched on validation.
    search_steps : tuple (n_beta, n_alpha, n_gamma), default=(50, 20, 10)
    caption_features : callable or None, default=None
        ``caption_features(X) -> (N, D)`` caption text features of the training images
        whose features are ``X``; used when ``fit`` gets no ``captions_X``.
    text_weights : ndarray (C, D) or None, default=None
    logit_scale : float, default=100.0
    val_fraction : float, default=0.25
    random_state : int, default=0

    Attributes
    ----------
    classes_ : ndarray (C,)
    keys_ : ndarray float32 (N, D)
        Image keys, sorted by class.
    caption_keys_ : ndarray float32 (N, D)
        Caption keys, same order.
    signatures_ : ndarray float32 (N, C) or None
        Support signatures (eq. 3); None without text weights.
    starts_ : ndarray int (C,)
    alpha_, beta_, gamma_, delta_ : float
    val_score_ : float or None
    selection_ : str

    References
    ----------
    Wang et al., "CapS-Adapter", arXiv:2405.16591.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype("float32")
    >>> X = unit(rng.normal(size=(40, 8))); y = np.repeat(np.arange(4), 10)
    >>> captions = unit(X + 0.1 * rng.normal(size=X.shape))
    >>> est = CapSAdapter(alpha=1.0, beta=5.0, delta=0.5).fit(X, y, captions_X=captions)
    >>> est.predict_proba(X[:2]).sum(axis=1).round(6).tolist()
    [1.0, 1.0]
    """

    _dtype = np.float32
    fit_inputs = ("captions_X",)
    test_preset = {"search_steps": (5, 4, 3), "caption_features": _noisy_copy}

    def __init__(self, *, alpha=None, beta=None, gamma=None, delta=None, search_steps=(50, 20, 10),
                 caption_features=None, text_weights=None, logit_scale=100.0, val_fraction=0.25,
                 random_state=0):
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.delta = delta
        self.search_steps = search_steps
        self.caption_features = caption_features
        self.text_weights = text_weights
        self.logit_scale = logit_scale
        self.val_fraction = val_fraction
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None, *, captions_X=None):
        """Fit on image features ``X`` (N, D), labels ``y`` and caption features ``captions_X`` (N, D)."""
        return super().fit(X, y, X_val, y_val, captions_X=captions_X)

    def _captions(self, X, captions_X):
        if captions_X is None:
            if self.caption_features is None:
                raise UsageError("CapSAdapter needs caption features: fit(X, y, captions_X=...) or "
                                 "CapSAdapter(caption_features=callable)")
            captions_X = self.caption_features(X)
        cap = np.asarray(captions_X, dtype=np.float32)
        if cap.shape != X.shape:
            raise UsageError(f"captions_X must be (N, D) = {X.shape}, one caption feature per image; "
                             f"got {cap.shape}")
        return cap

    def _cache(self, X, cap, y):
        keys, starts = TipAdapter._build_cache(X, y)
        order = np.argsort(y, kind="stable")
        cap_keys = np.ascontiguousarray(cap[order])
        sig = None if self.text_weights_ is None else kl_signatures(keys, self.text_weights_)
        return keys, cap_keys, sig, starts

    def _terms(self, Xq, cache, delta):
        """(affinity, kl logits or 0) of queries ``Xq`` for one delta."""
        keys, cap_keys, sig, starts = cache
        aff = multimodal_affinity(Xq, keys, cap_keys, delta)                  # (Nq, N), eq. (1)
        if sig is None:
            return aff, 0.0
        kl = kl_divergence(kl_signatures(Xq, self.text_weights_), sig)         # (Nq, N), eq. (3)
        return aff, kl_logits(kl, aff, starts)

    def _grid(self, name, values):
        v = getattr(self, name)
        return [v] if v is not None else values

    def _search(self, cache, X_val, y_val):
        """Best (alpha, beta, gamma, delta) on validation and its accuracy, the reference's rule.

        Every candidate is scored by :func:`cliplab.adapt._base.val_accuracy`, computed delta by delta (one
        affinity matrix each); the winner is then the first maximum in the reference's loop
        order alpha -> beta -> delta -> gamma (it keeps the first strictly better candidate),
        or the reference's initial values (all 0: zero-shot alone) when none scores above 0.
        """
        n_beta, n_alpha, n_gamma = self.search_steps
        starts = cache[3]
        zs = self._zero_shot(X_val)
        grids = {"alpha": self._grid("alpha", linear_grid(0.1, 50.0, n_alpha)),
                 "beta": self._grid("beta", linear_grid(1.0, 50.0, n_beta)),
                 "gamma": self._grid("gamma", linear_grid(0.1, 30.0, n_gamma) if cache[2] is not None else [0.0]),
                 "delta": self._grid("delta", [i / 10 for i in range(11)])}
        acc = np.empty([len(grids[k]) for k in ("delta", "beta", "alpha", "gamma")])
        for i, delta in enumerate(grids["delta"]):
            aff, kl = self._terms(X_val, cache, delta)
            for j, beta in enumerate(grids["beta"]):
                c = np.add.reduceat(np.exp(-beta * (1.0 - aff)), starts, axis=1)     # eq. (2)
                for k, alpha in enumerate(grids["alpha"]):
                    base = zs + alpha * c
                    for m, gamma in enumerate(grids["gamma"]):
                        acc[i, j, k, m] = _base.val_accuracy(base + gamma * kl, y_val)  # eq. (4)
        ref_order = acc.transpose(2, 1, 0, 3)                   # (alpha, beta, delta, gamma)
        flat = int(np.argmax(ref_order))                         # the first maximum in that order
        if ref_order.flat[flat] <= 0 and self.text_weights_ is not None:
            return {k: float(v) if v is not None else 0.0 for k in grids
                    for v in [getattr(self, k)]}, 0.0
        a, b, d, g = np.unravel_index(flat, ref_order.shape)
        best = {"alpha": grids["alpha"][a], "beta": grids["beta"][b], "gamma": grids["gamma"][g],
                "delta": grids["delta"][d]}
        return {k: float(v) for k, v in best.items()}, float(ref_order.flat[flat])

    def _fit(self, X, y, X_val, y_val, captions_X=None):
        cap = self._captions(X, captions_X)
        self.keys_, self.caption_keys_, self.signatures_, self.starts_ = self._cache(X, cap, y)
        self.val_score_ = None
        names = ("alpha", "beta", "gamma", "delta")
        fixed = {k: getattr(self, k) for k in names}
        if self.text_weights_ is None and fixed["gamma"] is None:
            fixed["gamma"] = 0.0
        if all(v is not None for v in fixed.values()):
            best, self.selection_ = fixed, "fixed"
        else:
            cache = (self.keys_, self.caption_keys_, self.signatures_, self.starts_)
            if X_val is None:
                split = self._carve(y)
                if split is not None:
                    tr, va = split
                    cache = self._cache(X[tr], cap[tr], y[tr])
                    X_val, y_val = X[va], y[va]
            if X_val is None:
                best = {k: (v if v is not None else DEFAULTS[k]) for k, v in fixed.items()}
            else:
                best, self.val_score_ = self._search(cache, X_val, y_val)
        self.alpha_, self.beta_, self.gamma_, self.delta_ = (float(best[k]) for k in names)

    def _logits(self, X):
        cache = (self.keys_, self.caption_keys_, self.signatures_, self.starts_)
        aff, kl = self._terms(X, cache, self.delta_)
        c = np.add.reduceat(np.exp(-self.beta_ * (1.0 - aff)), self.starts_, axis=1)  # eq. (2)
        return self._zero_shot(X) + self.alpha_ * c + self.gamma_ * kl               # eq. (4)
