"""Adaptive worst-case sharpness and layer-wise mode connectivity of a zero-shot CLIP.

Reconstructs the measurements of Abdollahpoorrostam, "In Search of the Successful
Interpolation: On the Role of Sharpness in CLIP Generalization", NeurIPS 2024 workshop,
arXiv:2410.16476.  That paper has **no public code** (its repository holds only a
README), so this spec is **reconstructed** from the building blocks it cites:

- adaptive worst-case ℓ∞ m-sharpness of Andriushchenko et al., "A Modern Look at the
  Relationship between Sharpness and Generalization", ICML 2023, arXiv:2302.07011;
  reference code ``tml-epfl/sharpness-vs-generalization``, ``sharpness.py``
  (``eval_APGD_sharpness``, ``weight_ascent_step_momentum``) and ``models.py``
  (``LogitNormalizationWrapper``);
- Auto-PGD of Croce & Hein, "Reliable evaluation of adversarial robustness with an
  ensemble of diverse parameter-free attacks", ICML 2020, arXiv:2003.01690 (Alg. 1);
- layer-wise linear mode connectivity of Adilova et al., "Layer-wise Linear Mode
  Connectivity", ICLR 2024, arXiv:2307.06966; reference code ``link-er/layer-wise-lmc``,
  ``LLMC/eval_interpolation_multiple_layers.py``.

Equations
---------
The numbers below are this module's (the notes give none from the papers); each is
cited on the line that implements it.  Batch B of m images, C classes, w the weights::

    (1) z_B(w)   = s · f(x; w) g(T; w)ᵀ                 zero-shot logits (B, C); f, g
                                                       L2-normalised image / prompt
                                                       features, s = exp(logit_scale)
    (2) z̃       = (z − mean_c z) / max(‖z − mean_c z‖₂, 1e-10)   logit normalisation
                                                       (row-wise; optional, default on)
    (3) L_B(w)   = CE(z̃_B(w), y_B)                     mean over the batch
    (4) S_ρ(w)   = mean_B [ max_{|δ_i| ≤ ρ|w_i|} L_B(w + δ) − L_B(w) ]
                                                       δ only on the selected tensors
    (5) z_{k+1}  = Π(δ_k + η_k · ρ|w| ⊙ sign ∇_δ L_B(w + δ_k))       Π: clip to the box
    (6) δ_{k+1}  = Π(δ_k + a (z_{k+1} − δ_k) + (1 − a)(δ_k − δ_{k−1})),  a = 0.75
                                                       (δ_1 = z_1: no momentum at k = 0)
    (7) barrier  = max_α [ L(α) − ((1 − α) L(0) + α L(1)) ]

Inner maximisation (what is implemented, exactly)
-------------------------------------------------
Auto-PGD in the ℓ∞ box scaled by |w| ("adaptive"): δ_0 = 0 (``init="zero"``, the
reference default; ``init="random"`` draws δ_0 uniform in the box with ``seed``);
η_0 = 2 (so a first step from 0 lands on the box corner ρ|w|·sign ∇); steps (5)-(6);
checkpoints at iterations ⌈p_j n⌉ with p_0 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} −
0.03, 0.06) (reference schedule); at a checkpoint the step η halves and the iterate
restarts from the best δ found when fewer than 75 % of the iterations since the last
checkpoint found a new best, or when neither η nor the best loss changed since it.  The
best (largest) loss over δ_0 = 0 and all iterates is kept, so S ≥ 0 always.  Per batch:
n_iters + 1 forward and n_iters backward passes, one more of each per restart, and one
more forward (at δ = 0) for random init.

Deviations from the reference code
----------------------------------
- Momentum follows Croce & Hein's Alg. 1, eq. (6), with no momentum at the first step;
  ``weight_ascent_step_momentum`` instead averages 0.75·z_{k+1} + 0.25·δ_{k−1}, at every
  step.  Both stay in the box; this choice makes one step (n_iters = 1) exactly the
  sign-gradient corner, so S ≈ ρ Σ_i |w_i||∂L/∂w_i| to first order.
- A restart resets the iterate (and δ_{k−1}) to the best δ; the reference reloads the
  best weights but keeps stepping from its last δ.
- Each loss value comes from the forward pass that also gives the next gradient (the
  reference runs a second, no-grad forward), so a run costs about a quarter less.
- Batches are consecutive slices of the given images (no shuffling); S is the unweighted
  mean over batches (a smaller last batch counts as much as the others, as in the
  reference with ``drop_last=False``).  The reference draws 1024 training samples in
  batches of m = 128: pass that many images to match.
- The computation runs on a float32 deep copy of ``backbone.model`` whatever the
  Backbone's precision (|δ| ≤ 1e-3|w| is about one fp16 rounding step); the Backbone is never
  changed.  A tower none of whose tensors are perturbed is encoded once per batch.
- ``logit_bias`` (SigLIP) is left out of (1): a constant shift cancels in (2) and (3).

Layer groups
------------
:func:`layer_groups` splits parameter names into one group per residual block of each
tower (``visual.transformer.resblocks.3``, ``transformer.resblocks.0``; also timm/HF
``blocks.i`` / ``layers.i`` / ``layer.i``) and one per leaf module outside the blocks
(``visual.conv1``, ``visual.ln_pre``, ``token_embedding``, ``ln_final``...); a tensor owned
directly by a container module is its own group (``visual.class_embedding``,
``visual.positional_embedding``, ``visual.proj``, ``positional_embedding``,
``text_projection``, ``logit_scale``).  Groups appear in ``named_parameters`` order and
partition the parameters.  LoRA/SVD ``parametrizations.<name>.original`` tensors are
grouped as ``<name>``.

Straggler layers
----------------
:func:`straggler_layers` interpolates one group at a time, θ_g(α) = (1 − α)θ_0,g + αθ_1,g
(WiSE-FT Eq. 1 via :func:`~cliplab.surgery.wise_ft.interpolate_state_dicts`), with every
other tensor at the ``anchor`` endpoint (default the zero-shot model, as in
``eval_interpolation_multiple_layers.py``), records loss (3) (without (2) by default) and
accuracy over α, and ranks groups by the barrier (7).  It also reports the full-model
(WiSE-FT) curve, first, as the reference script does.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._progress import progress_bar
from ..errors import UsageError
from ..models.backbone import Backbone
from ..models.transforms import images_to_tensor, is_model_sized, make_preprocess
from ..surgery.wise_ft import check_compatible, interpolate_state_dicts
from ..validation import check_backbone, check_choice, check_labels, check_number, check_positive_int

logger = logging.getLogger(__name__)

__all__ = ["sharpness", "layer_sharpness", "layer_groups", "straggler_layers",
           "zero_shot_loss"]

_MOMENTUM = 0.75            # a of eq. (6), Croce & Hein's default
_MIN_UPDATE_RATIO = 0.75    # checkpoint condition 1 (reference ``min_update_ratio``)
_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:resblocks|blocks|layers|layer)\.\d+)\.")
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original\d*$")


# --------------------------------------------------------------------------- inputs
def _as_tensor(images, backbone: Backbone) -> torch.Tensor:
    """Images -> preprocessed float (N, 3, H, W) on the CPU."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise UsageError("image tensors must be preprocessed float (N, 3, H, W); got "
                             f"{images.dtype} {tuple(images.shape)}")
        return images.detach().float().cpu()
    images = list(images) if not isinstance(images, np.ndarray) else images
    if len(images) == 0:
        raise UsageError("images is empty; pass at least one image")
    if all(isinstance(t, torch.Tensor) for t in images):
        return _as_tensor(torch.stack(list(images)), backbone)
    cfg = backbone.preprocess_cfg
    pre = None if all(is_model_sized(a, cfg) for a in images) else make_preprocess(cfg)
    return images_to_tensor(images, pre, cfg).float()                 # (N, 3, H, W)


