"""What the few-shot methods that train by gradient descent share: one supervised loop.

Prompt learners (CoOp, KgCoOp, MoCoOp) and the fine-tuners (LoRA, CLIP-SVD, full) are
scikit-learn classifiers over the Backbone.  ``fit(X, y)`` takes image features (N, D)
(prompt learners: the image tower is frozen, so its features are computed once) or
images (N, H, W, 3) uint8 at the model's size (fine-tuners); ``y`` holds indices into
``classnames``.  Every class of ``classnames`` can be predicted, also those without
training examples (base-to-novel: see :meth:`TrainedClassifier.with_classnames`).

The loop (:func:`supervised_loop`, also Tip-Adapter-F's): ``epochs`` passes over the
K-shot set in a seeded random order, mini-batches of ``batch_size``, the method's loss
terms summed, backward, optional gradient clipping, an optimizer step and a scheduler
step.  The learners use SGD or AdamW (constructor parameters ``optimizer``,
``weight_decay``, ``momentum``, ``grad_clip``; each class sets the defaults of its
reference).  Learning rate: by default
:func:`cliplab.train.schedule.warmup_cosine_factor` per step (linear warm-up over
``warmup_epochs``); a class with ``lr_schedule = "epoch"`` follows Dassl's scheduler, which
the CoOp-family references train with: the rate changes once per epoch, is held at
``warmup_lr`` for ``warmup_epochs``, then follows ``lr · (1 + cos(π (e − w) / E)) / 2`` for
epoch e of E (:meth:`TrainedClassifier._lr_factor`).  It is not the contrastive
:class:`cliplab.train.Trainer`: few-shot training is supervised by class labels rather
than captions, its data fits in memory, and it needs no checkpoints or ranks.

Deviation shared by all: no image augmentation (the reference repos use random resized
crops and flips).
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .._progress import progress_bar
from ..errors import UsageError
from ..train.freezing import frozen
from ..validation import check_choice, check_number, check_positive_int
from ..zeroshot.classifier import check_classnames, softmax

__all__ = ["TrainedClassifier", "count_trainable", "frozen", "supervised_loop"]


def count_trainable(*modules) -> int:
    """Number of trainable scalars in ``modules`` (each parameter counted once)."""
    seen = {id(p): p for m in modules if m is not None for p in m.parameters() if p.requires_grad}
    return int(sum(p.numel() for p in seen.values()))


def supervised_loop(params, batch_loss, n: int, *, epochs: int, batch_size: int, optimizer, scheduler,
                    generator, grad_clip: float | None = None, on_epoch_end=None, progress: bool | None = False,
                    desc: str = "train") -> list[dict]:
    """The one supervised mini-batch loop of the few-shot learners and Tip-Adapter-F.

    Parameters
    ----------
    params : list of Tensor
        The trained tensors (for gradient clipping); ``optimizer`` holds them.
    batch_loss : callable
        ``batch_loss(idx) -> dict[str, Tensor]``: the loss terms of the examples ``idx``
        (a LongTensor (B,) of indices into the training set); their sum is minimised.
    n : int
        Training-set size.
    epochs, batch_size : int
        Each epoch visits the ``n`` examples once in the order ``torch.randperm(n,
        generator=generator)``, in ``ceil(n / batch_size)`` mini-batches.
    optimizer : torch.optim.Optimizer
    scheduler : torch.optim.lr_scheduler.LRScheduler
        Stepped after every optimizer step.
    generator : torch.Generator
        Seeded by the caller (``random_state``).
    grad_clip : float or None
        Clip the gradient norm of ``params`` to this before each step.
    on_epoch_end : callable, optional
        ``on_epoch_end(epoch)`` after each epoch (1-based), e.g. to score a validation split.
    progress : bool or None
        A progress bar over the steps.

    Returns
    -------
    list of dict
        ``{"epoch", "loss", **terms}`` per epoch: the example-weighted mean of each term.
    """
    B = int(batch_size)
    history = []
    bar = progress_bar(total=-(-n // B) * int(epochs), progress=progress, desc=desc, unit="step")
    with bar:
        for epoch in range(int(epochs)):
            sums: dict[str, float] = {}
            order = torch.randperm(n, generator=generator)
            for s in range(0, n, B):
                bi = order[s:s + B]
                terms = batch_loss(bi)
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                scheduler.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(bi) / n
                bar.update(1)
            history.append({"epoch": epoch + 1, "loss": sum(sums.values()), **sums})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    return history


class TrainedClassifier(ClassifierMixin, BaseEstimator):
    """Base class: input checks, the training loop, prediction.

    Subclasses set ``input_kind`` ("features" or "images") and implement
    ``_setup()`` (build the trainable modules, return them as a list),
    ``_loss(xb, yb) -> dict[str, Tensor]`` (loss terms of a mini-batch, ``xb`` a float
    tensor, ``yb`` class indices) and ``_finish()`` (after training: store what
    prediction needs as fitted attributes) and ``_logits(X) -> ndarray (N, C)``.
    Constructor parameters every subclass takes: ``backbone``, ``classnames``,
    ``epochs``, ``batch_size``, ``lr``, ``warmup_epochs``, ``optimizer`` ("sgd" or
    "adamw"), ``weight_decay``, ``momentum`` (SGD only), ``grad_clip`` (None: no
    clipping), ``random_state``, ``progress``.

    ``clone`` deep-copies every parameter, ``backbone`` included (as scikit-learn's
    ``clone`` does for any non-estimator parameter).

    Prediction protocol (:func:`cliplab.zeroshot.classify_images`): ``image_encoder`` is
    the Backbone whose image features :meth:`predict_proba_features` takes.
    """

    input_kind = "features"
    lr_schedule = "step"            # "epoch": Dassl's per-epoch cosine with a constant warm-up
    warmup_lr = 1e-5                # the constant warm-up rate of lr_schedule = "epoch"

    # --------------------------------------------------------------- inputs
    def _check_common(self):
        if self.backbone is None:
            raise UsageError(f"{type(self).__name__} needs backbone= (the model whose towers it adapts)")
        if not self.classnames:
            raise UsageError(f"{type(self).__name__} needs classnames= (one name per class index)")
        check_classnames(self.backbone, self.classnames, ["{c}."])  # names the prompts cannot tell apart
        check_positive_int("epochs", self.epochs, allow_none=True)
        check_positive_int("batch_size", self.batch_size)
        lr = self._default_lr() if self.lr is None else self.lr
        self.lr_ = check_number("lr", lr, minimum=0, strict_minimum=True)

    def _default_lr(self) -> float | None:
        """The learning rate ``lr=None`` stands for (None: lr is required)."""
        return None

    def _as_input(self, X) -> np.ndarray:
        X = np.asarray(X)
        if self.input_kind == "features":
            if X.ndim != 2 or X.shape[1] != self.backbone_dim_:
                raise UsageError(f"{type(self).__name__} takes image features (N, {self.backbone_dim_}); "
                                 f"got {X.shape}")
            return X.astype(np.float32, copy=False)
        if X.ndim != 4 or X.shape[-1] != 3 or X.dtype != np.uint8:
            raise UsageError(f"{type(self).__name__} takes uint8 images (N, H, W, 3) at the model's size; "
                             f"got {X.shape} {X.dtype}")
        return X

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:
        if self.input_kind == "features":
            return torch.from_numpy(np.ascontiguousarray(X))
        from ..models.transforms import images_to_tensor

        return images_to_tensor(list(X), self.backbone.preprocess, self.backbone.preprocess_cfg)

    def _check_labels(self, y, n) -> np.ndarray:
        y = np.asarray(y)
        if len(y) != n:
            raise UsageError(f"X has {n} rows but y has {len(y)} labels")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= len(self.classnames))):
            raise UsageError(f"y must hold class indices 0..{len(self.classnames) - 1} into classnames")
        return y.astype(np.int64)

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, X_val=None, y_val=None):
        """Train on ``X`` (features or images, see the module notes) and labels ``y``.

        ``X_val``, ``y_val`` (optional) are only scored after training
        (``val_accuracy_``); nothing is selected on them.
        """
        self._check_common()
        self.backbone_dim_ = int(self.backbone.embed_dim)
        X = self._as_input(X)
        y = self._check_labels(y, len(X))
        if len(X) == 0:
            raise UsageError("no training examples")
        self.classes_ = np.arange(len(self.classnames))
        self.classnames_ = [str(c) for c in self.classnames]
        self.n_features_in_ = X.shape[1] if self.input_kind == "features" else int(np.prod(X.shape[1:]))
        self.epochs_ = self._epochs(y)
        torch.manual_seed(self.random_state)
        modules = self._setup()
        self.n_trainable_ = count_trainable(*modules)
        tic = time.perf_counter()
        with frozen(self.backbone.model):
            self.history_ = self._train(modules, X, y)
        self.fit_time_ = time.perf_counter() - tic
        self.epoch_time_ = self.fit_time_ / self.epochs_
        with torch.no_grad():
            self._finish()
        if X_val is not None and y_val is not None:
            self.val_accuracy_ = float(np.mean(self.predict(X_val) == np.asarray(y_val)))
        return self

    def _epochs(self, y: np.ndarray) -> int:
        """``epochs``, or with ``epochs=None`` CoOp's schedule by shots K (the smallest class):
        50 for K = 1, 100 for K <= 4, 200 above."""
        if self.epochs is not None:
            return int(self.epochs)
        k = int(np.bincount(y)[np.unique(y)].min())
        return 50 if k <= 1 else 100 if k <= 4 else 200

    def _optimizer(self, params):
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr_, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr_, weight_decay=self.weight_decay)

    def _lr_factor(self, step: int, per_epoch: int) -> float:
        """Multiplier of ``lr_`` for optimizer step ``step`` (0-based), ``per_epoch`` steps an epoch."""
        from ..train.schedule import warmup_cosine_factor

        warm = int(self.warmup_epochs)
        if self.lr_schedule == "epoch":          # Dassl: ConstantWarmupScheduler + CosineAnnealingLR
            epoch = step // per_epoch
            if epoch < warm:
                return self.warmup_lr / self.lr_
            return 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / self.epochs_))
        return warmup_cosine_factor(step, warmup_steps=per_epoch * warm, total_steps=per_epoch * self.epochs_)

    def _train(self, modules, X: np.ndarray, y: np.ndarray) -> list[dict]:
        params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
        if not params:
            raise UsageError(f"{type(self).__name__}: nothing to train")
        opt = self._optimizer(params)
        per_epoch = -(-len(X) // int(self.batch_size))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: self._lr_factor(t, per_epoch))
        yt = torch.from_numpy(y)
        return supervised_loop(params, lambda bi: self._loss(self._to_tensor(X[bi.numpy()]), yt[bi]), len(X),
                               epochs=self.epochs_, batch_size=self.batch_size, optimizer=opt, scheduler=sched,
                               generator=torch.Generator().manual_seed(int(self.random_state)),
                               grad_clip=self.grad_clip, progress=self.progress, desc=type(self).__name__)

    # -------------------------------------------------------------- predict
    def with_classnames(self, classnames):
        """A copy of the fitted classifier over other classes, keeping what was learned.

        Base-to-novel generalisation: train on base classes, then score classes never seen
        in training.  Needs ``backbone`` (a loaded classifier gets it from
        :func:`cliplab.adapt.fewshot.load_fitted`).
        """
        check_is_fitted(self)
        if self.backbone is None:
            raise UsageError("with_classnames needs the backbone; set est.backbone first")
        classnames = [str(c) for c in classnames]
        if not classnames:
            raise UsageError("with_classnames needs at least one class name")
        check_classnames(self.backbone, classnames, ["{c}."])
        new = copy.copy(self)
        new.classnames, new.classnames_ = list(classnames), list(classnames)
        new.classes_ = np.arange(len(classnames))
        with torch.no_grad():
            new._relabel(classnames)
        return new

    def _image_features(self, X: np.ndarray) -> np.ndarray:
        """L2-normalised image features (N, D) of the input rows."""
        x = X.astype(np.float32, copy=False)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def logits_from_features(self, F: np.ndarray) -> np.ndarray:
        """``logit_scale · f · t_cᵀ`` (N, C) from image features ``F`` (N, D) of :attr:`image_encoder`."""
        check_is_fitted(self)
        F = np.asarray(F, dtype=np.float32)
        F = F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)
        return self.logit_scale_ * (F @ self.text_features_.T)

    @property
    def image_encoder(self):
        """The Backbone whose image features :meth:`logits_from_features` takes (the frozen one)."""
        return self.backbone

    def predict_proba_features(self, F: np.ndarray) -> np.ndarray:
        """Softmax (N, C) of :meth:`logits_from_features` (the prediction protocol)."""
        return softmax(self.logits_from_features(F))

    def _logits(self, X: np.ndarray) -> np.ndarray:
        return self.logits_from_features(self._image_features(X))

    def _check_X(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self._as_input(X)

    def decision_function(self, X) -> np.ndarray:
        """Logits (N, C) over ``classnames``."""
        return self._logits(self._check_X(X))

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the logits (N, C)."""
        return softmax(self.decision_function(X))

    def predict(self, X) -> np.ndarray:
        """Class index of each row (N,)."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        tags.non_deterministic = False
        return tags
