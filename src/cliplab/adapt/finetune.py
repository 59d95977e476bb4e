"""Few-shot fine-tuning of both towers: LoRA, CLIP-SVD or every weight.

CLIP-SVD — "Singular Value Few-shot Adaptation of Vision-Language Models"
(arXiv:2509.03740), reference code HealthX-Lab/CLIP-SVD ``train.py`` (``run_training``).
LoRA — Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
arXiv:2106.09685.  Full fine-tuning against class prompts as in FLYP — Goyal et al.,
"Finetune like you pretrain", CVPR 2023, arXiv:2212.00638.  The adapted towers come
from :mod:`cliplab.surgery` (:func:`~cliplab.surgery.apply_lora`,
:func:`~cliplab.surgery.apply_svd`); the result can be mixed with the zero-shot model
by WiSE-FT (:func:`~cliplab.surgery.interpolate`, arXiv:2109.01903) through
:meth:`FineTuner.adapted_backbone`.

=========  ======================  ==========================================
``lora``   :class:`LoRAFineTuner`  LoRA on both towers, lr 1e-4
``svd``    :class:`SVDFineTuner`   CLIP-SVD: singular values only, lr 5e-4
``full``   :class:`FullFineTuner`  every weight (the WiSE-FT endpoint), lr 1e-5
=========  ======================  ==========================================

Algorithm
---------
1. Adapt a copy of the Backbone (the given one is never changed):
   lora: ``W' = W + (α/r) B A`` on qkv, out, c_fc, c_proj of both towers
   (LoRA eq. 3); svd: ``W = U diag(s) Vᵀ`` with only ``s`` trained (CLIP-SVD);
   full: every parameter trains, the temperature included (FLYP).
2. Every step, for a mini-batch of images x and ALL class prompts
   ``t_c = template.format(c)``, with the adapted image tower f and text tower g::

       logits_bc = s · cos(f(x_b), g(t_c))                  (CLIP's zero-shot head)
       L = CE(logits, y)                                    (CLIP-SVD train.py)

   ``s = exp(logit_scale)`` of the adapted model (fixed for lora/svd, trained by "full").
3. AdamW, weight decay 0.01, gradient norm clipped at 1.0 (constructor parameters
   ``optimizer``, ``weight_decay``, ``grad_clip``), linear warm-up over
   ``warmup_epochs`` then cosine to 0, batch 32.

Defaults (``lr=None``): 5e-4 for "svd" (the reference's AdamW lr), 1e-4 for "lora",
1e-5 for "full" (WiSE-FT fine-tunes whole CLIPs at 3e-5; larger steps on every weight
forget the zero-shot model).  ``epochs=10``: on the bundled shapes-tiny model, 16 shots
of its 56 trainable classes (896 images of 64 px, 64-way head), one CPU thread, an epoch
takes 3.9 s (svd), 3.8 s (lora), 5.2 s (full), so a fit takes under a minute; a larger lr
(x4 for svd, x10 for lora and full) was not better on the validation split (within 0.4
points).  ``epochs=None`` runs the reference's 200·K
iterations (K = shots of the smallest class).

Before the first step all three methods are zero-shot CLIP (LoRA: ``B = 0``; SVD: an
exact factorisation, to float rounding; full: a copy) — tested.

Deviations
----------
* No image augmentation and a linear warm-up (shared by :mod:`._trainable`); the
  reference uses random resized crops + flips and no warm-up, cosine to 1e-6.
* 10 epochs by default instead of 200·K iterations (CPU budget).
* fp32 only; the reference keeps fp32 weights under fp16 autocast.
* FLYP's loss is the symmetric contrastive loss between a batch's images and their own
  class prompts; here it is the image→text cross-entropy against every class (the
  CLIP-SVD objective), for all three methods.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch.nn.utils import parametrize

from ..errors import CheckpointMismatch, UsageError
from ..models.backbone import Backbone, encode_token_embeddings
from . import METHODS
from ._trainable import TrainedClassifier
from .prompts import check_prompt_backbone

__all__ = ["FineTuner", "LoRAFineTuner", "SVDFineTuner", "FullFineTuner"]

_ENCODE_BATCH = 64


def _materialise(base: Backbone, adapted: Backbone, name: str) -> Backbone:
    """A plain copy of ``base`` holding the weights that the parametrised ``adapted`` computes.

    Each parametrised weight (e.g. CLIP-SVD's ``U diag(s) Vᵀ``) is evaluated once and
    copied to the same place in a deep copy of ``base.model``; every other tensor of
    ``adapted`` is frozen and equal to ``base``'s.  The result has ``base``'s state-dict
    keys, so :func:`cliplab.surgery.interpolate` accepts it.
    """
    model = copy.deepcopy(base.model)
    with torch.no_grad():
        for name_, mod in adapted.model.named_modules():
            if parametrize.is_parametrized(mod):
                target = model.get_submodule(name_)
                for attr in mod.parametrizations:
                    getattr(target, attr).copy_(getattr(mod, attr))
    model.requires_grad_(True)
    return base.with_model(model, name=name)


class FineTuner(TrainedClassifier):
    """Base of the fine-tuners: fine-tune both towers of a Backbone on K-shot labelled images.

    Subclasses (:class:`LoRAFineTuner`, :class:`SVDFineTuner`, :class:`FullFineTuner`)
    say what trains by overriding :meth:`_build` and :meth:`adapted_backbone`, and set
    ``default_lr``.

    Parameters
    ----------
    backbone : Backbone
        fp32.  Left unchanged; a copy is adapted.
    classnames : list of str
        One name per class index of ``y``.
    template : str, default "a photo of a {}."
        Class prompt; its text features are recomputed by the adapted tower every step.
    epochs : int or None, default 10
        None: the CLIP-SVD reference budget of 200·K iterations.
    batch_size : int, default 32
    lr : float or None, default None
        None: the class's ``default_lr`` (lora 1e-4, svd 5e-4, full 1e-5).
    warmup_epochs : int, default 1
    optimizer : {"adamw", "sgd"}, default "adamw"
    weight_decay : float, default 0.01
    momentum : float, default 0.9
        SGD only.
    grad_clip : float or None, default 1.0
        Largest gradient norm; None: no clipping.
    random_state : int, default 0
        Seeds the adapters' initialisation and the mini-batch order.
    progress : bool, optional

    Attributes
    ----------
    text_features_ : ndarray (C, D)
        Unit-norm ``g(t_c)`` of the adapted text tower.
    logit_scale_ : float
        ``s`` of the adapted model.
    state_ : dict of str to ndarray
        The trained tensors only, by parameter name in the adapted model (LoRA
        ``lora_A``/``lora_B``; CLIP-SVD singular values ``...original``; every weight
        for "full").  With ``backbone`` they rebuild the adapted model.
    lr_ : float
        The learning rate used.
    n_trainable_ : int
    history_ : list of dict
        Mean loss per epoch.
    fit_time_, epoch_time_ : float
        Seconds.

    Examples
    --------
    >>> est = SVDFineTuner(backbone=bb, classnames=names).fit(images, labels)           # doctest: +SKIP
    >>> est.predict(test_images)                                                         # doctest: +SKIP
    >>> cliplab.surgery.interpolate(bb, est.adapted_backbone(), 0.5)                     # doctest: +SKIP
    """

    input_kind = "images"
    default_lr: float = 1e-4

    def __init__(self, backbone=None, classnames=None, *, template: str = "a photo of a {}.",
                 epochs: int | None = 10, batch_size: int = 32, lr: float | None = None, warmup_epochs: int = 1,
                 optimizer: str = "adamw", weight_decay: float = 0.01, momentum: float = 0.9,
                 grad_clip: float | None = 1.0, random_state: int = 0, progress: bool | None = None):
        self.backbone = backbone
        self.classnames = classnames
        self.template = template
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

    # --------------------------------------------------------------- inputs
    def _check_common(self):
        super()._check_common()
        if self.backbone.precision != "fp32":
            raise UsageError(f"fine-tuning needs fp32 weights; load the model with precision='fp32' "
                             f"(got {self.backbone.precision!r})")
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise UsageError(f"template needs exactly one '{{}}' for the class name; got {self.template!r}")

    def _default_lr(self) -> float:
        return self.default_lr

    def _as_input(self, X) -> np.ndarray:
        if self.backbone is None:
            raise UsageError(f"{type(self).__name__} needs its backbone; set est.backbone first")
        X = super()._as_input(X)
        S = self.backbone.image_size
        if X.shape[1:3] != (S, S):
            raise UsageError(f"{type(self).__name__} takes images at the model's size ({S}, {S}); "
                             f"got {X.shape[1:3]} (resize them first)")
        return X

    def _epochs(self, y: np.ndarray) -> int:
        """``epochs``, or with None the CLIP-SVD budget: 200·K iterations, K = smallest class."""
        if self.epochs is not None:
            return int(self.epochs)
        k = int(np.bincount(y)[np.unique(y)].min())
        return max(1, math.ceil(200 * k / math.ceil(len(y) / int(self.batch_size))))

    # ---------------------------------------------------------------- model
    def _build(self) -> Backbone:
        """A fresh adapted copy of ``backbone`` (identical outputs before training)."""
        raise NotImplementedError

    def _prompt_tokens(self, classnames) -> tuple[torch.Tensor, bool]:
        """Token ids (C, L) of the class prompts, cut after the last EOT when the tower allows."""
        tokens = self.backbone.tokenize([self.template.format(c) for c in classnames])  # (C, T)
        try:
            check_prompt_backbone(self.backbone)              # causal tower, EOT (argmax) pooling
        except UsageError:
            return tokens, False
        return tokens[:, :int(tokens.argmax(dim=-1).max()) + 1], True

    def _text(self, model, tokens: torch.Tensor, fast: bool) -> torch.Tensor:
        tokens = tokens.to(self.backbone.device)
        x = (encode_token_embeddings(model, model.token_embedding(tokens), tokens) if fast
             else model.encode_text(tokens))
        return F.normalize(x.float(), dim=-1)                                     # (C, D)

    def _model(self) -> Backbone:
        """The adapted Backbone; rebuilt from ``backbone`` and ``state_`` after a load."""
        if getattr(self, "_adapted", None) is None:
            check_is_fitted(self)
            if self.backbone is None:
                raise UsageError(f"a loaded {type(self).__name__} needs its backbone; set est.backbone first")
            adapted = self._build()
            params = dict(adapted.model.named_parameters())
            trained = {n for n, p in params.items() if p.requires_grad}
            if trained != set(self.state_):
                missing, extra = sorted(trained - set(self.state_)), sorted(set(self.state_) - trained)
                raise CheckpointMismatch(f"state_ does not fit {type(self).__name__} on this backbone: "
                                         f"{len(missing)} missing (e.g. {missing[:1]}), "
                                         f"{len(extra)} unexpected (e.g. {extra[:1]})")
            with torch.no_grad():
                for n in trained:
                    params[n].copy_(torch.from_numpy(np.asarray(self.state_[n])))
            self._adapted = adapted
        return self._adapted

    # ------------------------------------------------------------- training
    def _setup(self) -> list:
        self._adapted = self._build()
        self._adapted.model.train()            # CLIP has no dropout; train() for correctness
        self._tokens, self._fast_text = self._prompt_tokens(self.classnames)
        return [self._adapted.model]

    def _loss(self, xb: torch.Tensor, yb: torch.Tensor) -> dict:
        model, dev = self._adapted.model, self.backbone.device
        f = F.normalize(model.encode_image(xb.to(dev)), dim=-1)                   # (B, D) f(x)
        t = self._text(model, self._tokens, self._fast_text)                     # (C, D) g(t_c)
        logits = model.logit_scale.exp() * f @ t.T                               # (B, C) s·cos
        return {"ce": F.cross_entropy(logits, yb.to(dev))}                       # CLIP-SVD loss

    def _finish(self) -> None:
        model = self._adapted.model.eval()
        self.text_features_ = self._text(model, self._tokens, self._fast_text).cpu().numpy()
        self.logit_scale_ = float(self._adapted.logit_scale)
        self.state_ = {n: p.detach().cpu().numpy().copy()
                       for n, p in model.named_parameters() if p.requires_grad}

    def _relabel(self, classnames) -> None:
        tokens, fast = self._prompt_tokens(classnames)
        self.text_features_ = self._text(self._model().model.eval(), tokens, fast).cpu().numpy()

    # ------------------------------------------------------------ prediction
    def _image_features(self, X: np.ndarray) -> np.ndarray:
        """Unit-norm image features (N, D) of the adapted image tower."""
        model = self._model().model.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(X), _ENCODE_BATCH):
                xb = self._to_tensor(X[s:s + _ENCODE_BATCH]).to(self.backbone.device)  # (B, 3, H, W)
                out.append(F.normalize(model.encode_image(xb).float(), dim=-1).cpu())  # (B, D)
        return (torch.cat(out).numpy() if out
                else np.zeros((0, self.backbone.embed_dim), dtype=np.float32))

    @property
    def image_encoder(self) -> Backbone:
        """The adapted Backbone (parametrised as trained): its image features go to
        :meth:`logits_from_features` (what ``cliplab classify --adapter`` uses)."""
        return self._model()

    def adapted_backbone(self) -> Backbone:
        """The fine-tuned model as a new plain Backbone, with the original's state-dict keys.

        It can go to ``cliplab.surgery.interpolate(backbone, est.adapted_backbone(), alpha)``
        (WiSE-FT).
        """
        raise NotImplementedError


@METHODS.register("lora", kind="learner", help="LoRA on both towers (rank 4)")
class LoRAFineTuner(FineTuner):
    """LoRA (rank ``rank``, scale ``lora_alpha / rank``) on both towers, lr 1e-4.

    Parameters
    ----------
    rank : int, default 4
        LoRA rank r.
    lora_alpha : float, default 8
        LoRA scale numerator α; the update is ``(α/r) B A``.
    Others as :class:`FineTuner`.
    """

    default_lr = 1e-4

    def __init__(self, backbone=None, classnames=None, *, rank: int = 4, lora_alpha: float = 8,
                 template: str = "a photo of a {}.", epochs: int | None = 10, batch_size: int = 32,
                 lr: float | None = None, warmup_epochs: int = 1, optimizer: str = "adamw",
                 weight_decay: float = 0.01, momentum: float = 0.9, grad_clip: float | None = 1.0,
                 random_state: int = 0, progress: bool | None = None):
        super().__init__(backbone, classnames, template=template, epochs=epochs, batch_size=batch_size, lr=lr,
                         warmup_epochs=warmup_epochs, optimizer=optimizer, weight_decay=weight_decay,
                         momentum=momentum, grad_clip=grad_clip, random_state=random_state, progress=progress)
        self.rank = rank
        self.lora_alpha = lora_alpha

    def _build(self) -> Backbone:
        from ..surgery import apply_lora

        return apply_lora(self.backbone, rank=self.rank, alpha=self.lora_alpha)

    def adapted_backbone(self) -> Backbone:
        """The LoRA update merged (:func:`cliplab.surgery.merge_lora`, ``W + (α/r) B A`` folded in)."""
        from ..surgery import merge_lora

        return merge_lora(self._model())


@METHODS.register("svd", kind="learner", help="CLIP-SVD: only the singular values of the tower weights train")
class SVDFineTuner(FineTuner):
    """CLIP-SVD: every linear layer ``W = U diag(s) Vᵀ`` with only ``s`` trained, lr 5e-4."""

    default_lr = 5e-4

    def _build(self) -> Backbone:
        from ..surgery import apply_svd

        return apply_svd(self.backbone)

    def adapted_backbone(self) -> Backbone:
        """``U diag(s) Vᵀ`` evaluated into a copy of the original model (the parametrised
        model's keys — ``...original``, ``U``, ``Vh`` — would not match the zero-shot model's)."""
        return _materialise(self.backbone, self._model(), f"{self.backbone.name}+svd-merged")


@METHODS.register("full", kind="learner", help="every weight trains (the WiSE-FT endpoint)")
class FullFineTuner(FineTuner):
    """Every weight (and the temperature) trains, lr 1e-5 (FLYP / WiSE-FT's fine-tuned endpoint)."""

    default_lr = 1e-5

    def _build(self) -> Backbone:
        bb = self.backbone
        return bb.with_model(copy.deepcopy(bb.model).requires_grad_(True), name=f"{bb.name}+full")

    def adapted_backbone(self) -> Backbone:
        """A plain copy of the fine-tuned model."""
        adapted = self._model()
        return self.backbone.with_model(copy.deepcopy(adapted.model), name=adapted.name)
