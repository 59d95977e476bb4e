"""Registry of contrastive losses for the :class:`~cliplab.train.Trainer`.

A loss is a thin ``torch.nn.Module`` around a pure function of (N, D) features.
Its ``forward(image_features, text_features, logit_scale, logit_bias=None)``
returns a dict of named scalar terms; the Trainer sums them.  A loss class
declares how the model's temperature should start (``init_logit_scale``,
``init_logit_bias``; ``None`` keeps the model's own) and is built with the
distributed ``rank`` and ``world_size`` so it can gather features across ranks.

Add a family by writing one module in this folder and decorating its class::

    @register_loss("my-loss")
    class MyLoss(torch.nn.Module):
        ...
"""

from __future__ import annotations

from typing import Callable

from cliplab.errors import UsageError

_LOSSES: dict[str, type] = {}


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator: make a loss available to :func:`get_loss` under ``name``."""

    def decorator(cls: type) -> type:
        if name in _LOSSES and _LOSSES[name] is not cls:
            raise ValueError(f"loss {name!r} is already registered by {_LOSSES[name].__name__}")
        _LOSSES[name] = cls
        cls.name = name
        return cls

    return decorator


def list_losses() -> list[str]:
    """Names of the registered losses, sorted."""
    return sorted(_LOSSES)


def get_loss_class(name: str) -> type:
    """The class registered under ``name``; raises :class:`UsageError` if unknown."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise UsageError(f"unknown loss {name!r}; choose one of {', '.join(list_losses())}") from None


def get_loss(name: str, **kwargs):
    """Build the loss registered under ``name`` with keyword arguments ``kwargs``.

    Parameters
    ----------
    name : str
        A name from :func:`list_losses`, e.g. ``"infonce"`` or ``"sigmoid"``.
    **kwargs
        Passed to the loss class, typically ``rank`` and ``world_size``.

    Examples
    --------
    >>> from cliplab.train.losses import get_loss
    >>> get_loss("infonce").name
    'infonce'
    """
    return get_loss_class(name)(**kwargs)


# Importing the family modules registers their losses.
from cliplab.train.losses import infonce, sigmoid  # noqa: E402,F401

__all__ = ["register_loss", "get_loss", "get_loss_class", "list_losses"]
