"""MoCoOp: a mixture of soft prompts, one per group of hand-written templates, with a router.

"Mixture of Prompt Learning for Vision Language Models" (Du et al., arXiv:2409.12011),
reference code dyabel/mocoop ``prompting/moe.py``, ``prompting/losses.py``,
``configs/MoCoOp/*.yaml``.

Algorithm
---------
The hand-written templates are split into ``E`` groups (``groups``: sizes); group ``e``
gives expert ``e``, a soft prompt ``[v_e] CLASS [u_e].`` whose context starts from the
words of the group's *first* template (:class:`cliplab.adapt.prompts.SoftPrompts`).

1. Prototypes (frozen): ``P_e,c = normalise(mean_{j in group e} normalise(g(template_j(c))))``.
2. Expert features: ``T_e,c = normalise(g(t_e,c) + w)``, ``w`` (1, D) a zero-initialised
   correction shared by all experts.
3. Router: ``r = f W_rᵀ + b_r`` (E,) on the normalised image feature ``f``; the ``k`` largest
   logits are kept and ``G_e = softmax(r_topk)_e`` (0 outside the top-k).
4. Classification: ``t_b,c = Σ_e G_b,e T_e,c``; ``L_ce = CE(s · <f_b, t_b,c>, y_b)``,
   ``s`` the model's temperature.
5. Gating loss: ``h_b,e = <f_b, P_e,y_b>``, +10 on its top-k entries;
   ``L_gate = CE(r_b, softmax(h_b))`` with soft targets.
6. Grouped text loss: ``L_text = mean_e CE(T_e P_eᵀ, diag)`` — (C, C) logits, **no**
   temperature (as in the code), the label of row ``c`` is ``c``.
7. ``L = L_ce + gate_weight · L_gate + text_weight · L_text`` (1 and 5 in the reference).
   Trained: every expert's context, ``w`` and the router; SGD (momentum 0.9, weight decay
   5e-4), cosine, gradient norm clipped at 1.  Inference uses the router alone (step 3-4).

With one template (E = 1) and both extra losses off, MoCoOp is CoOp with before/after
context: untrained, its logits equal zero-shot CLIP with that template (tested).

Deviations
----------
* The image tower is frozen and its features cached: the reference also trains the image
  encoder's LayerNorms (``ln_1``/``ln_2``, lr × 0.1) and re-encodes augmented images.
* The reference's optimiser settings (SGD lr 0.032, batch 32, 50 epochs) with a one-epoch
  linear warm-up instead of one at lr 1e-5.  On shapes-tiny (16 shots, 64 colour-shape
  classes) CoOp's rate 2e-3 with its 200 epochs reached the same test accuracy in four
  times the time (``epochs=None, lr=2e-3`` gives that schedule).
* ``top_k`` (2 in the code) is capped at the number of experts.
* The reference adds N(0, 0.05²) noise to the frozen template features in half of the
  steps (in place, so it accumulates); the prototypes here stay fixed.
* In base-to-new runs the reference computes ``L_text`` over all classes (also the new
  ones); here over ``classnames``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..validation import check_number, check_positive_int
from . import METHODS
from ._trainable import TrainedClassifier
from .prompts import SoftPrompts, split_template

__all__ = ["MoCoOp", "DEFAULT_TEMPLATES", "DEFAULT_GROUPS", "topk_gates", "gate_targets",
           "grouped_text_loss", "mixture_logits", "expert_features"]

#: Generic object-photo templates, in groups of similar wording (one expert per group).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a photo of the {}.",                        # photos
    "a drawing of a {}.", "a sketch of a {}.",                       # drawings
    "a {} on a plain background.", "a {} in the center of the image.",  # placement
    "a picture of a small {}.", "a picture of a large {}.",          # size
)
DEFAULT_GROUPS: tuple[int, ...] = (2, 2, 2, 2)

_GATE_BOOST = 10.0  # added to the top-k prototype scores of the gating target (reference)


# ---------------------------------------------------------------------- the math
def topk_gates(r: torch.Tensor, k: int) -> torch.Tensor:
    """Gate weights (B, E): softmax over the ``k`` largest router logits, 0 elsewhere (step 3)."""
    vals, idx = r.topk(k, dim=-1)                                          # (B, k)
    return torch.zeros_like(r).scatter(-1, idx, vals.softmax(dim=-1))      # (B, E)


def gate_targets(f: torch.Tensor, P: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Soft gating targets (B, E): ``softmax(h)``, ``h_b,e = <f_b, P_e,y_b>`` + 10 on its top-k (step 5)."""
    h = torch.einsum("bd,ebd->be", f, P[:, y])                             # (B, E)
    idx = h.topk(k, dim=-1).indices                                        # (B, k)
    return (h + torch.zeros_like(h).scatter(-1, idx, _GATE_BOOST)).softmax(dim=-1)