def _check_inputs(backbone, images, labels, classnames, template):
    check_backbone("backbone", backbone)
    classnames = [classnames] if isinstance(classnames, str) else list(classnames)
    if not classnames:
        raise UsageError("classnames is empty; pass the class names the labels index into")
    try:
        prompts = [template.format(c) for c in classnames]
    except (AttributeError, IndexError, KeyError) as e:
        raise UsageError("template must be a str with one '{}' for the class name, "
                         f"got {template!r}") from e
    x = _as_tensor(images, backbone)                                  # (N, 3, H, W)
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"labels must be one integer per image: {len(x)} images but labels of "
                         f"shape {y.shape}")
    if len(y) == 0:
        raise UsageError("images is empty; pass at least one image")
    y = check_labels(y, len(classnames))
    tokens = backbone.tokenize(prompts)                               # (C, T)
    return x, torch.as_tensor(y, dtype=torch.long), tokens


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _work_model(backbone: Backbone) -> torch.nn.Module:
    """A float32 deep copy in eval mode with every parameter frozen."""
    model = copy.deepcopy(backbone.model).float().eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------- the loss (1)-(3)
def _logits_loss(img, txt, logit_scale, y, normalize_logits):
    """Eqs. (1)-(3) from features; returns (loss, logits)."""
    logits = logit_scale * img @ txt.T                                # (B, C), eq. (1)
    z = logits
    if normalize_logits:
        z = z - z.mean(dim=1, keepdim=True)                           # eq. (2), centre
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-10)          # eq. (2), unit ℓ2 norm
    return F.cross_entropy(z, y), logits                              # eq. (3)


