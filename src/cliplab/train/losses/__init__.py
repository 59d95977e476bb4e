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
file changes (every module here is imported when the package is)::

    import torch
    from cliplab.train.losses import Objective, register_loss

    @register_loss("my-loss")
    class MyLoss(Objective):
        def forward(self, outputs, batch=None):
            sim = (outputs.image_features * outputs.text_features).sum(1)   # (B,)
            return {"align": (1 - sim).mean()}

It is then ``cliplab train --loss my-loss`` and ``TrainConfig(loss="my-loss")``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from cliplab.errors import UsageError
from cliplab.train.losses.base import Batch, ModelOutputs, Objective

_LOSSES: dict[str, type] = {}


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator: make an objective available to :func:`get_loss` under ``name``."""

    def decorator(cls: type) -> type:
        if name in _LOSSES and _LOSSES[name] is not cls:
            raise ValueError(f"loss {name!r} is already registered by {_LOSSES[name].__name__}")
        _LOSSES[name] = cls
        cls.name = name
        return cls

    return decorator


def list_losses() -> list[str]:
    """Names of the registered objectives, sorted."""
    return sorted(_LOSSES)


def get_loss_class(name: str) -> type:
    """The class registered under ``name``; raises :class:`UsageError` if unknown."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown loss {name!r}; choose one of {', '.join(list_losses())}") from None


def get_loss(name: str, **kwargs) -> Objective:
    """Build the objective registered under ``name`` with keyword arguments ``kwargs``.

    Parameters
    ----------
    name : str
        A name from :func:`list_losses`, e.g. ``"infonce"`` or ``"sigmoid"``.
    **kwargs
        Passed to the class, typically ``rank`` and ``world_size``.

    Examples
    --------
    >>> from cliplab.train.losses import get_loss
    >>> get_loss("infonce").name
    'infonce'
    """
    return get_loss_class(name)(**kwargs)


# Importing every module of this package runs its @register_loss decorators.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Batch", "ModelOutputs", "Objective", "register_loss", "get_loss", "get_loss_class", "list_losses"]
