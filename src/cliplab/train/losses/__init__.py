"""Registry of the Trainer's objectives (losses).

An objective is a subclass of :class:`Objective` (a ``torch.nn.Module``) around
pure functions of (N, D) features.  Its ``forward(outputs, batch)`` receives
the model outputs (:class:`ModelOutputs`: image and text features, logit
scale and bias, features of extra captions) and the batch (:class:`Batch`:
images, token ids, extra captions, teacher outputs) and returns a dict of
named scalar terms; the Trainer sums them and logs each one.  An objective
declares how the model's temperature should start (``init_logit_scale``,
``init_logit_bias``; ``None`` keeps the model's own), what the batch must carry
(``needs_teacher``, ``needs_extra_captions``) and, where a method changes the
forward pass, overrides ``forward_model``.  It is built with the distributed
``rank`` and ``world_size`` so it can gather features across ranks.

Add an objective by writing one module in this folder, and its test; no other
file changes (the registry imports every module here on its first lookup)::

    import torch
    from . import Objective, register_loss

    @register_loss("my-loss", help="pull matching pairs together")
    class MyLoss(Objective):
        def forward(self, outputs, batch=None):
            sim = (outputs.image_features * outputs.text_features).sum(1)   # (B,)
            return {"align": (1 - sim).mean()}

It is then ``cliplab train --loss my-loss`` and ``TrainConfig(loss="my-loss")``.
"""

from __future__ import annotations

from ...lazy import lazy_exports
from ...registry import Registry

LOSSES: Registry = Registry("loss", package=__name__)
"""The Trainer's objectives, by name; each entry's metadata has a one-line ``help``.

Looking a name up imports every module of this package, which registers its objectives.
"""

__getattr__, __dir__, _lazy = lazy_exports(__name__, {".base": ["Batch", "ModelOutputs", "Objective"]})


def register_loss(name: str, **meta):
    """Class decorator: make an objective available to :func:`get_loss` under ``name``.

    Keyword arguments are the entry's metadata: give ``help="one line"``, which
    ``cliplab train --help`` shows.  Registering another class under a taken name raises
    ``ValueError``.
    """
    return LOSSES.register(name, **meta)


def list_losses() -> list[str]:
    """Names of the registered objectives, sorted."""
    return sorted(LOSSES.names())


def get_loss_class(name: str) -> type:
    """The class registered under ``name``; raises :class:`UsageError` if unknown."""
    return LOSSES.get(name)


def get_loss(name: str, **kwargs) -> Objective:
    """Build the objective registered under ``name`` with keyword arguments ``kwargs``.

    Parameters
    ----------
    name : str
        A name from :func:`list_losses`, e.g. ``"infonce"`` or ``"sigmoid"``.
    **kwargs
        Passed to the class, typically ``rank`` and ``world_size``.

    Raises
    ------
    UsageError
        ``name`` is not registered.

    Examples
    --------
    >>> from cliplab.train.losses import get_loss
    >>> get_loss("infonce").name
    'infonce'
    """
    return get_loss_class(name)(**kwargs)


__all__ = [*_lazy, "LOSSES", "register_loss", "get_loss", "get_loss_class", "list_losses"]
