"""In-context learning vs weight shifting for softmax regression: a numerical check.

Li, Song, Xia, Yu and Zhou, "The Closeness of In-Context Learning and Weight Shifting for
Softmax Regression", NeurIPS 2024, arXiv:2304.13276.  No code by the authors was found.

Softmax regression, the problem of the paper's abstract::

    f(A, x) = <exp(Ax), 1_n>^{-1} exp(Ax) = softmax(Ax)          A (n, d), x (d,)
    L(A, x) = 1/2 ||f(A, x) - b||_2^2                            b (n,)

``f(A, x)`` is one attention row: the softmax scores of the query ``x`` over the keys, the rows
``a_i`` of the context ``A``.  The two ways of changing that row compared here are the two
"weight shifts" the paper's title refers to (move the weights ``x``; move the data ``A``),
each one step of gradient descent on ``L`` with the same step size ``eta``:

- **weight shifting (GD)**: the weights move, the context stays,
  ``x' = x - eta grad_x L = x - eta A^T u``; prediction ``p_gd = f(A, x')``;
- **in-context (attention)**: the weights stay, the context tokens move,
  ``A' = A - eta grad_A L = A - eta u x^T``; prediction ``p_icl = f(A', x)``;

with the one vector both gradients share, the back-propagated residual of the attention row
(``p = f(A, x)``)::

    u = (diag(p) - p p^T)(p - b)              (n,),  u_i = p_i ((p_i - b_i) - <p, p - b>)

The distance measured is ``||p_icl - p_gd||_2``.  Seen as a data transformation (the
abstract's term), each update solves the original problem with a shifted target
``b~ = b - (p_new - p)``, so the distance is also ``||b~_icl - b~_gd||_2``.

The bound is derived in this module, not quoted: the paper's theorem (its exact statement,
constants and assumptions) could not be retrieved from the sources available here; only
its abstract was.  The two logit shifts are ``A (x' - x) = -eta A A^T u`` and
``(A' - A) x = -eta ||x||^2 u``; softmax is 1/2-Lipschitz in l2 (its Jacobian
``diag(p) - p p^T`` has spectral norm <= max_i 2 p_i (1 - p_i) <= 1/2 by Gershgorin), hence::

    ||p_icl - p_gd|| <= eta/2 ||(A A^T - ||x||^2 I) u||                           (D1)
                     <= eta/4 R^2 ||p - b||,   R = max(||A||_2, ||x||_2)          (D2)
                     <= eta R^2 / (2 sqrt 2)   when b is a distribution           (D3)

(D2: the eigenvalues of ``A A^T - c I`` lie in ``[-c, ||A||^2 - c]`` and ``||u|| <= ||p - b|| / 2``;
D3: ``||p - b|| <= sqrt 2`` for two distributions.)  The same argument bounds each target shift
by its weight shift: ``||b~_gd - b|| <= ||A|| ||x' - x|| / 2`` ("part 1", move ``x``) and
``||b~_icl - b|| <= ||A' - A||_2 ||x|| / 2`` ("part 2", move ``A``).  ``eta = 0`` gives
distance 0; so does ``A A^T = ||x||^2 I`` for every ``eta`` (then both updates move the logits alike).

Deviations: the attention layer's in-context update is the gradient step on the keys written
above (the "move A" shift), constructed here, not a trained attention layer (the paper's
experiments train one) and not necessarily the paper's own construction, which could not be
retrieved; the bound is the one derived here (D1-D3), not the paper's.  Everything is float64.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch

from ..errors import UsageError
from ..validation import check_number, check_positive_int

__all__ = ["predict", "softmax_regression_loss", "softmax_regression_grad", "gd_step", "attention_context_shift",
           "compare_icl_gd", "sample_problems", "run_icl_experiment", "ICLWeightShiftResult"]

log = logging.getLogger("cliplab.experiments.icl")


def _as64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _check(A, b, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    A, b, x = _as64(A), _as64(b), _as64(x)
    if A.ndim < 2 or b.shape != A.shape[:-1] or x.shape != A.shape[:-2] + A.shape[-1:]:
        raise UsageError(f"expected A (..., n, d), b (..., n), x (..., d); got A {tuple(A.shape)}, "
                         f"b {tuple(b.shape)}, x {tuple(x.shape)}")
    if not (torch.isfinite(A).all() and torch.isfinite(b).all() and torch.isfinite(x).all()):
        raise UsageError("A, b and x must be finite")
    return A, b, x


def predict(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``f(A, x) = softmax(Ax)``: the attention row of query ``x`` over the rows of ``A``, (..., n)."""
    return torch.softmax((A @ x.unsqueeze(-1)).squeeze(-1), dim=-1)


def softmax_regression_loss(A, b, x) -> torch.Tensor:
    """``L = 1/2 ||softmax(Ax) - b||_2^2`` (the paper's objective, squared and halved).

    Parameters
    ----------
    A : array-like, shape (..., n, d)
        The context: n tokens of width d (leading dimensions are a batch).
    b : array-like, shape (..., n)
        The target.
    x : array-like, shape (..., d)
        The weights (the query).

    Returns
    -------
    torch.Tensor, shape (...)
        The loss, float64.

    Raises
    ------
    UsageError
        Shapes that do not fit, or non-finite values.
    """
    A, b, x = _check(A, b, x)
    return 0.5 * ((predict(A, x) - b) ** 2).sum(-1)