def _in_image_tower(name: str) -> bool:
    return name.startswith("visual.")


def _in_text_tower(name: str) -> bool:
    return not _in_image_tower(name) and name.split(".")[0] not in ("logit_scale", "logit_bias")


def zero_shot_loss(backbone: Backbone, images, labels, classnames, *,
                   template: str = "a photo of a {}.", batch_size: int = 128,
                   normalize_logits: bool = False) -> dict:
    """Cross-entropy and accuracy of the zero-shot classifier, eqs. (1)-(3).

    Parameters
    ----------
    backbone : Backbone
    images : torch.Tensor (N, 3, H, W), or uint8 arrays (N, H, W, 3), or PIL images
        Float tensors must already be preprocessed; arrays at the model size are
        normalised as the eval transform does; anything else goes through it.
    labels : array-like of int, shape (N,)
        Indices into ``classnames``.
    classnames : sequence of str
    template : str, default="a photo of a {}."
    batch_size : int, default=128
    normalize_logits : bool, default=False
        Apply eq. (2) before the cross-entropy.

    Returns
    -------
    dict
        ``{"loss": float, "acc": float}``: mean cross-entropy and top-1 accuracy over the
        N images.
    """
    x, y, tokens = _check_inputs(backbone, images, labels, classnames, template)
    check_positive_int("batch_size", batch_size)
    model = _work_model(backbone)
    return _evaluate(model, x, y, tokens, batch_size, normalize_logits)


@torch.no_grad()
def _evaluate(model, x, y, tokens, batch_size, normalize_logits, img_cache=None, txt_cache=None):
    dev = next(model.parameters()).device
    txt = txt_cache if txt_cache is not None else model.encode_text(tokens.to(dev), normalize=True)  # (C, D)
    scale = model.logit_scale.exp()
    total, correct = 0.0, 0
    for sl in _batches(len(x), batch_size):
        img = (img_cache[sl] if img_cache is not None
               else model.encode_image(x[sl].to(dev), normalize=True))  # (B, D)
        yb = y[sl].to(dev)
        loss, logits = _logits_loss(img, txt, scale, yb, normalize_logits)
        total += float(loss) * len(yb)
        correct += int((logits.argmax(dim=1) == yb).sum())
    return {"loss": total / len(x), "acc": correct / len(x)}


# ----------------------------------------------------------------------- layer groups
def _group_of(name: str, model: torch.nn.Module) -> str:
    m = _BLOCK.match(name)
    if m:
        return m.group(1)
    p = _PARAMETRIZED.search(name)
    if p:                                                  # owner.parametrizations.attr.original
        name = name[:p.start()] + "." + p.group(1)
    owner = name.rpartition(".")[0]
    if not owner:
        return name
    try:
        mod = model.get_submodule(owner)
    except AttributeError:
        return name
    return name if any(True for _ in mod.children()) else owner


