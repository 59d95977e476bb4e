"""Long-CLIP fine-tuning: stretch a Backbone's text positions, then train on long and short captions.

Long-CLIP: Unlocking the Long-Text Capability of CLIP (Zhang et al., ECCV 2024,
arXiv:2403.15378).  :func:`finetune_longclip` runs the paper's recipe with cliplab's
pieces: :func:`cliplab.surgery.stretch_positions` (keep 20 positions, interpolate the
rest 4x), then the one :class:`~cliplab.train.Trainer` with the Long-CLIP objective
(:class:`LongCLIPLoss`, below) on :class:`LongCaptionSet` items, every parameter trained
but the kept positional rows.

Defaults: the reference's objective (32 components, label smoothing 0.1, weights 1 and 1),
AdamW weight decay 1e-2 and warm-up then cosine; the reference's learning rate 1e-6 at
batch 2048 is for a web-scale ViT-L; shapes-tiny on ShapesWorld keeps its zero-shot
accuracy at 1e-5 and loses it at 1e-4 (the default is 1e-5; see docs/distill_grow.md).

The objective
-------------
With L2-normalised image features x_i (B x D), features l_i of image i's long caption,
s_i of its short caption (``ModelOutputs.extra_text_features[:, 0]``), the temperature
t, and CE_ls the cross-entropy with label smoothing 0.1:

    (PCM) X^ = PCA_k(X): centre X on its batch mean m, take the top-k right singular
          vectors V_k of X - m, X^ = (X - m) V_k V_k^T + m  (no re-normalisation)
    (L)   L_long  = [CE_ls(t X L^T, I) + CE_ls(t L X^T, I)] / 2
    (S)   L_short = [CE_ls(t X^ S^T, I) + CE_ls(t S X^T^, I)] / 2
    (T)   L = L_long + L_short

Defaults are the reference's: k = 32, label smoothing 0.1, both terms weight 1.  The
short caption is the caption the data gives as the item's one extra caption (the
reference uses the long caption's first sentence; ShapesWorld has a written summary,
:attr:`cliplab.data.shapes.Scene.short_caption`).  During training the first ``keep``
rows of the stretched positional table get no gradient (:meth:`LongCLIPLoss.forward_model`),
as the reference's frozen ``positional_embedding`` for rows < 20 beside its trainable
``positional_embedding_res`` for the rest.

Deviations:

- under DDP the features are gathered with gradient and every rank computes the
  loss of the global batch (open_clip's ``ClipLoss`` convention); the reference
  computes per-rank rows against gathered columns.  The PCA runs on each rank's own
  batch, as the reference's;
- the Trainer's AdamW exempts embeddings, gains, biases and the temperature from weight
  decay (the reference decays every parameter), and the temperature starts at the
  model's own value (the reference resets it to ln 100, which OpenAI CLIP already has).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..errors import UsageError
from ..validation import check_backbone, check_positive_int
from ..train.losses.base import Batch, ModelOutputs, Objective, gather_with_grad
from ..train.losses.infonce import symmetric_cross_entropy
from ..train.trainer import Trainer, TrainConfig
from ..train.datasets import SceneItems

logger = logging.getLogger(__name__)

__all__ = ["LongCLIPLoss", "LongCaptionSet", "finetune_longclip", "longclip_world", "primary_components",
           "smoothed_clip_loss"]

PCA_DIM = 32
"""Components kept by primary component matching (the reference's ``PCA(..., 32)``)."""

LABEL_SMOOTHING = 0.1
"""The reference's label smoothing of both cross-entropies."""


def primary_components(features: torch.Tensor, k: int = PCA_DIM) -> torch.Tensor:
    """Eq. (PCM): ``features`` projected on their top-``k`` principal directions, mean added back.

    Parameters
    ----------
    features : torch.Tensor of shape (N, D)
    k : int, default 32
        Components kept; k >= min(N, D) returns ``features`` (up to rounding).

    Returns
    -------
    torch.Tensor of shape (N, D), float32
        Not re-normalised (the reference's).
    """
    mean = features.mean(dim=0, keepdim=True)                     # (1, D)
    centred = (features - mean).float()                           # (N, D)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)     # (min(N, D), D)
    v = vt.T[:, :k]                                               # (D, k)
    return (centred @ v) @ v.T + mean                             # eq. (PCM)


def smoothed_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                       logit_scale: torch.Tensor | float, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """Symmetric InfoNCE of paired (N, D) features with label smoothing (eqs. L and S).

    Returns
    -------
    torch.Tensor
        A scalar, ``[CE_ls(t X Y^T, I) + CE_ls(t Y X^T, I)] / 2``.
    """
    return symmetric_cross_entropy(logit_scale * image_features @ text_features.T, label_smoothing)  # (N, N)


class LongCLIPLoss(Objective):
    """Long-CLIP's fine-tuning objective (eq. T), for a model stretched by
    :func:`cliplab.surgery.stretch_positions`.

    Training items are ``(image, [long caption], {"extra_captions": [short caption]})``
    (:class:`LongCaptionSet` on ShapesWorld).  Not registered for ``cliplab train --loss``:
    the registered recipes give no short captions; :func:`finetune_longclip` trains with it.

    Parameters
    ----------
    rank, world_size : int
    pca_dim : int or None, default 32
        k of eq. (PCM); None matches short captions with the full image features (the
        paper's "w/o PCM" ablation).
    short_weight : float, default 1.0
        Weight of eq. (S); 0 trains on the long captions only.
    keep : int, default 20
        Leading rows of the positional table that get no gradient; 0 trains them all.
    label_smoothing : float, default 0.1

    Attributes
    ----------
    init_logit_scale : float
        log 100 (the reference's ``--log_scale``); used only for a freshly built model.
    """

    init_logit_scale = math.log(100)
    init_logit_bias = None
    needs_extra_captions = True

    def __init__(self, *, rank: int = 0, world_size: int = 1, pca_dim: int | None = PCA_DIM,
                 short_weight: float = 1.0, keep: int = 20, label_smoothing: float = LABEL_SMOOTHING):
        super().__init__(rank=rank, world_size=world_size)
        if pca_dim is not None and pca_dim < 1:
            raise ValueError(f"pca_dim must be >= 1 or None, got {pca_dim}")
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.pca_dim, self.short_weight, self.keep = pca_dim, float(short_weight), int(keep)
        self.label_smoothing = float(label_smoothing)

    def forward_model(self, model, batch: Batch) -> ModelOutputs:
        """The model's outputs with the first ``keep`` positional rows held fixed.

        ``P + (P.detach() - P) * kept`` equals ``P`` exactly in value (the added term
        is 0), so the forward pass is open_clip's bit for bit, while the gradient of
        the kept rows cancels to 0: they stay as they are under AdamW (the Trainer does
        not decay embeddings).
        """
        pos = model.positional_embedding
        if not self.keep or not isinstance(pos, torch.nn.Parameter) or not pos.requires_grad:
            return super().forward_model(model, batch)
        kept = (torch.arange(pos.shape[0], device=pos.device) < self.keep).unsqueeze(1).to(pos.dtype)  # (L, 1)
        held = pos + (pos.detach() - pos) * kept                   # (L, W), rows < keep constant
        model._parameters["positional_embedding"] = held          # in place of the Parameter, order kept
        try:
            return super().forward_model(model, batch)
        finally:
            model._parameters["positional_embedding"] = pos

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict:
        """Return ``{"long": eq. (L), "short": short_weight * eq. (S)}`` on the global batch."""
        if outputs.logit_bias is not None:
            raise ValueError("the longclip loss takes no logit_bias; build the model without one")
        if outputs.extra_text_features is None:
            raise ValueError("the longclip loss needs the short captions (one extra caption per item)")
        x = outputs.image_features                                                         # (B, D)
        short_image = x if self.pca_dim is None else primary_components(x, self.pca_dim)   # (B, D) eq. (PCM)
        short_text = outputs.extra_text_features[:, 0]                                     # (B, D)
        x, long_text, short_image, short_text = gather_with_grad(
            [x, outputs.text_features, short_image, short_text], self.world_size)
        t = outputs.logit_scale
        terms = {"long": smoothed_clip_loss(x, long_text, t, self.label_smoothing)}        # eq. (L)
        if self.short_weight:
            terms["short"] = self.short_weight * smoothed_clip_loss(short_image, short_text, t,
                                                                     self.label_smoothing)  # eq. (S)
        return terms


def longclip_world(seed: int = 2, n_objects: tuple[int, int] = (1, 3)):
    """The ShapesWorld of Long-CLIP fine-tuning on shapes-tiny: 64 px scenes of 1-3 objects.

    Seed 2 is a world shapes-tiny never trained on (its recipe used seeds 0 and 1).  Its
    long captions run 28-30 tokens with one object, 64-77 with two, 88-109 with three.
    """
    from ..data.shapes import shapes_tiny_world

    return shapes_tiny_world(seed, n_objects=n_objects)


class LongCaptionSet(SceneItems):
    """A ShapesWorld split as Long-CLIP training items.

    Items are ``(image, [long caption], {"extra_captions": [short caption]})``: the scene's
    :attr:`~cliplab.data.shapes.Scene.long_caption` as the one caption and its
    :attr:`~cliplab.data.shapes.Scene.short_caption` as the extra caption that the
    ``longclip`` objective matches with the primary components of the image features.

    Parameters
    ----------
    world : ShapesWorld
    split : str, default "train"
    n : int, optional
        Use the first ``n`` scenes of the split (default: all of them).
    """

    def items(self, scenes):
        return [[s.long_caption] for s in scenes], [{"extra_captions": [s.short_caption]} for s in scenes]


def finetune_longclip(backbone, steps: int, out: str | Path, *, new_context: int | None = None, keep: int = 20,
                      pca_dim: int | None = 32, short_weight: float = 1.0, train_set=None, world=None,
                      batch_size: int = 64, lr: float = 1e-5, warmup_steps: int | None = None,
                      weight_decay: float = 1e-2, seed: int = 0, log_every: int = 10, evaluate=None,
                      progress: bool | None = None):
    """Long-CLIP: stretch ``backbone``'s text positions and fine-tune it on long and short captions.

    Parameters
    ----------
    backbone : Backbone
        The model to start from (unchanged; the result is a new Backbone).
    steps : int
    out : str or path
        Run folder: the Trainer's ``metrics.jsonl``/``csv`` and last checkpoint, and the
        fine-tuned model in ``out/model`` (an open_clip folder; ``cliplab.load(out/model)``).
    new_context, keep
        See :func:`cliplab.surgery.stretch_positions` (default: ``keep + 4 (L - keep)``).
    pca_dim, short_weight
        See :class:`LongCLIPLoss` (None: no primary component
        matching; 0: long captions only).
    train_set : dataset, optional
        Items ``(image, [long caption], {"extra_captions": [short caption]})``; default
        :class:`LongCaptionSet` of ``world``'s train split.
    world : ShapesWorld, optional
        Default :func:`longclip_world`.
    batch_size, lr, weight_decay, seed, log_every
        :class:`~cliplab.train.TrainConfig` fields.
    warmup_steps : int, optional
        Default: a tenth of ``steps``.
    evaluate : callable, optional
        ``evaluate(model) -> dict``, run at the end (the Trainer's callback).

    Returns
    -------
    Backbone
        The fine-tuned model, in eval mode, with the stretched context.

    Raises
    ------
    UsageError
        Bad ``steps``/``batch_size``, or a text tower that cannot be stretched.
    """
    from .long_positions import stretch_positions

    check_backbone("backbone", backbone)
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if short_weight < 0:
        raise UsageError(f"short_weight must be >= 0, got {short_weight}")
    long = stretch_positions(backbone, new_context, keep=keep)
    model = long.model
    for p in model.parameters():                           # a fresh copy: everything trains
        p.requires_grad_(True)
    if train_set is None:
        train_set = LongCaptionSet(world if world is not None else longclip_world())
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         warmup_steps=max(steps // 10, 1) if warmup_steps is None else warmup_steps,
                         seed=seed, out_dir=str(out), ckpt_every=0, log_every=log_every,
                         device=str(backbone.device))
    objective = LongCLIPLoss(pca_dim=pca_dim, short_weight=short_weight, keep=keep)
    Trainer(model, long.tokenize, long.preprocess, train_set, config, evaluate, model_cfg=long.model_cfg,
            progress=progress, objective=objective, preprocess_cfg=long.preprocess_cfg).fit()
    model.eval()
    tuned = long.with_model(model, name=f"{backbone.name}+longclip")
    tuned.save(Path(out) / "model")
    logger.info("Long-CLIP model written to %s", Path(out) / "model")
    return tuned