def _residual(A, b, x) -> tuple[torch.Tensor, torch.Tensor]:
    """``p = f(A, x)`` and ``u = (diag(p) - p p^T)(p - b)``, both (..., n)."""
    p = predict(A, x)                                                  # (..., n)
    g = p - b                                                          # (..., n)
    u = p * (g - (p * g).sum(-1, keepdim=True))                        # (diag p - p p^T) g
    return p, u


def softmax_regression_grad(A, b, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradients of :func:`softmax_regression_loss` with respect to ``x`` and ``A``.

    ``grad_x L = A^T u`` and ``grad_A L = u x^T`` with ``u = (diag(p) - p p^T)(p - b)``,
    ``p = softmax(Ax)`` (the chain rule through the softmax Jacobian ``diag(p) - p p^T``).

    Returns
    -------
    grad_x : torch.Tensor, shape (..., d)
    grad_A : torch.Tensor, shape (..., n, d)
    """
    A, b, x = _check(A, b, x)
    _, u = _residual(A, b, x)
    grad_x = (A.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)      # (..., d)
    grad_A = u.unsqueeze(-1) * x.unsqueeze(-2)                        # (..., n, d)
    return grad_x, grad_A


def gd_step(A, b, x, eta: float) -> torch.Tensor:
    """One gradient-descent step on the weights: ``x' = x - eta grad_x L`` (move ``x``), (..., d)."""
    eta = check_number("eta", eta, minimum=0.0, hint="step size")
    grad_x, _ = softmax_regression_grad(A, b, x)
    return _as64(x) - eta * grad_x


def attention_context_shift(A, b, x, eta: float) -> torch.Tensor:
    """The attention layer's in-context update of the context: ``A' = A - eta u x^T`` (move ``A``).

    Each key token moves along the query, ``a_i' = a_i - eta u_i x``, by the back-propagated
    residual ``u_i`` of its attention score ``p_i = softmax(Ax)_i``; the weights ``x`` stay.

    Returns
    -------
    torch.Tensor, shape (..., n, d)
    """
    eta = check_number("eta", eta, minimum=0.0, hint="step size")
    _, grad_A = softmax_regression_grad(A, b, x)
    return _as64(A) - eta * grad_A


def compare_icl_gd(A, b, x, eta: float) -> dict[str, torch.Tensor]:
    """Both updates on one (or a batch of) problem(s), their distance and the bounds (D1, D2).

    Parameters
    ----------
    A : array-like, shape (..., n, d)
    b : array-like, shape (..., n)
    x : array-like, shape (..., d)
        The weights before the step.
    eta : float
        Step size, >= 0.

    Returns
    -------
    dict of str to torch.Tensor
        ``p`` (..., n) before the step; ``p_gd``, ``p_icl`` (..., n) after; ``distance``
        ``||p_icl - p_gd||``; ``bound_data`` (D1); ``bound_r`` (D2) with ``R`` (...);
        ``shift_x`` ``||x' - x||``, ``shift_a`` ``||A' - A||_2``; ``target_shift_gd``,
        ``target_shift_icl`` ``||b~ - b||`` with their bounds ``part1_bound``, ``part2_bound``.
    """
    eta = check_number("eta", eta, minimum=0.0, hint="step size")
    A, b, x = _check(A, b, x)
    p, u = _residual(A, b, x)
    x_new = x - eta * (A.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)    # gd_step
    A_new = A - eta * u.unsqueeze(-1) * x.unsqueeze(-2)                      # attention_context_shift
    p_gd, p_icl = predict(A, x_new), predict(A_new, x)
    norm_a = torch.linalg.matrix_norm(A, ord=2)                       # (...)
    norm_x = torch.linalg.vector_norm(x, dim=-1)                      # (...)
    r = torch.maximum(norm_a, norm_x)
    gram_u = (A @ (A.transpose(-1, -2) @ u.unsqueeze(-1))).squeeze(-1) - norm_x.unsqueeze(-1) ** 2 * u
    shift_x = torch.linalg.vector_norm(x_new - x, dim=-1)
    shift_a = torch.linalg.matrix_norm(A_new - A, ord=2)
    return {
        "p": p, "p_gd": p_gd, "p_icl": p_icl,
        "distance": torch.linalg.vector_norm(p_icl - p_gd, dim=-1),
        "bound_data": 0.5 * eta * torch.linalg.vector_norm(gram_u, dim=-1),                   # (D1)
        "bound_r": 0.25 * eta * r ** 2 * torch.linalg.vector_norm(p - b, dim=-1),            # (D2)
        "R": r, "shift_x": shift_x, "shift_a": shift_a,
        "target_shift_gd": torch.linalg.vector_norm(p_gd - p, dim=-1),
        "target_shift_icl": torch.linalg.vector_norm(p_icl - p, dim=-1),
        "part1_bound": 0.5 * norm_a * shift_x,
        "part2_bound": 0.5 * shift_a * norm_x,
    }


@dataclasses.dataclass
class ICLWeightShiftResult:
    """What :func:`run_icl_experiment` measured: one row per (context length, step size).

    Attributes
    ----------
    config : dict
        ``d``, ``trials``, ``seed``, ``context_lengths``, ``step_sizes``, ``data``.
    rows : list of dict
        ``n``, ``eta``; over the trials: ``distance_mean``, ``distance_max``,
        ``bound_data_mean`` (D1), ``bound_r_mean`` (D2), ``R_mean``; ``ratio_max`` = max of
        ``distance / bound_data`` (0 where both are 0), ``ratio_r_max`` the same against D2,
        ``shift_ratio_max`` = max over part 1 and part 2 of ``||b~ - b|| / bound``;
        ``within_bound``: every trial's distance <= D1 (up to 1e-12 relative).
    """

    config: dict
    rows: list[dict]

    @property
    def within_bound(self) -> bool:
        """Every trial of every row stayed within the derived bound (D1, hence D2)."""
        return all(row["within_bound"] for row in self.rows)

    def to_dict(self) -> dict:
        """JSON-ready: ``{"config": ..., "rows": [...], "within_bound": bool}``."""
        return {"config": dict(self.config), "rows": [dict(r) for r in self.rows],
                "within_bound": self.within_bound}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, math.inf, 0.0))


