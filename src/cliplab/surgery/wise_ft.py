"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned model.

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, arXiv:2109.01903.
Reference code: ``mlfoundations/wise-ft``, ``src/wise_ft.py`` (``_merge``).

Algorithm
---------
Given the zero-shot weights θ_0 and the weights θ_1 fine-tuned from them (same
architecture), every floating-point tensor is mixed linearly::

    θ_α = (1 − α)·θ_0 + α·θ_1          (Eq. 1 of the paper; α ∈ [0, 1])

α = 0 is the zero-shot model, α = 1 the fine-tuned one; the paper sweeps
α ∈ {0, 0.1, ..., 1} and uses α = 0.5 when no held-out data chooses it.

Deviations
----------
- Non-float tensors (integer buffers such as position ids) are not mixed; they are
  copied from the zero-shot model (the reference code mixes every entry of the state
  dict, which for integer buffers of fine-tuned copies is the same tensor anyway).
- The mixing runs in float32 and is cast back to each tensor's dtype, so fp16/bf16
  Backbones do not lose precision in the weighted sum.
- α outside [0, 1] (extrapolation, "beyond the fine-tuned model") is refused unless
  ``extrapolate=True`` is given; the paper studies only [0, 1].
- The optional Fisher-weighted merge of the reference code is not implemented.

The result is a new :class:`~cliplab.models.backbone.Backbone`; neither input is
changed (DESIGN section 4: surgery returns a new model).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Callable, Iterable


from ..errors import CheckpointMismatch, UsageError
from ..models.backbone import Backbone
from ..validation import check_backbone

logger = logging.getLogger(__name__)

__all__ = ["interpolate", "interpolate_state_dicts", "sweep", "check_alpha", "check_compatible"]


def check_alpha(alpha, extrapolate: bool) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise UsageError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(a):
        raise UsageError(f"alpha must be finite, got {alpha!r}")
    if not extrapolate and not 0.0 <= a <= 1.0:
        raise UsageError(f"alpha must be in [0, 1] (0 = zero-shot, 1 = fine-tuned), got {a}; "
                         "pass extrapolate=True to go beyond the endpoints on purpose")
    return a


def check_compatible(sd0: dict, sd1: dict) -> None:
    """Raise :class:`CheckpointMismatch` naming the first key of two state dicts that differs.

    Keys, shapes and float-ness must agree (what :func:`interpolate_state_dicts` needs).
    """
    keys0, keys1 = list(sd0), set(sd1)
    for key in keys0:
        if key not in keys1:
            raise CheckpointMismatch(f"architectures differ: key {key!r} is in the zero-shot model "
                                     "but not in the fine-tuned one")
    for key in sd1:
        if key not in sd0:
            raise CheckpointMismatch(f"architectures differ: key {key!r} is in the fine-tuned model "
                                     "but not in the zero-shot one")
    for key in keys0:
        a, b = sd0[key], sd1[key]
        if tuple(a.shape) != tuple(b.shape):
            raise CheckpointMismatch(f"architectures differ at key {key!r}: shape {tuple(a.shape)} "
                                     f"(zero-shot) vs {tuple(b.shape)} (fine-tuned)")
        if a.is_floating_point() != b.is_floating_point():
            raise CheckpointMismatch(f"architectures differ at key {key!r}: dtype {a.dtype} "
                                     f"(zero-shot) vs {b.dtype} (fine-tuned)")


def interpolate_state_dicts(sd0: dict, sd1: dict, alpha: float, *, extrapolate: bool = False) -> dict:
    """θ_α = (1 − α)·θ_0 + α·θ_1 for every float tensor of two state dicts.

    Parameters
    ----------
    sd0, sd1 : dict of str to torch.Tensor
        Zero-shot and fine-tuned state dicts with the same keys and shapes.
    alpha : float
        Weight of the fine-tuned model, in [0, 1] unless ``extrapolate``.
    extrapolate : bool, default=False
        Allow alpha outside [0, 1].

    Returns
    -------
    dict of str to torch.Tensor
        New tensors, in ``sd0``'s order, dtypes and devices; non-float tensors are
        copies of ``sd0``'s.
    """
    a = check_alpha(alpha, extrapolate)
    check_compatible(sd0, sd1)
    out = {}
    for key, t0 in sd0.items():
        if not t0.is_floating_point():
            out[key] = t0.detach().clone()
            continue
        x0 = t0.detach().float()
        x1 = sd1[key].detach().to(t0.device).float()
        out[key] = ((1.0 - a) * x0 + a * x1).to(t0.dtype)              # Eq. 1
    return out