def grouped_text_loss(T: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``mean_e CE(T_e P_eᵀ, diag)`` of experts (E, C, D) against prototypes (E, C, D) (step 6)."""
    E, C, _ = T.shape
    logits = torch.einsum("ecd,ekd->eck", T, P)                            # (E, C, C), no temperature
    return F.cross_entropy(logits.reshape(E * C, C), torch.arange(C, device=T.device).repeat(E))


def mixture_logits(f: torch.Tensor, T: torch.Tensor, G: torch.Tensor, scale: float) -> torch.Tensor:
    """``s · <f_b, Σ_e G_b,e T_e,c>`` (B, C) of features (B, D), experts (E, C, D), gates (B, E) (step 4)."""
    return scale * torch.einsum("be,bec->bc", G, torch.einsum("bd,ecd->bec", f, T))


def expert_features(experts, w: torch.Tensor, model) -> torch.Tensor:
    """``normalise(g(t_e,c) + w)`` (E, C, D) of the experts' prompts, ``w`` (1, D) (step 2)."""
    raw = torch.stack([p(model) for p in experts])                             # (E, C, D)
    return F.normalize(raw + w, dim=-1)


class _Mixture(nn.Module):
    """The trainable parts: the experts' soft prompts, the router and the correction ``w``."""

    def __init__(self, experts: nn.ModuleList, dim: int):
        super().__init__()
        self.experts = experts
        self.router = nn.Linear(dim, len(experts))                             # W_r, b_r
        self.w = nn.Parameter(torch.zeros(1, dim))                             # zero init

    def text(self, model) -> torch.Tensor:
        """``normalise(g(t_e,c) + w)`` (E, C, D), step 2."""
        return expert_features(self.experts, self.w, model)


# ------------------------------------------------------------------- estimator
@METHODS.register("mocoop", kind="learner", help="mixture of soft prompts with a router (arXiv:2409.12011)")
class MoCoOp(TrainedClassifier):
    """Mixture-of-prompts CoOp: one soft prompt per template group, mixed by a router.

    Parameters
    ----------
    backbone : Backbone
    classnames : list of str
        One name per class index of ``y``.
    templates : list of str, optional
        Hand-written templates with one ``{}`` (or ``{c}``) for the class name; default
        :data:`DEFAULT_TEMPLATES` (8 generic object-photo templates).
    groups : list of int, optional
        Sizes of consecutive template groups, summing to ``len(templates)``; one expert
        per group.  Default :data:`DEFAULT_GROUPS` with the default templates, else one
        group per template.
    top_k : int, default 2
        Experts mixed per image (capped at the number of experts).
    gate_weight : float, default 1.0
        Weight of the hard-prompt-guided gating loss.
    text_weight : float, default 5.0
        Weight of the grouped text loss (``TEXT_LOSS_WEIGHT``).
    epochs : int or None, default 50
        The reference's; None: CoOp's 50 / 100 / 200 epochs for 1 / 2-4 / 8+ shots.
    batch_size : int, default 32
    lr : float, default 0.032
        The reference's rate at batch 32; see the module notes.
    warmup_epochs : int, default 1
    optimizer : {"sgd", "adamw"}, default "sgd"
    weight_decay : float, default 5e-4
    momentum : float, default 0.9
        SGD momentum.
    grad_clip : float or None, default 1.0
        Largest gradient norm (the reference's); None: no clipping.
    random_state : int, default 0
        Seeds the router and context initialisation and the mini-batch order.
    progress : bool, optional

    Attributes
    ----------
    templates_ : list of str
    groups_ : list of int
    top_k_ : int
        ``top_k`` capped at the number of experts E.
    expert_features_ : ndarray (E, C, D)
        Unit-norm ``normalise(g(t_e,c) + w)`` of the learned prompts.
    prototypes_ : ndarray (E, C, D)
        The frozen group prototypes ``P``.
    router_weight_ : ndarray (E, D)
    router_bias_ : ndarray (E,)
    correction_ : ndarray (1, D)
        The learned shared correction ``w``.
    contexts_ : dict of str to ndarray
        ``"<e>.before"`` (M_e, W) / ``"<e>.after"`` (N_e, W): the learned context vectors.
    logit_scale_ : float
    n_trainable_ : int
    history_ : list of dict
        Mean loss terms (``ce``, ``gate``, ``text``) per epoch.
    fit_time_, epoch_time_ : float
        Seconds.

    Examples
    --------
    >>> est = MoCoOp(backbone=bb, classnames=["cat", "dog"]).fit(feats, labels)  # doctest: +SKIP
    >>> est.expert_weights(feats).shape                                           # doctest: +SKIP
    (N, 4)
    """

    def __init__(self, backbone=None, classnames=None, *, templates=None, groups=None, top_k: int = 2,
                 gate_weight: float = 1.0, text_weight: float = 5.0, epochs: int | None = 50,
                 batch_size: int = 32, lr: float = 0.032, warmup_epochs: int = 1, optimizer: str = "sgd",
                 weight_decay: float = 5e-4, momentum: float = 0.9, grad_clip: float | None = 1.0,
                 random_state: int = 0, progress: bool | None = None):
        self.backbone = backbone
        self.classnames = classnames
        self.templates = templates
        self.groups = groups
        self.top_k = top_k
        self.gate_weight = gate_weight
        self.text_weight = text_weight
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.warmup_epochs = warmup_epochs
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.grad_clip = grad_clip
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------- checks
    def _check_groups(self) -> tuple[list[str], list[int]]:
        if self.templates is None:
            templates = list(DEFAULT_TEMPLATES)
            groups = list(DEFAULT_GROUPS if self.groups is None else self.groups)
        else:
            if isinstance(self.templates, str) or not len(self.templates):
                raise UsageError(f"templates must be a non-empty list of templates with '{{}}', "
                                 f"got {self.templates!r}")
            templates = [str(t).replace("{c}", "{}") for t in self.templates]
            groups = [1] * len(templates) if self.groups is None else list(self.groups)
        for t in templates:
            split_template(t)                                   # one '{}' each
        if (not groups or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1
                              for g in groups)
                or sum(groups) != len(templates)):
            raise UsageError(f"groups must be positive sizes of consecutive templates summing to "
                             f"len(templates) = {len(templates)}; got {list(groups)}")
        check_positive_int("top_k", self.top_k)
        for name in ("gate_weight", "text_weight"):
            check_number(name, getattr(self, name), minimum=0)
        return templates, [int(g) for g in groups]

    # ------------------------------------------------------------- training
    def _heads(self) -> list[str]:
        """The first template of every group: the words each expert starts from."""
        starts = np.cumsum([0, *self.groups_[:-1]])
        return [self.templates_[s] for s in starts]

    def _make_experts(self, classnames) -> nn.ModuleList:
        experts = []
        for head in self._heads():
            before, after = split_template(head)
            experts.append(SoftPrompts(self.backbone, classnames, before=before, after=after))
        return nn.ModuleList(experts)

    def _prototypes(self, classnames) -> torch.Tensor:
        """Group prototypes P (E, C, D), step 1."""
        feats = [self.backbone.encode_texts([t.format(c) for c in classnames], progress=False)
                 for t in self.templates_]                                     # each (C, D), unit
        per_template = torch.from_numpy(np.stack(feats))                        # (n_templates, C, D)
        groups = torch.split(per_template, self.groups_)
        return F.normalize(torch.stack([g.mean(dim=0) for g in groups]), dim=-1)  # (E, C, D)

    def _setup(self) -> list:
        self.templates_, self.groups_ = self._check_groups()
        self.top_k_ = min(int(self.top_k), len(self.groups_))
        self.logit_scale_ = float(self.backbone.logit_scale)
        self._P = self._prototypes(self.classnames)                            # (E, C, D)
        self._net = _Mixture(self._make_experts(self.classnames), self.backbone_dim_)
        return [self._net]

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> dict:
        T = self._net.text(self.backbone.model)                               # (E, C, D), step 2
        f = F.normalize(xb, dim=-1)                                            # (B, D)
        r = self._net.router(f)                                                # (B, E)
        G = topk_gates(r, self.top_k_)                                         # (B, E), step 3
        logits = mixture_logits(f, T, G, self.logit_scale_)                    # (B, C), step 4
        gate = F.cross_entropy(r, gate_targets(f, self._P, yb, self.top_k_))   # step 5
        return {"ce": F.cross_entropy(logits, yb),
                "gate": self.gate_weight * gate,
                "text": self.text_weight * grouped_text_loss(T, self._P)}     # step 6

    def _finish(self) -> None:
        net = self._net
        self.expert_features_ = net.text(self.backbone.model).numpy()
        self.prototypes_ = self._P.numpy()
        self.router_weight_ = net.router.weight.detach().numpy().copy()
        self.router_bias_ = net.router.bias.detach().numpy().copy()
        self.correction_ = net.w.detach().numpy().copy()
        self.contexts_ = {f"{e}.{side}": getattr(p, side).detach().numpy().copy()
                          for e, p in enumerate(net.experts) for side in ("before", "after")
                          if getattr(p, side) is not None}
        del self._P, self._net                      # prediction uses the arrays above only

    def _relabel(self, classnames) -> None:
        experts = self._make_experts(classnames)
        for e, p in enumerate(experts):
            for side in ("before", "after"):
                if getattr(p, side) is not None:
                    getattr(p, side).data.copy_(torch.from_numpy(self.contexts_[f"{e}.{side}"]))
        w = torch.from_numpy(self.correction_)
        self.expert_features_ = expert_features(experts, w, self.backbone.model).numpy()  # (E, C', D)
        self.prototypes_ = self._prototypes(classnames).numpy()

    # ------------------------------------------------------------ predict
    def _gates(self, f: np.ndarray) -> np.ndarray:
        r = f @ self.router_weight_.T + self.router_bias_                      # (N, E)
        return topk_gates(torch.from_numpy(np.ascontiguousarray(r, dtype=np.float32)), self.top_k_).numpy()

    def expert_weights(self, X) -> np.ndarray:
        """Gate weights (N, E) of the router: rows sum to 1, 0 outside each row's top-k."""
        return self._gates(self._image_features(self._check_X(X)))

    def _logits(self, X: np.ndarray) -> np.ndarray:
        f = self._image_features(X)                                            # (N, D)
        G = self._gates(f)                                                     # (N, E)
        S = np.einsum("nd,ecd->nec", f, self.expert_features_)                 # (N, E, C)
        return self.logit_scale_ * np.einsum("ne,nec->nc", G, S)               # (N, C)
