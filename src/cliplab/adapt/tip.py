"""Tip-Adapter and Tip-Adapter-F: a key-value cache of the few-shot features.

Paper: Renrui Zhang, Wei Zhang, Rongyao Fang, Peng Gao, Kunchang Li, Jifeng Dai, Yu Qiao,
Hongsheng Li, "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification",
ECCV 2022, arXiv:2207.09519 (an earlier version is arXiv:2111.03930).  Reference code:
github.com/gaopengcuhk/Tip-Adapter, ``main.py``, ``utils.py`` (``build_cache_model``,
``search_hp``).  Equation numbers below are this module's own.

Algorithm:

    (1) keys F = the N training features (N, D); values L = their one-hot labels (N, C)
    (2) A = f F^T  (cosine affinities, N_q x N);  phi(A) = exp(-beta (1 - A))
    (3) logits = logit_scale * f T^T + alpha * phi(A) L
    (4) Tip-Adapter-F: F is trained (CE on the logits of eq. 3 with the initial alpha,
        beta; AdamW lr 1e-3, eps 1e-4, cosine schedule, batch 256), L and T frozen.

Hyper-parameters: ``beta`` and ``alpha`` are searched on validation over the reference
grids ``beta_i = 0.1 + i (S_beta - 0.1) / n_beta`` (i < n_beta) and
``alpha_j = 0.1 + j (S_alpha - 0.1) / n_alpha`` with ``search_scale=(S_beta, S_alpha)``
(default (7, 3), the reference's ImageNet/Pets scale) and ``search_steps=(n_beta,
n_alpha)`` (default (200, 20), the reference's); in the reference's loop order (beta
outer, alpha inner) the first strictly better candidate is kept, and when none scores
above 0 on validation, ``alpha=0, beta=0`` (the reference's initial values: zero-shot
alone).  Without validation: ``beta=1``, ``alpha=1.17`` (the reference's ImageNet initial
values).  Tip-Adapter-F trains for at most ``epochs=20`` epochs and keeps the trained
epoch with the best validation accuracy (the first of equals) — never the untrained cache,
as the reference picks among trained epochs only — then searches beta, alpha again.

Deviations
----------
- beta, alpha and the Tip-Adapter-F epoch are chosen on a validation split (given, or
  carved from the training data); the reference's ImageNet script searches on test and
  Tip-Adapter-F keeps its best-test epoch.
- The reference averages the features of 10 random-augmented views of each training
  image into one key; an estimator on features cannot augment: pass averaged features.
- Tip-Adapter-F is trained on the cache's own features (the reference trains on fresh
  augmented views each epoch), so every training query finds itself in the cache with
  affinity 1; this is a small, full-batch-sized training (mini-batches of 256, usually
  one or a few steps per epoch) in torch on the CPU, run by the few-shot learners' loop
  (:func:`cliplab.adapt._trainable.supervised_loop`), not image-text training.
- Without ``text_weights`` the zero-shot term is 0 and only beta is searched (alpha
  only scales the logits).
"""

from __future__ import annotations

import numpy as np

from . import METHODS
from ._base import FeatureAdapter, best_of

__all__ = ["TipAdapter", "TipAdapterF", "cache_logits", "linear_grid", "affinity_powers"]

DEFAULT_ALPHA = 1.17
DEFAULT_BETA = 1.0


def linear_grid(start: float, stop: float, steps: int) -> list[float]:
    """The reference's grid ``start + i (stop - start) / steps``, i = 0..steps-1."""
    return [start + i * (stop - start) / steps for i in range(int(steps))]


def cache_logits(affinity: np.ndarray, beta: float, starts: np.ndarray) -> np.ndarray:
    """``exp(-beta (1 - A)) L`` (N_q, C) for keys sorted by class, class c from ``starts[c]``."""
    phi = np.exp(-beta * (1.0 - affinity))                                    # (N_q, N), eq. (2)
    return np.add.reduceat(phi, starts, axis=1)                               # (N_q, C) = phi L, eq. (3)