def interpolate(zero_shot: Backbone, finetuned: Backbone, alpha: float = 0.5, *,
                extrapolate: bool = False) -> Backbone:
    """WiSE-FT: a new Backbone whose weights are (1 − α)·zero_shot + α·finetuned.

    Parameters
    ----------
    zero_shot : Backbone
        The model before fine-tuning (θ_0).
    finetuned : Backbone
        The same architecture after fine-tuning (θ_1).
    alpha : float, default=0.5
        Mixing weight of the fine-tuned model: 0 gives the zero-shot weights, 1 the
        fine-tuned ones.  Must lie in [0, 1] unless ``extrapolate=True``.
    extrapolate : bool, default=False
        Allow alpha < 0 or alpha > 1.

    Returns
    -------
    Backbone
        A new Backbone with the zero-shot model's config, preprocessing, tokenizer,
        device and precision.  The inputs are not modified.

    Raises
    ------
    CheckpointMismatch
        The two models differ in state-dict keys, shapes or float-ness (the message
        names the first differing key).
    UsageError
        alpha is out of range or not a number.

    Notes
    -----
    Eq. 1 of Wortsman et al. applied to every floating-point tensor; see the module
    docstring for the deviations from the reference code.

    References
    ----------
    Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi,
    Namkoong, Schmidt. "Robust fine-tuning of zero-shot models", CVPR 2022,
    arXiv:2109.01903.

    Examples
    --------
    >>> import cliplab
    >>> from cliplab.surgery.wise_ft import interpolate
    >>> zs = cliplab.load("shapes-tiny")                       # doctest: +SKIP
    >>> ft = cliplab.load("runs/finetuned")                    # doctest: +SKIP
    >>> mid = interpolate(zs, ft, 0.5)                         # doctest: +SKIP
    """
    check_backbone("zero_shot", zero_shot)
    check_backbone("finetuned", finetuned)
    a = check_alpha(alpha, extrapolate)
    if type(zero_shot.model) is not type(finetuned.model):
        raise CheckpointMismatch(f"architectures differ: {type(zero_shot.model).__name__} (zero-shot) vs "
                                 f"{type(finetuned.model).__name__} (fine-tuned)")
    if zero_shot.model_cfg != finetuned.model_cfg:
        diff = sorted(k for k in set(zero_shot.model_cfg) | set(finetuned.model_cfg)
                      if zero_shot.model_cfg.get(k) != finetuned.model_cfg.get(k))
        logger.warning("model configs differ in %s; using the zero-shot model's config", ", ".join(diff))
    mixed = interpolate_state_dicts(zero_shot.model.state_dict(), finetuned.model.state_dict(), a,
                                    extrapolate=extrapolate)
    model = copy.deepcopy(zero_shot.model)
    model.load_state_dict(mixed, strict=True)
    return zero_shot.with_model(model, name=f"wise-ft({zero_shot.name}, {finetuned.name}, alpha={a:g})")


def sweep(zero_shot: Backbone, finetuned: Backbone, alphas: Iterable[float],
          evaluate_fn: Callable[[Backbone], dict], *, extrapolate: bool = False) -> list[dict]:
    """Evaluate the WiSE-FT model at each alpha.

    Parameters
    ----------
    zero_shot, finetuned : Backbone
    alphas : iterable of float
        Mixing weights, each in [0, 1] unless ``extrapolate``.
    evaluate_fn : callable
        ``evaluate_fn(backbone) -> dict`` of metrics (name -> number).
    extrapolate : bool, default=False

    Returns
    -------
    list of dict
        One ``{"alpha": a, **metrics}`` per alpha, in the given order.
    """
    alphas = [check_alpha(a, extrapolate) for a in alphas]     # fail before any work is done
    if not alphas:
        raise UsageError("sweep needs at least one alpha")
    rows = []
    for a in alphas:
        metrics = evaluate_fn(interpolate(zero_shot, finetuned, a, extrapolate=extrapolate))
        rows.append({"alpha": a, **dict(metrics)})
        logger.info("alpha %g: %s", a, metrics)
    return rows
