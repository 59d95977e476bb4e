"""Records of what happened to a batch of inputs: which were kept, which were skipped and why.

One :class:`Skipped` record is used wherever an input is left out (image decoding,
:meth:`cliplab.models.Backbone.encode_images`, :class:`cliplab.features.FeatureStore`), and
:class:`EncodedImages` is what image encoding returns.  Plain data, no heavy imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Skipped", "EncodedImages", "describe_input"]


def describe_input(source, index: int) -> str:
    """How an input is named in skip records: its path, else ``<type #index>``."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    return f"<{type(source).__name__} #{index}>"


@dataclass(frozen=True)
class Skipped:
    """An input that was left out (``on_error="skip"``): its position, source and reason.

    Attributes
    ----------
    index : int
        Position of the input in the sequence given.
    source : str
        Its path, or ``<type #index>`` for an in-memory input (:func:`describe_input`).
    reason : str
        Why it was left out (the :class:`~cliplab.errors.BadImage` reason).
    """

    index: int
    source: str
    reason: str

    @classmethod
    def of(cls, index: int, source, reason: str) -> "Skipped":
        """The record of input ``index``, naming ``source`` with :func:`describe_input`."""
        return cls(int(index), describe_input(source, index), str(reason))


@dataclass(frozen=True, eq=False)
class EncodedImages:
    """What :meth:`Backbone.encode_images <cliplab.models.Backbone.encode_images>` returns.

    Attributes
    ----------
    features : ndarray of float32, shape (M, D)
        L2-normalised features of the kept inputs, in input order.
    kept : ndarray of int64, shape (M,)
        Input index of each row of ``features``.
    skipped : list of Skipped
        One record per input left out (empty unless ``on_error="skip"``), by index.
    """

    features: np.ndarray
    kept: np.ndarray
    skipped: list[Skipped]