def affinity_powers(affinity: np.ndarray, betas):
    """``exp(-beta (1 - A))`` for each beta of a sorted grid, one (N_q, N) array at a time.

    On an evenly spaced grid each array is the previous one times ``exp(-h (1 - A))``
    (h the grid step): one multiplication instead of one ``exp`` per beta, which makes the
    reference's 200-value search about 4x faster at ImageNet scale.  The products agree with
    the direct formula to float32 rounding (relative error about 1e-5 after 200 steps).
    The yielded array is reused: copy it to keep it.
    """
    betas = np.asarray(betas, dtype=np.float64)
    steps = np.diff(betas)
    even = len(betas) > 2 and np.allclose(steps, steps[0], rtol=1e-9) and steps[0] > 0
    if not even:
        for b in betas:
            yield np.exp(-b * (1.0 - affinity))                               # eq. (2)
        return
    gap = affinity - 1.0                                                      # (N_q, N), <= 0
    step = np.exp(steps[0] * gap)
    phi = np.exp(betas[0] * gap)
    for i in range(len(betas)):
        if i:
            phi *= step                                                       # eq. (2), next beta
        yield phi


@METHODS.register("tip", kind="adapter", help="training-free cache of the few-shot features + zero-shot (ECCV 2022)")
class TipAdapter(FeatureAdapter):
    """Training-free cache model of the few-shot features, added to zero-shot logits.

    Parameters
    ----------
    alpha, beta : float or None, default=None
        Cache weight and sharpness (eqs. 2-3).  ``None``: searched on validation.
    search_scale : tuple (S_beta, S_alpha), default=(7.0, 3.0)
    search_steps : tuple (n_beta, n_alpha), default=(200, 20)
    text_weights : ndarray (C, D) or None, default=None
        Zero-shot class embeddings, rows in the order of ``classes_``.
    logit_scale : float, default=100.0
    val_fraction : float, default=0.25
    random_state : int, default=0

    Attributes
    ----------
    classes_ : ndarray (C,)
    keys_ : ndarray float32 (N, D)
        Cache keys, sorted by class.
    starts_ : ndarray int (C,)
        First key of each class.
    alpha_, beta_ : float
    val_score_ : float or None
    selection_ : str

    References
    ----------
    Zhang et al., "Tip-Adapter", ECCV 2022, arXiv:2207.09519.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 8)).astype("float32"); y = np.repeat(np.arange(4), 10)
    >>> X /= np.linalg.norm(X, axis=1, keepdims=True)
    >>> TipAdapter(alpha=1.0, beta=5.0).fit(X, y).predict(X[:3]).tolist()
    [0, 0, 0]
    """

    _dtype = np.float32
    test_preset = {"search_steps": (20, 5)}

    def __init__(self, *, alpha=None, beta=None, search_scale=(7.0, 3.0), search_steps=(200, 20),
                 text_weights=None, logit_scale=100.0, val_fraction=0.25, random_state=0):
        self.alpha = alpha
        self.beta = beta
        self.search_scale = search_scale
        self.search_steps = search_steps
        self.text_weights = text_weights
        self.logit_scale = logit_scale
        self.val_fraction = val_fraction
        self.random_state = random_state

    # ---------------------------------------------------------------- the cache
    @staticmethod
    def _build_cache(X, y):
        order = np.argsort(y, kind="stable")
        keys = np.ascontiguousarray(X[order], dtype=np.float32)                # (N, D), eq. (1)
        starts = np.searchsorted(y[order], np.arange(y.max() + 1))            # (C,)
        return keys, starts

    def _grids(self):
        betas = [self.beta] if self.beta is not None else linear_grid(0.1, self.search_scale[0],
                                                                      self.search_steps[0])
        if self.alpha is not None:
            alphas = [self.alpha]
        elif self.text_weights_ is None:
            alphas = [1.0]
        else:
            alphas = linear_grid(0.1, self.search_scale[1], self.search_steps[1])
        return betas, alphas

    def _search(self, keys, starts, X_val, y_val):
        """Best (alpha, beta) on validation and its accuracy, the reference's search."""
        betas, alphas = self._grids()
        zs = self._zero_shot(X_val)                                            # (Nv, C)
        aff = X_val @ keys.T                                                   # (Nv, N)

        def candidates():                                  # best_of scores each before the next
            buf = None
            for b, phi in zip(betas, affinity_powers(aff, betas)):
                cache = np.add.reduceat(phi, starts, axis=1)                   # (Nv, C), eq. (3)
                buf = np.empty_like(cache) if buf is None else buf
                for a in alphas:
                    np.multiply(cache, a, out=buf)
                    buf += zs                                                  # eq. (3)
                    yield {"alpha": a, "beta": b}, buf
        fallback = None                 # the reference's initial values; it has no cache-only mode
        if self.text_weights_ is not None:
            fallback = {"alpha": self.alpha if self.alpha is not None else 0.0,
                        "beta": self.beta if self.beta is not None else 0.0}
        best, acc = best_of(candidates(), y_val, fallback=fallback)
        return float(best["alpha"]), float(best["beta"]), acc

    def _defaults(self):
        alpha = self.alpha
        if alpha is None:
            alpha = DEFAULT_ALPHA if self.text_weights_ is not None else 1.0
        beta = self.beta if self.beta is not None else DEFAULT_BETA
        return float(alpha), float(beta)

    def _fit(self, X, y, X_val, y_val):
        self.keys_, self.starts_ = self._build_cache(X, y)
        self.val_score_ = None
        if self.alpha is not None and self.beta is not None:
            self.alpha_, self.beta_ = float(self.alpha), float(self.beta)
            self.selection_ = "fixed"
            return
        keys, starts = self.keys_, self.starts_
        if X_val is None:
            split = self._carve(y)
            if split is not None:
                tr, va = split
                keys, starts = self._build_cache(X[tr], y[tr])
                X_val, y_val = X[va], y[va]
        if X_val is None:
            self.alpha_, self.beta_ = self._defaults()
        else:
            self.alpha_, self.beta_, self.val_score_ = self._search(keys, starts, X_val, y_val)

    def _logits(self, X):
        return self._zero_shot(X) + self.alpha_ * cache_logits(X @ self.keys_.T, self.beta_, self.starts_)