def layer_groups(model, *, trainable_only: bool = True) -> dict[str, list[str]]:
    """Group parameter names by layer: one group per residual block or leaf module.

    Parameters
    ----------
    model : Backbone or torch.nn.Module
    trainable_only : bool, default=True
        Only floating-point parameters with ``requires_grad``; ``False`` takes every
        floating-point parameter.

    Returns
    -------
    dict of str to list of str
        Group name -> parameter names, in ``named_parameters`` order; the groups
        partition the selected parameters.  See the module docstring for the rule.
    """
    model = model.model if isinstance(model, Backbone) else model
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point() or (trainable_only and not p.requires_grad):
            continue
        groups.setdefault(_group_of(name, model), []).append(name)
    return groups


def _select(available: Sequence[str], spec, groups: dict[str, list[str]]) -> list[str]:
    """Names in ``available`` equal to, or under (``entry + '.'``), an entry of ``spec``."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise UsageError("layers is empty; pass None for all parameters or a list of names")
    chosen = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise UsageError(f"layer names must be str, got {type(entry).__name__}")
        hit = [n for n in available if n == entry or n.startswith(entry + ".")]
        if not hit:
            close = difflib.get_close_matches(entry, list(groups), n=3, cutoff=0.5)
            few = ", ".join(dict.fromkeys(close + list(groups)[:6 - len(close)]))
            raise UsageError(f"unknown layer {entry!r}: no parameter is named so or lies under "
                             f"'{entry}.'; valid names include {few}, ... "
                             "(see cliplab.eval.sharpness.layer_groups)")
        chosen.update(hit)
    return [n for n in available if n in chosen]


def _resolve_groups(available: Sequence[str], spec, default: dict) -> dict[str, list[str]]:
    if spec is None:
        return default
    if isinstance(spec, dict):
        out = {str(k): _select(available, v, default) for k, v in spec.items()}
    else:
        entries = [spec] if isinstance(spec, str) else list(spec)
        out = {e: _select(available, e, default) for e in entries}
    if not out:
        raise UsageError("layers/groups is empty; pass None for the default grouping")
    return out


# ------------------------------------------------------------------ worst-case ascent
def _checkpoints(n_iters: int) -> set[int]:
    """Reference step-size checkpoints: ⌈p_j n⌉, p = 0.22, 0.41, 0.57, ...  (Croce & Hein)."""
    p, w = [0.0, 0.22], [0, math.ceil(0.22 * n_iters)]
    while w[-1] < n_iters and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n_iters))
    return set(w[1:])


def _batch_sharpness(loss_at, w0, radius, n_iters, delta0):
    """max over the box of eq. (4) for one batch by Auto-PGD, eqs. (5)-(6).

    ``loss_at(delta, grad)`` sets w = w0 + δ and returns (loss, grads or None).
    Returns (L_B(w), max L_B(w + δ) found).
    """
    if delta0 is None:
        delta = [torch.zeros_like(w) for w in w0]
        L, g = loss_at(delta, True)
        L0 = L
    else:
        L0, _ = loss_at([torch.zeros_like(w) for w in w0], False)
        delta = delta0
        L, g = loss_at(delta, True)
    best = max(L0, L)
    best_delta = [d.clone() if L > L0 else torch.zeros_like(d) for d in delta]
    prev = [d.clone() for d in delta]
    eta, cps = 2.0, _checkpoints(n_iters)
    prev_cp, prev_eta, prev_best, n_better = 0, eta, best, 0
    for i in range(n_iters):
        with torch.no_grad():
            new = []
            for d, dp, gi, r in zip(delta, prev, g, radius):
                z = torch.maximum(torch.minimum(d + eta * r * gi.sign(), r), -r)     # eq. (5)
                if i > 0:
                    z = d + _MOMENTUM * (z - d) + (1 - _MOMENTUM) * (d - dp)          # eq. (6)
                    z = torch.maximum(torch.minimum(z, r), -r)
                new.append(z)
        prev, delta = delta, new
        last = i == n_iters - 1
        L, g = loss_at(delta, not last)
        if L > best:
            best, best_delta, n_better = L, [d.clone() for d in delta], n_better + 1
        if i in cps and not last:
            stalled = n_better < _MIN_UPDATE_RATIO * (i - prev_cp)            # condition 1
            stuck = prev_eta == eta and prev_best == best                     # condition 2
            prev_cp, prev_eta, prev_best, n_better = i, eta, best, 0
            if stalled or stuck:
                eta /= 2
                delta = [d.clone() for d in best_delta]                       # restart at the best δ
                prev = [d.clone() for d in best_delta]
                _, g = loss_at(delta, True)
    return L0, best


def _model_sharpness(model, x, y, tokens, names, *, rho, n_iters, batch_size,
                     normalize_logits, init, seed, progress=None, desc="sharpness"):
    """Eq. (4) on ``model`` in place, over the parameters ``names``; weights restored."""
    params = dict(model.named_parameters())
    sel = [params[n] for n in names]
    dev = sel[0].device
    grad_flags = {n: p.requires_grad for n, p in params.items()}
    w0 = [p.detach().clone() for p in sel]
    radius = [rho * w.abs() for w in w0]                              # box |δ_i| ≤ ρ|w_i|, eq. (4)
    img_live = any(_in_image_tower(n) for n in names)
    txt_live = any(_in_text_tower(n) for n in names)
    gen = torch.Generator().manual_seed(int(seed))
    tokens = tokens.to(dev)
    out = []
    try:
        for p in params.values():
            p.requires_grad_(False)
        for p in sel:
            p.requires_grad_(True)
        with torch.no_grad():
            txt_fixed = None if txt_live else model.encode_text(tokens, normalize=True)  # (C, D)
        for sl in progress_bar(_batches(len(x), batch_size), progress=progress, desc=desc,
                               unit="batch"):
            xb, yb = x[sl].to(dev), y[sl].to(dev)
            with torch.no_grad():
                img_fixed = None if img_live else model.encode_image(xb, normalize=True)  # (B, D)

            def loss_at(delta, grad):
                with torch.no_grad():
                    for p, w, d in zip(sel, w0, delta):
                        p.copy_(w + d)
                with torch.enable_grad():
                    img = img_fixed if img_fixed is not None else model.encode_image(xb, normalize=True)
                    txt = txt_fixed if txt_fixed is not None else model.encode_text(tokens, normalize=True)
                    loss, _ = _logits_loss(img, txt, model.logit_scale.exp(), yb, normalize_logits)
                    grads = None
                    if grad:                                          # unused tensors: zero gradient
                        grads = (torch.autograd.grad(loss, sel, allow_unused=True)
                                 if loss.requires_grad else [None] * len(sel))
                if grads is not None:
                    grads = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(sel, grads)]
                return float(loss.detach()), grads

            delta0 = None
            if init == "random":                                      # δ_0 ~ U(box)
                delta0 = [((2 * torch.rand(w.shape, generator=gen) - 1).to(dev, w.dtype)) * r
                          for w, r in zip(w0, radius)]
            L0, worst = _batch_sharpness(loss_at, w0, radius, n_iters, delta0)
            out.append(worst - L0)                                    # eq. (4), one batch
    finally:
        with torch.no_grad():
            for p, w in zip(sel, w0):
                p.copy_(w)                                            # exact restore
        for n, p in params.items():
            p.requires_grad_(grad_flags[n])
    return float(np.mean(out))                                        # eq. (4), mean over B


def _check_sharpness_args(rho, n_iters, batch_size, init):
    r = check_number("rho", rho, minimum=0, hint="relative box radius")
    check_positive_int("n_iters", n_iters)
    check_positive_int("batch_size", batch_size)
    check_choice("init", init, ("zero", "random"))
    return r


def sharpness(backbone: Backbone, images, labels, classnames, *, template: str = "a photo of a {}.",
              rho: float = 1e-3, n_iters: int = 20, batch_size: int = 128, layers=None,
              normalize_logits: bool = True, init: str = "zero", seed: int = 0,
              progress: bool | None = None) -> float:
    """Adaptive worst-case ℓ∞ m-sharpness of the zero-shot classifier, eq. (4).

    S = mean over batches B of [max_{|δ_i| ≤ ρ|w_i|} L_B(w + δ) − L_B(w)], with L_B the
    cross-entropy of the zero-shot logits of eqs. (1)-(3) (both towers take part) and
    the inner max solved by Auto-PGD (eqs. (5)-(6), see the module docstring).

    Parameters
    ----------
    backbone : Backbone
        Not modified: the ascent runs on a float32 deep copy of ``backbone.model``.
    images : torch.Tensor (N, 3, H, W), or uint8 arrays (N, H, W, 3), or PIL images
        Float tensors must be preprocessed already.  The reference uses N = 1024.
    labels : array-like of int, shape (N,)
        Indices into ``classnames``.
    classnames : sequence of str
    template : str, default="a photo of a {}."
        Prompt for each class name.
    rho : float, default=1e-3
        Relative box radius ρ (≥ 0); ρ = 0 gives exactly 0.
    n_iters : int, default=20
        Ascent steps per batch (≥ 1).
    batch_size : int, default=128
        m, the batch size of m-sharpness.
    layers : str or list of str, optional
        Perturb only parameters named so or lying under ``name + '.'`` (prefixes such as
        ``"visual.transformer.resblocks.3"`` or exact names).  Default: every trainable
        (``requires_grad``) floating-point parameter of the model; on a LoRA-wrapped
        Backbone that is only the adapter (whose zero-initialised B gives S = 0), so
        merge it first to measure the whole model.
    normalize_logits : bool, default=True
        Logit normalisation, eq. (2), as the reference uses.
    init : {"zero", "random"}, default="zero"
        δ_0 = 0 (reference default), or uniform in the box drawn with ``seed``.
    seed : int, default=0
        Seed of the random init (unused for ``init="zero"``: the result is deterministic).
    progress : bool, optional
        Progress bar over batches.

    Returns
    -------
    float
        S ≥ 0, in units of the loss (3).

    Raises
    ------
    UsageError
        Empty ``classnames``, labels not one index per image, ρ < 0, ``n_iters`` < 1, or a
        name in ``layers`` that matches no parameter (the message lists valid ones).

    Notes
    -----
    To first order in ρ, one step (``n_iters=1``) gives S ≈ ρ Σ_i |w_i| |∂L_B/∂w_i|.

    References
    ----------
    Andriushchenko, Croce, Müller, Hein, Flammarion. "A Modern Look at the Relationship
    between Sharpness and Generalization", ICML 2023, arXiv:2302.07011.
    Abdollahpoorrostam. "In Search of the Successful Interpolation: On the Role of
    Sharpness in CLIP Generalization", NeurIPS 2024 workshop, arXiv:2410.16476.

    Examples
    --------
    >>> import cliplab
    >>> from cliplab.eval.sharpness import sharpness
    >>> bb = cliplab.load("shapes-tiny")                                   # doctest: +SKIP
    >>> sharpness(bb, images, labels, ["star", "circle"], rho=1e-3)        # doctest: +SKIP
    0.0123
    """
    r = _check_sharpness_args(rho, n_iters, batch_size, init)
    x, y, tokens = _check_inputs(backbone, images, labels, classnames, template)
    model = _work_model(backbone)
    available = [n for n, p in backbone.model.named_parameters()
                 if p.is_floating_point() and p.requires_grad]
    if not available:
        raise UsageError("the model has no trainable floating-point parameters to perturb")
    names = available if layers is None else _select(
        available, layers, layer_groups(backbone.model))
    return _model_sharpness(model, x, y, tokens, names, rho=r, n_iters=int(n_iters),
                            batch_size=int(batch_size), normalize_logits=normalize_logits,
                            init=init, seed=seed, progress=progress)


def layer_sharpness(backbone: Backbone, images, labels, classnames, *, layers=None,
                    template: str = "a photo of a {}.", rho: float = 1e-3, n_iters: int = 20,
                    batch_size: int = 128, normalize_logits: bool = True, init: str = "zero",
                    seed: int = 0, progress: bool | None = None) -> dict[str, float]:
    """Layer-wise sharpness: eq. (4) with δ restricted to one layer group at a time.

    Parameters
    ----------
    backbone, images, labels, classnames, template, rho, n_iters, batch_size, \
