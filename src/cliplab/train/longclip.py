"""Long-CLIP fine-tuning: stretch a Backbone's text positions, then train on long and short captions.

Long-CLIP: Unlocking the Long-Text Capability of CLIP (Zhang et al., ECCV 2024,
arXiv:2403.15378).  :func:`finetune_longclip` runs the paper's recipe with cliplab's
pieces: :func:`cliplab.surgery.stretch_positions` (keep 20 positions, interpolate the
rest 4x), then the one :class:`~cliplab.train.Trainer` with the ``longclip`` objective
(:mod:`cliplab.train.losses.longclip`) on :class:`LongCaptionSet` items, every parameter
trained but the kept positional rows.

Defaults: the reference's objective (32 components, label smoothing 0.1, weights 1 and 1),
AdamW weight decay 1e-2 and warm-up then cosine; the reference's learning rate 1e-6 at
batch 2048 is for a web-scale ViT-L, and a small model fine-tuned from scratch weights on
ShapesWorld takes a larger one (default 1e-4; see docs/distill_grow.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import UsageError
from ..validation import check_backbone, check_positive_int
from .trainer import Trainer, TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["LongCaptionSet", "finetune_longclip", "longclip_world"]


def longclip_world(seed: int = 2, n_objects: tuple[int, int] = (1, 3)):
    """The ShapesWorld of Long-CLIP fine-tuning on shapes-tiny: 64 px scenes of 1-3 objects.

    Seed 2 is a world shapes-tiny never trained on (its recipe used seeds 0 and 1).  Its
    long captions run 28-30 tokens with one object, 64-77 with two, 88-109 with three.
    """
    from ..data.shapes import shapes_tiny_world

    return shapes_tiny_world(seed, n_objects=n_objects)


class LongCaptionSet:
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

    def __init__(self, world, split: str = "train", n: int | None = None):
        self.world, self.split = world, split
        total = len(world.split(split))
        self.n = total if n is None else min(int(n), total)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        scene = self.world.scene(self.split, int(index))
        return scene.image, [scene.long_caption], {"extra_captions": [scene.short_caption]}

    def get_batch(self, indices):
        """``(uint8 images (N, H, W, 3), [[long caption]], [{"extra_captions": [short]}])`` in one render call."""
        images, scenes = self.world.render_batch(self.split, [int(i) for i in indices])
        return (images, [[s.long_caption] for s in scenes],
                [{"extra_captions": [s.short_caption]} for s in scenes])


def finetune_longclip(backbone, steps: int, out: str | Path, *, new_context: int | None = None, keep: int = 20,
                      pca_dim: int | None = 32, short_weight: float = 1.0, train_set=None, world=None,
                      batch_size: int = 64, lr: float = 1e-4, warmup_steps: int | None = None,
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
        See :class:`cliplab.train.losses.longclip.LongCLIPLoss` (None: no primary component
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
    from ..surgery.long_positions import stretch_positions
    from .losses.longclip import LongCLIPLoss

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
