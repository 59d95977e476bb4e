"""Records of what happened to a batch of inputs: which were kept, which were skipped and why.

One :class:`Skipped` record is used wherever an input is left out (image decoding,
:meth:`cliplab.models.Backbone.encode_images`, :class:`cliplab.features.FeatureStore`), and
:class:`EncodedImages` is what image encoding returns.  Plain data, no heavy imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Skipped", "EncodedImages", "describe_source"]


def describe_source(source, index: int | None = None) -> str:
    """A short name for an input ``source`` in error messages, logs and skip records.

    A path is itself; any other source is ``<type #index>`` when its position ``index``
    in a batch is given, else ``<N bytes>``, the ``name`` of a file object, or ``<type>``.
    """
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if index is not None:
        return f"<{type(source).__name__} #{index}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    return f"<{type(source).__name__}>"


@dataclass(frozen=True)
class Skipped:
    """An input that was left out (``on_error="skip"``): its position, source and reason.

    Attributes
    ----------
    index : int
        Position of the input in the sequence given.
    source : str
        Its path, or ``<type #index>`` for an in-memory input (:func:`describe_source`).
    reason : str
        Why it was left out (the :class:`~cliplab.errors.BadImage` reason).
    """

    index: int
    source: str
    reason: str

    @classmethod
    def of(cls, index: int, source, reason: str) -> "Skipped":
        """The record of input ``index``, naming ``source`` with :func:`describe_source`."""
        return cls(int(index), describe_source(source, index), str(reason))


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
