"""The objective interface of the Trainer: what a loss receives and returns.

Each training step the Trainer builds a :class:`Batch` (this rank's share of
the global batch), asks the objective for the model outputs with
:meth:`Objective.forward_model`, and calls the objective with both::

    outputs = objective.forward_model(model, batch)   # ModelOutputs
    terms = objective(outputs, batch)                 # {"name": scalar tensor}
    loss = sum(terms.values())

Every term is logged as ``loss_<name>`` in ``metrics.csv``/``metrics.jsonl``
next to their sum ``loss``.

Temperature convention: ``ModelOutputs.logit_scale`` is the temperature
``t = exp(model.logit_scale)``, already exponentiated, as open_clip's
``CLIP.forward`` returns it; ``init_logit_scale`` of an objective is the
log-space value the model's parameter starts at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """One step's data on this rank (B = global batch / ranks).

    Attributes
    ----------
    images : torch.Tensor of shape (B, 3, H, W)
        Preprocessed images.
    tokens : torch.Tensor of shape (B, T) or None
        Token ids of the one caption sampled per image; None when the objective
        declares ``needs_captions = False``.
    caption_index : torch.Tensor of shape (B,) or None
        Which of its captions each image got (indexes per-caption teacher
        outputs); None without captions.
    step : int
        The optimizer step (from 0) this batch is for.
    total_steps : int or None
        Optimizer steps of the whole run (``TrainConfig.steps``), for objectives
        with a schedule; None outside the Trainer.
    extra_tokens : torch.Tensor of shape (B, K, T) or None
        Token ids of the K extra captions per image (long or short captions,
        hard negatives); set when the objective declares ``needs_extra_captions``.
    teacher : dict of str to torch.Tensor of shape (B, ...), or None
        Stored teacher outputs per image; set when the objective declares
        ``needs_teacher``.
    targets : dict of str to torch.Tensor of shape (B, ...), or None
        Per-image supervision of a non-caption objective (masks, boxes, labels);
        set when the objective declares ``needs_targets``.
    """

    images: torch.Tensor
    tokens: torch.Tensor | None = None
    caption_index: torch.Tensor | None = None
    step: int = 0
    total_steps: int | None = None
    extra_tokens: torch.Tensor | None = None
    teacher: dict[str, torch.Tensor] | None = None
    targets: dict[str, torch.Tensor] | None = None


@dataclass
class ModelOutputs:
    """What the model computed on a :class:`Batch`.

    Attributes
    ----------
    image_features, text_features : torch.Tensor of shape (B, D)
        L2-normalised; row i of both is a matching pair.
    logit_scale : torch.Tensor, scalar
        The temperature t, already exponentiated.
    logit_bias : torch.Tensor or None
        The bias b of sigmoid-style models.
    extra_text_features : torch.Tensor of shape (B, K, D) or None
        Features of ``Batch.extra_tokens`` (same text tower, L2-normalised).
    extras : dict of str to torch.Tensor
        Method-specific outputs of an overridden :meth:`Objective.forward_model`
        (a live teacher's features, an EMA tower's attention maps...).
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    extra_text_features: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_clip(cls, out) -> "ModelOutputs":
        """Read open_clip's ``CLIP.forward`` result (a tuple or, with ``output_dict``, a dict)."""
        if isinstance(out, dict):
            return cls(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
        return cls(out[0], out[1], out[2], out[3] if len(out) > 3 else None)


def gather_with_grad(tensors: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Concatenate each (B, ...) tensor over the ranks into (W*B, ...), keeping the gradient.

    With ``world_size == 1`` the tensors come back unchanged.  Under DDP every
    rank then computes the loss of the global batch, and the averaged gradients
    equal those of one process on it (open_clip's ``gather_with_grad=True``).
    """
    if world_size <= 1:
        return list(tensors)
    import torch.distributed.nn

    out = [torch.cat(torch.distributed.nn.all_gather(t.contiguous()), dim=0) for t in tensors]
    for t in out:  # the gather's backward (all-to-all under gloo) needs contiguous gradients; einsum's may not be
        if t.requires_grad:
            t.register_hook(lambda g: g.contiguous())
    return out


def held_fixed(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a constant whose parameter still gets a (zero) gradient.

    For a temperature a method keeps fixed (CLOOB): the model's ``logit_scale``
    then never moves under AdamW (zero gradient, no weight decay on it), and it
    stays a used parameter, which DDP requires of every trainable parameter.
    """
    return value.detach() + 0.0 * value


class Objective(torch.nn.Module):
    """Base class of the Trainer's objectives (losses).

    Subclass it, set the class attributes, implement :meth:`forward`, and
    register the class with :func:`~cliplab.train.losses.register_loss`.

    The same interface trains modules that are not CLIP models: a dense head
    over a frozen Backbone, learnable prompts, a region prompter.  Such an
    objective declares ``needs_captions = False`` (and ``needs_targets`` where
    it is supervised by per-image arrays), overrides :meth:`forward_model` to
    run its module, and is handed to the Trainer as an instance
    (``Trainer(head, None, None, train_set, config, objective=obj)``) rather
    than registered under a name for ``cliplab train --loss``.

    Parameters
    ----------
    rank : int, default 0
    world_size : int, default 1
        The data-parallel position; an objective that compares samples across
        the batch gathers them from all ranks itself (see :mod:`.infonce`).

    Attributes
    ----------
    name : str
        Set by :func:`~cliplab.train.losses.register_loss`.
    init_logit_scale : float or None
        Log-space temperature the model starts at; None keeps the model's own.
    init_logit_bias : float or None
        Initial ``logit_bias``; None means the model must have no bias.
    needs_teacher : bool
        The batch must carry teacher outputs (``Batch.teacher``); training
        items then are ``(image, captions, {"teacher": {name: array}})``.
    needs_extra_captions : bool
        The batch must carry K extra captions per image (``Batch.extra_tokens``
        and ``ModelOutputs.extra_text_features``); training items then are
        ``(image, captions, {"extra_captions": [K strings]})``.
    needs_captions : bool
        The batch carries one tokenised caption per image (``Batch.tokens``).
        With False, items' captions are ignored (they may be empty or None)
        and the Trainer needs no tokenizer.
    needs_targets : bool
        The batch must carry per-image arrays (``Batch.targets``); training
        items then are ``(image, captions, {"targets": {name: array}})``, every
        item's array of a name having the same shape.
    """

    name: str = ""
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    needs_teacher: bool = False
    needs_extra_captions: bool = False
    needs_captions: bool = True
    needs_targets: bool = False
    frozen_modules: tuple[str, ...] = ()
    """Attribute names of submodules the objective holds fixed for the whole run (a frozen
    teacher): left out of :meth:`trainer_state`, so checkpoints do not copy them."""

    def __init__(self, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward_model(self, model: torch.nn.Module, batch: Batch):
        """Run the model on ``batch``; override where a method changes the forward pass.

        The Trainer calls this inside the data-parallel wrapper's forward, so
        an override may call any method of ``model`` (masked views, a second
        text pass, a frozen teacher held by the objective) and gradients are
        still averaged across ranks.

        Parameters
        ----------
        model : open_clip.CLIP
            The plain model (not the DDP wrapper).
        batch : Batch

        Returns
        -------
        ModelOutputs
            For image-text models; an objective training another module may
            return whatever its :meth:`forward` reads.
        """
        out = ModelOutputs.from_clip(model(batch.images, batch.tokens))
        if batch.extra_tokens is not None:
            b, k, t = batch.extra_tokens.shape
            extra = ModelOutputs.from_clip(model(None, batch.extra_tokens.reshape(b * k, t)))
            out.extra_text_features = extra.text_features.reshape(b, k, -1)  # (B, K, D)
        return out

    def setup(self, model: torch.nn.Module, config=None) -> None:
        """Build the objective's own state for ``model``; the Trainer calls it once per ``fit``.

        Called after the model is on the run's device and before the optimizer is built
        (and before a checkpoint is loaded): an EMA teacher copied from the model (A-CLIP),
        heads sized to its widths (LightCLIP's fusion head, A-CLIP's projectors), anything
        that depends on ``config.steps``.  The objective's ``state_dict`` (its own
        parameters and buffers) is saved in every checkpoint's ``trainer_state.pt`` and
        restored on resume; its parameters that require a gradient are trained with the
        model's (the Trainer's decay rule, unless :meth:`parameter_groups` already lists
        them) and, under DDP, averaged across ranks.  They are not part of the saved
        model.  The default does nothing.

        Parameters
        ----------
        model : torch.nn.Module
            The plain model.
        config : TrainConfig, optional
            The run's config (the Trainer always passes it).
        """

    def trainer_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the objective: its ``state_dict`` without :attr:`frozen_modules`.

        An EMA teacher (A-CLIP) changes during the run and is kept; a frozen teacher
        (DCLIP, ProCLIP) is rebuilt by the run and is not.
        """
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes)}

    def load_trainer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`trainer_state` saved.

        Raises
        ------
        RuntimeError
            ``state`` does not fit this objective (missing or unexpected entries, other shapes).
        """
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:3]}, unexpected {list(unexpected)[:3]}")

    def parameter_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict] | None:
        """AdamW parameter groups for ``model``; None (the default) uses the Trainer's rule.

        The Trainer's rule (:func:`cliplab.train.trainer.parameter_groups`) decays weight
        matrices only; an objective whose trainable parameters are scalars or vectors that
        its method does decay (ProAct's clipping thresholds) returns its own groups here.
        """
        return None

    def forward(self, outputs: ModelOutputs, batch: Batch | None = None) -> dict[str, torch.Tensor]:
        """Named scalar loss terms; the Trainer minimises their sum.

        Parameters
        ----------
        outputs : ModelOutputs
        batch : Batch or None
            None where an objective reads only ``outputs`` (as in unit tests).

        Returns
        -------
        dict of str to torch.Tensor
            Each value a scalar; the keys name the metric columns ``loss_<key>``.
        """
        raise NotImplementedError
