"""Freeze a module for a block and give it back as it was.

>>> import torch
>>> from cliplab.train.freezing import frozen
>>> m = torch.nn.Linear(2, 2).train()
>>> with frozen(m):
...     m.weight.requires_grad, m.training
(False, False)
>>> m.weight.requires_grad, m.training
(True, True)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["frozen"]


@contextmanager
def frozen(model: torch.nn.Module):
    """Turn off ``requires_grad`` of every parameter of ``model`` and set eval mode for the block.

    Both are restored afterwards, also when the block raises.  Gradients still flow
    *through* the model to other trainable tensors, but none accumulate on its weights:
    the way a method trains its own module on a caller's Backbone without changing it.

    Parameters
    ----------
    model : torch.nn.Module

    Yields
    ------
    torch.nn.Module
        ``model`` itself.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    model.requires_grad_(False).eval()
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