def sample_problems(n: int, d: int, trials: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``trials`` seeded softmax-regression problems with ``n`` context tokens of width ``d``.

    ``A`` and ``x`` have i.i.d. N(0, 1/d) entries (rows and weights of norm about 1); the target
    is a teacher's prediction ``b = softmax(A x*)``, ``x*`` with N(0, 4/d) entries.

    Returns
    -------
    A (trials, n, d), b (trials, n), x (trials, d), float64.
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(n) * 1_009 + int(d))
    A = torch.randn(trials, n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x = torch.randn(trials, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    x_star = 2.0 * torch.randn(trials, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return A, predict(A, x_star), x


def run_icl_experiment(context_lengths: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256),
                       step_sizes: Sequence[float] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
                       *, d: int = 8, trials: int = 64, seed: int = 0) -> ICLWeightShiftResult:
    """Sweep context length and step size; measure ``||p_icl - p_gd||`` next to its bound.

    For every context length ``n`` the same ``trials`` problems (:func:`sample_problems`) are
    used at every step size, so a row differs from the next only in ``eta``.

    Parameters
    ----------
    context_lengths : sequence of int, default=(2, 4, ..., 256)
        Numbers of context tokens n (>= 1).
    step_sizes : sequence of float, default=(0, 0.01, ..., 10)
        Step sizes eta (>= 0), shared by both updates.
    d : int, default=8
        Token width.
    trials : int, default=64
        Problems per context length.
    seed : int, default=0

    Returns
    -------
    ICLWeightShiftResult

    Examples
    --------
    >>> res = run_icl_experiment((2, 16), (0.0, 0.5), d=4, trials=8)
    >>> res.within_bound, res.rows[0]["distance_max"]
    (True, 0.0)
    """
    d = check_positive_int("d", d)
    trials = check_positive_int("trials", trials)
    ns = [check_positive_int("context length", n) for n in context_lengths]
    etas = [check_number("step size", e, minimum=0.0) for e in step_sizes]
    if not ns or not etas:
        raise UsageError("give at least one context length and one step size")
    rows = []
    for n in ns:
        A, b, x = sample_problems(n, d, trials, seed)
        for eta in etas:
            out = compare_icl_gd(A, b, x, eta)
            dist, bd, br = out["distance"], out["bound_data"], out["bound_r"]
            shift = torch.maximum(_ratio(out["target_shift_gd"], out["part1_bound"]),
                                  _ratio(out["target_shift_icl"], out["part2_bound"]))
            ok = bool((dist <= bd * (1 + 1e-12) + 1e-15).all())
            rows.append({
                "n": n, "eta": eta,
                "distance_mean": float(dist.mean()), "distance_max": float(dist.max()),
                "bound_data_mean": float(bd.mean()), "bound_r_mean": float(br.mean()),
                "R_mean": float(out["R"].mean()),
                "ratio_max": float(_ratio(dist, bd).max()), "ratio_r_max": float(_ratio(dist, br).max()),
                "shift_ratio_max": float(shift.max()), "within_bound": ok,
            })
            log.debug("n=%d eta=%g distance max %.3g bound (D1) mean %.3g", n, eta, rows[-1]["distance_max"],
                      rows[-1]["bound_data_mean"])
    config = {"d": d, "trials": trials, "seed": int(seed), "context_lengths": ns, "step_sizes": etas,
              "data": "A, x ~ N(0, 1/d); b = softmax(A x*), x* ~ N(0, 4/d)"}
    return ICLWeightShiftResult(config=config, rows=rows)