@METHODS.register("tip-f", kind="adapter", help="Tip-Adapter with fine-tuned cache keys")
class TipAdapterF(TipAdapter):
    """Tip-Adapter with fine-tuned cache keys (eq. 4); epochs chosen on validation.

    Parameters
    ----------
    alpha, beta, search_scale, search_steps, text_weights, logit_scale, val_fraction, random_state
        As :class:`TipAdapter`.
    epochs : int, default=20
        Most epochs to train; the trained epoch best on validation is kept (epochs 1 ..
        ``epochs``, first of equals; the untrained cache only when ``epochs=0``).
    lr : float, default=1e-3
    batch_size : int, default=256

    Attributes
    ----------
    keys_ : ndarray float32 (N, D)
        The trained keys, sorted by class.
    epoch_ : int
        The epoch kept.
    alpha_, beta_, starts_, classes_, val_score_, selection_
        As :class:`TipAdapter`.
    """

    test_preset = {"search_steps": (20, 5), "epochs": 3}

    def __init__(self, *, alpha=None, beta=None, search_scale=(7.0, 3.0), search_steps=(200, 20),
                 text_weights=None, logit_scale=100.0, val_fraction=0.25, random_state=0,
                 epochs=20, lr=1e-3, batch_size=256):
        super().__init__(alpha=alpha, beta=beta, search_scale=search_scale, search_steps=search_steps,
                         text_weights=text_weights, logit_scale=logit_scale, val_fraction=val_fraction,
                         random_state=random_state)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def _train_keys(self, X, y, keys, starts, alpha, beta, epochs, X_val=None, y_val=None):
        """Train the keys for ``epochs`` epochs; with validation, return the best trained epoch's keys.

        Returns ``(keys, epoch)``.  The cosine schedule always spans ``self.epochs`` epochs,
        so a run stopped at epoch e follows the same path as the first e epochs of a full run.
        """
        import torch

        from ._trainable import supervised_loop

        xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))          # (N, D)
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))                      # (N,)
        n_classes = len(starts)
        counts = np.diff(np.append(starts, len(keys)))
        values = torch.repeat_interleave(torch.eye(n_classes), torch.from_numpy(counts), dim=0)  # (N_k, C)
        tw = None if self.text_weights_ is None else torch.from_numpy(self.text_weights_.astype(np.float32))
        w = torch.nn.Parameter(torch.from_numpy(keys.copy()))                     # (N_k, D) trained, eq. (4)
        opt = torch.optim.AdamW([w], lr=self.lr, eps=1e-4)
        steps = max(1, -(-len(xt) // int(self.batch_size)))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, int(self.epochs) * steps)

        def batch_loss(idx):
            f = xt[idx]                                                           # (B, D)
            z = alpha * torch.exp(-beta * (1.0 - f @ w.T)) @ values                # (B, C), eqs. (2)-(3)
            z = z if tw is None else z + self.logit_scale * f @ tw.T
            return {"ce": torch.nn.functional.cross_entropy(z, yt[idx])}

        best = {"keys": keys.copy(), "epoch": 0, "acc": -1.0}    # epoch 0 is never kept if one trains

        def keep_best(epoch):
            trained = w.detach().numpy().copy()
            acc = (0.0 if X_val is None
                   else self._score_keys(trained, starts, alpha, beta, X_val, y_val))
            if X_val is None or acc > best["acc"]:
                best.update(keys=trained, epoch=epoch, acc=acc)

        supervised_loop([w], batch_loss, len(xt), epochs=int(epochs), batch_size=int(self.batch_size),
                        optimizer=opt, scheduler=sched, generator=torch.Generator().manual_seed(int(self.random_state)),
                        on_epoch_end=keep_best)
        return best["keys"], best["epoch"]

    def _score_keys(self, keys, starts, alpha, beta, X_val, y_val):
        z = self._zero_shot(X_val) + alpha * cache_logits(X_val @ keys.T, beta, starts)
        _, acc = best_of([({}, z)], y_val)
        return acc

    def _fit(self, X, y, X_val, y_val):
        keys, starts = self._build_cache(X, y)
        self.starts_ = starts
        self.val_score_ = None
        alpha0, beta0 = self._defaults()
        fit_X, fit_y = X, y
        if X_val is None:
            split = self._carve(y)
            if split is not None:
                tr, va = split
                fit_X, fit_y, X_val, y_val = X[tr], y[tr], X[va], y[va]
        if X_val is None:                                         # 1-shot, no validation: defaults
            self.keys_, self.epoch_ = self._train_keys(X, y, keys, starts, alpha0, beta0, self.epochs)
            self.alpha_, self.beta_ = alpha0, beta0
            return
        sel_keys, sel_starts = self._build_cache(fit_X, fit_y)
        sel_keys, self.epoch_ = self._train_keys(fit_X, fit_y, sel_keys, sel_starts, alpha0, beta0,
                                                 self.epochs, X_val, y_val)
        if self.alpha is not None and self.beta is not None:
            self.alpha_, self.beta_ = float(self.alpha), float(self.beta)
            self.val_score_ = self._score_keys(sel_keys, sel_starts, self.alpha_, self.beta_, X_val, y_val)
        else:
            self.alpha_, self.beta_, self.val_score_ = self._search(sel_keys, sel_starts, X_val, y_val)
        if fit_X is X:                                            # validation was given: keys done
            self.keys_ = sel_keys
        else:                                                     # carved: retrain on all, same epochs
            self.keys_, _ = self._train_keys(X, y, keys, starts, alpha0, beta0, self.epoch_)