normalize_logits, init, seed
        As in :func:`sharpness`.
    layers : list of str or dict of str to list of str, optional
        Default :func:`layer_groups` (one group per residual block of each tower, one per
        embedding / projection / norm).  A list makes one group per entry (a prefix or an
        exact name); a dict names groups of several entries.
    progress : bool, optional
        Progress bar over groups.

    Returns
    -------
    dict of str to float
        Group -> S^ℓ ≥ 0, in group order.  For default groups the values are additive
        to first order: with ``n_iters=1`` and small ρ they sum to :func:`sharpness`.
    """
    r = _check_sharpness_args(rho, n_iters, batch_size, init)
    x, y, tokens = _check_inputs(backbone, images, labels, classnames, template)
    default = layer_groups(backbone.model)
    if not default:
        raise UsageError("the model has no trainable floating-point parameters to perturb")
    available = [n for names in default.values() for n in names]
    groups = _resolve_groups(available, layers, default)
    model = _work_model(backbone)
    out = {}
    for g, names in progress_bar(groups.items(), progress=progress, desc="layer sharpness",
                                 unit="layer", total=len(groups)):
        out[g] = _model_sharpness(model, x, y, tokens, names, rho=r, n_iters=int(n_iters),
                                  batch_size=int(batch_size), normalize_logits=normalize_logits,
                                  init=init, seed=seed, progress=False)
        logger.info("sharpness of %s: %.6g", g, out[g])
    return out


# -------------------------------------------------------------------- straggler layers
def _barrier(alphas: np.ndarray, values: np.ndarray) -> float:
    """Eq. (7): largest excess over the chord between the α = 0 and α = 1 values."""
    chord = (1 - alphas) * values[0] + alphas * values[-1]
    return float(np.max(values - chord))


def straggler_layers(zero_shot: Backbone, finetuned: Backbone, images, labels, classnames, *,
                     alphas=np.linspace(0, 1, 11), groups=None, anchor: str = "zero_shot",
                     template: str = "a photo of a {}.", batch_size: int = 128,
                     normalize_logits: bool = False, progress: bool | None = None) -> dict:
    """Layer-wise linear mode connectivity between a zero-shot and a fine-tuned CLIP.

    For each layer group g and each α, only g's tensors are interpolated,
    θ_g(α) = (1 − α)θ_0,g + αθ_1,g (WiSE-FT Eq. 1), every other tensor staying at the
    ``anchor`` endpoint; loss (3) and accuracy are recorded and the barrier (7) ranks the
    groups ("stragglers" first).

    Parameters
    ----------
    zero_shot, finetuned : Backbone
        θ_0 and θ_1, same architecture.  Neither is modified.
    images, labels, classnames, template, batch_size
        As in :func:`sharpness`.
    alphas : array-like of float, default=np.linspace(0, 1, 11)
        Points in [0, 1]; 0 and 1 are added if missing (the barrier needs them), the
        grid is sorted.  The reference uses a step of 0.05.
    groups : list of str or dict of str to list of str, optional
        Default: :func:`layer_groups` over every floating-point parameter.
    anchor : {"zero_shot", "finetuned"}, default="zero_shot"
        The endpoint that the tensors outside the group are kept at.
    normalize_logits : bool, default=False
        Apply eq. (2) in the loss (the LMC reference uses plain cross-entropy).
    progress : bool, optional
        Progress bar over groups.

    Returns
    -------
    dict
        ``alphas`` (A,) the grid used; ``full``: the whole-model WiSE-FT curve
        ``{"loss": (A,), "acc": (A,), "barrier": float, "acc_barrier": float}``, whose
        endpoints are the two models; ``groups``: group -> the same record plus
        ``"params"`` (its tensor names), ordered by barrier, largest first;
        ``ranking``: list of (group, barrier) in that order; ``anchor``.
        ``acc_barrier`` is eq. (7) on the error, i.e. the largest accuracy drop below
        the chord.

    Raises
    ------
    CheckpointMismatch
        The models differ in keys, shapes or float-ness.
    UsageError
        Bad inputs, alphas outside [0, 1], unknown group names, bad ``anchor``.

    References
    ----------
    Adilova, Andriushchenko, Kamp, Fischer, Jaggi. "Layer-wise Linear Mode Connectivity",
    ICLR 2024, arXiv:2307.06966.
    """
    check_backbone("zero_shot", zero_shot)
    check_backbone("finetuned", finetuned)
    check_choice("anchor", anchor, ("zero_shot", "finetuned"))
    check_positive_int("batch_size", batch_size)
    try:
        a = np.asarray(alphas, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise UsageError(f"alphas must be numbers in [0, 1], got {alphas!r}") from None
    if not np.all(np.isfinite(a)) or a.size and (a.min() < 0 or a.max() > 1):
        raise UsageError(f"alphas must lie in [0, 1] (0 = zero-shot, 1 = fine-tuned), got {a.tolist()}")
    a = np.unique(np.concatenate([a, [0.0, 1.0]]))                    # sorted, with endpoints
    x, y, tokens = _check_inputs(zero_shot, images, labels, classnames, template)

    sd0, sd1 = zero_shot.model.state_dict(), finetuned.model.state_dict()
    check_compatible(sd0, sd1)
    model = _work_model(zero_shot if anchor == "zero_shot" else finetuned)
    params = dict(model.named_parameters())
    default = layer_groups(model, trainable_only=False)
    available = [n for names in default.values() for n in names]
    chosen = _resolve_groups(available, groups, default)
    anchor_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dev = next(model.parameters()).device
    ev = dict(batch_size=int(batch_size), normalize_logits=normalize_logits)

    def record(rows):
        loss = np.array([r["loss"] for r in rows])
        acc = np.array([r["acc"] for r in rows])
        return {"loss": loss, "acc": acc, "barrier": _barrier(a, loss),
                "acc_barrier": _barrier(a, 1.0 - acc)}

    rows = []                                                        # whole model, WiSE-FT
    for alpha in a:
        mixed = interpolate_state_dicts(sd0, sd1, float(alpha))
        model.load_state_dict(mixed, strict=True)
        rows.append(_evaluate(model, x, y, tokens, **ev))
    model.load_state_dict(anchor_sd, strict=True)
    full = record(rows)

    with torch.no_grad():                                             # towers left unchanged
        txt_anchor = model.encode_text(tokens.to(dev), normalize=True)  # (C, D)
        img_anchor = torch.cat([model.encode_image(x[sl].to(dev), normalize=True)
                                for sl in _batches(len(x), int(batch_size))])  # (N, D)
    out = {}
    for g, names in progress_bar(chosen.items(), progress=progress, desc="layer LMC",
                                 unit="layer", total=len(chosen)):
        img_cache = None if any(_in_image_tower(n) for n in names) else img_anchor
        txt_cache = None if any(_in_text_tower(n) for n in names) else txt_anchor
        sub0, sub1 = {n: sd0[n] for n in names}, {n: sd1[n] for n in names}
        rows = []
        for alpha in a:
            mixed = interpolate_state_dicts(sub0, sub1, float(alpha))  # WiSE-FT Eq. 1 on g only
            with torch.no_grad():
                for n in names:
                    params[n].copy_(mixed[n])
            rows.append(_evaluate(model, x, y, tokens, img_cache=img_cache, txt_cache=txt_cache, **ev))
        with torch.no_grad():
            for n in names:
                params[n].copy_(anchor_sd[n])
        out[g] = {**record(rows), "params": list(names)}
    order = sorted(out, key=lambda g: out[g]["barrier"], reverse=True)
    return {"alphas": a, "full": full, "groups": {g: out[g] for g in order},
            "ranking": [(g, out[g]["barrier"]) for g in order], "anchor": anchor}
