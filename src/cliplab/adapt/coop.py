"""CoOp and KgCoOp: learn the context words of the class prompts, towers frozen.

CoOp — "Learning to Prompt for Vision-Language Models" (Zhou et al., IJCV'22), reference
code KaiyangZhou/CoOp ``trainers/coop.py``.  KgCoOp — "Visual-Language Prompt Tuning with
Knowledge-guided Context Optimization" (Yao et al., CVPR'23), htyao89/KgCoOp
``trainers/kgcoop.py``.

Algorithm
---------
1. Prompts ``t_c = [v_1..v_M][CLASS_c].`` with learnable context ``v``
   (:class:`cliplab.adapt.prompts.SoftPrompts`), shared by all classes or class-specific.
2. ``p(y=c | x) = softmax_c( s · cos(f(x), g(t_c)) )`` with the frozen image feature
   ``f(x)``, the frozen text tower ``g`` and the model's temperature ``s``.
3. CoOp minimises the cross-entropy ``L_ce``; KgCoOp adds
   ``λ · (1 − (1/C) Σ_c cos(g(t_c), w_c^clip))`` with ``w^clip`` the frozen feature of
   the hand-written prompt (``template``), λ = 8.
4. Only ``v`` trains: SGD (momentum 0.9, weight decay 5e-4), lr 2e-3, batch 32, epochs
   50 / 100 / 200 for 1 / 2-4 / 8-16 shots (``epochs=None``).  The rate follows the
   reference's Dassl scheduler, stepped once per epoch: 1 warm-up epoch at a constant
   1e-5, then ``lr · (1 + cos(π (e − 1) / E)) / 2`` in epoch e of E.

Defaults are the reference's (``train.py``: ``N_CTX = 16``, ``CTX_INIT = ""``): CoOp
starts from 16 random context vectors N(0, 0.02²), shared by the classes.  KgCoOp's
reference starts from "a photo of a" (4 vectors), and so does :class:`KgCoOp`.  With
``ctx_init="a photo of a"`` the untrained prompts equal the hand-written
"a photo of a {c}." exactly, so at step 0 CoOp is zero-shot CLIP and KgCoOp's
regulariser is 0 (tested).

Deviations: image features are computed once, without augmentation (the image tower is
frozen; the reference re-encodes randomly cropped and flipped images every epoch).
Until this version CoOp defaulted to ``ctx_init="a photo of a"`` and stepped a linear
warm-up and the cosine per batch; pass ``ctx_init="a photo of a"`` for that start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..validation import check_number
from . import METHODS
from ._trainable import TrainedClassifier
from .prompts import SoftPrompts

__all__ = ["CoOp", "KgCoOp"]


@METHODS.register("coop", kind="learner", help="learnable prompt context on frozen features (IJCV 2022)")
class CoOp(TrainedClassifier):
    """Context Optimization: a prompt learner over the frozen Backbone.

    The learning rate changes once per epoch (``lr_schedule = "epoch"``, the reference's).

    Parameters
    ----------
    backbone : Backbone
    classnames : list of str
        One name per class index of ``y``.
    n_ctx : int, default 16
        Number of context vectors when ``ctx_init`` is empty (random init N(0, 0.02²)).
    ctx_init : str, default ""
        Words to initialise the context from (their number sets M); "" (the reference's
        default) for ``n_ctx`` random vectors.
    class_specific : bool, default False
        One context per class (CSC).  Such a classifier cannot move to other classes.
    epochs : int or None, default None
        None: 50 / 100 / 200 epochs for 1 / 2-4 / 8+ shots, as in the paper.
    batch_size : int, default 32
    lr : float, default 2e-3
    warmup_epochs : int, default 1
        Epochs at the constant warm-up rate 1e-5 (``warmup_lr``).
    optimizer : {"sgd", "adamw"}, default "sgd"
    weight_decay : float, default 5e-4
    momentum : float, default 0.9
        SGD momentum.
    grad_clip : float or None, default None
        Largest gradient norm; None: no clipping.
    random_state : int, default 0
        Seeds the context initialisation and the mini-batch order.
    progress : bool, optional

    Attributes
    ----------
    text_features_ : ndarray (C, D)
        Unit-norm ``g(t_c)`` of the learned prompts.
    context_ : ndarray (M, W) or (C, M, W)
        The learned context vectors.
    n_trainable_ : int
    history_ : list of dict
        Mean loss terms per epoch.
    fit_time_, epoch_time_ : float
        Seconds.

    Examples
    --------
    >>> est = CoOp(backbone=bb, classnames=["cat", "dog"]).fit(feats, labels)   # doctest: +SKIP
    >>> est.with_classnames(["horse", "cow"]).predict(other_feats)              # doctest: +SKIP
    """

    def __init__(self, backbone=None, classnames=None, *, n_ctx: int = 16, ctx_init: str = "",
                 class_specific: bool = False, epochs: int | None = None, batch_size: int = 32,
                 lr: float = 2e-3, warmup_epochs: int = 1, optimizer: str = "sgd", weight_decay: float = 5e-4,
                 momentum: float = 0.9, grad_clip: float | None = None, random_state: int = 0,
                 progress: bool | None = None):
        self.backbone = backbone
        self.classnames = classnames
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_specific = class_specific
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

    lr_schedule = "epoch"

    # ------------------------------------------------------------- training
    def _make_prompts(self, classnames) -> SoftPrompts:
        gen = torch.Generator().manual_seed(int(self.random_state))
        return SoftPrompts(self.backbone, classnames, before=self.ctx_init or int(self.n_ctx),
                           class_specific=self.class_specific, generator=gen)

    def _setup(self) -> list:
        self.logit_scale_ = float(self.backbone.logit_scale)
        self._prompts = self._make_prompts(self.classnames)
        return [self._prompts]

    def _text(self) -> torch.Tensor:
        return F.normalize(self._prompts(self.backbone.model), dim=-1)           # (C, D)

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> dict:
        t = self._text()                                                         # (C, D)
        logits = self.logit_scale_ * F.normalize(xb, dim=-1) @ t.T                # (B, C)
        return {"ce": F.cross_entropy(logits, yb)}

    def _finish(self) -> None:
        self.text_features_ = self._text().numpy()
        self.context_ = self._prompts.before.detach().numpy().copy()

    def _relabel(self, classnames) -> None:
        if self.class_specific:
            raise UsageError("a class-specific context (class_specific=True) has no context for new classes")
        prompts = self._make_prompts(classnames)
        prompts.before.data.copy_(torch.from_numpy(self.context_))
        self.text_features_ = F.normalize(prompts(self.backbone.model), dim=-1).numpy()


@METHODS.register("kgcoop", kind="learner", help="CoOp kept near the hand-written prompt (CVPR 2023)")
class KgCoOp(CoOp):
    """Knowledge-guided CoOp: CoOp plus ``λ (1 − mean_c cos(g(t_c), w_c^clip))``.

    Parameters
    ----------
    kg_weight : float, default 8.0
        λ of the regulariser (the reference's value).
    template : str, default "a photo of a {}."
        The hand-written prompt whose frozen features ``w^clip`` anchor the learned ones.
    epochs : int, default 100
    batch_size : int, default 128
    Others as :class:`CoOp` (context from "a photo of a", 4 vectors).
    """

    def __init__(self, backbone=None, classnames=None, *, kg_weight: float = 8.0,
                 template: str = "a photo of a {}.", n_ctx: int = 4, ctx_init: str = "a photo of a",
                 class_specific: bool = False, epochs: int | None = 100, batch_size: int = 128,
                 lr: float = 2e-3, warmup_epochs: int = 1, optimizer: str = "sgd", weight_decay: float = 5e-4,
                 momentum: float = 0.9, grad_clip: float | None = None, random_state: int = 0,
                 progress: bool | None = None):
        super().__init__(backbone, classnames, n_ctx=n_ctx, ctx_init=ctx_init, class_specific=class_specific,
                         epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs,
                         optimizer=optimizer, weight_decay=weight_decay, momentum=momentum, grad_clip=grad_clip,
                         random_state=random_state, progress=progress)
        self.kg_weight = kg_weight
        self.template = template

    def _setup(self) -> list:
        check_number("kg_weight", self.kg_weight, minimum=0)
        self._anchor = torch.from_numpy(self.backbone.encode_texts(
            [self.template.format(c) for c in self.classnames], progress=False))   # (C, D) w^clip
        return super()._setup()

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> dict:
        t = self._text()                                                         # (C, D)
        logits = self.logit_scale_ * F.normalize(xb, dim=-1) @ t.T                # (B, C)
        kg = 1.0 - (t * self._anchor).sum(dim=-1).mean()                         # 1 − mean_c cos(t_c, w_c)
        return {"ce": F.cross_entropy(logits, yb), "kg": self.kg_weight * kg}

