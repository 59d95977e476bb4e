"""Argument checks shared by the library: validate once, at the boundary.

Each check returns the value in its checked form or raises
:class:`cliplab.errors.UsageError` (a ``ValueError``; exit code 2 in the CLI) with a
message that names the argument, what it must be, and the value given.  The module
imports nothing heavy, so any layer can use it.

Examples
--------
>>> from cliplab.validation import check_choice, check_positive_int
>>> check_positive_int("batch_size", 8)
8
>>> check_choice("on_error", "skip", ("raise", "skip"))
'skip'
>>> check_choice("towers", "visual", ("visual", "text"), many=True)
('visual',)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

from .errors import UsageError

__all__ = ["check_positive_int", "check_number", "check_choice", "check_backbone", "check_labels"]


def check_positive_int(name: str, value, *, minimum: int = 1, allow_none: bool = False,
                       hint: str = "") -> int | None:
    """``value`` as an ``int`` >= ``minimum`` (or ``None`` when ``allow_none``).

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        Must be an integer (``bool`` is refused); NumPy integers are accepted.
    minimum : int, default=1
        Smallest allowed value (``0`` for counts such as worker threads).
    allow_none : bool, default=False
        Accept ``None`` (returned as is).
    hint : str, optional
        What a special value means, shown in parentheses (``"0: decode in this thread"``).

    Raises
    ------
    UsageError
        ``value`` is not an integer, or is below ``minimum``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= minimum:
        return int(value)
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    what += " or None" if allow_none else ""
    what += f" ({hint})" if hint else ""
    raise UsageError(f"{name} must be {what}, got {value!r}")


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 strict_minimum: bool = False, hint: str = "") -> float:
    """``value`` as a finite ``float`` in ``[minimum, maximum]`` (``(minimum, ...`` when ``strict_minimum``).

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        A real number (``bool`` is refused); NumPy scalars are accepted.
    minimum, maximum : float, optional
        Bounds; ``None`` leaves that side open.
    strict_minimum : bool, default=False
        ``value`` must be greater than ``minimum`` (a learning rate, a temperature).
    hint : str, optional
        What the value means, shown in parentheses.

    Raises
    ------
    UsageError
        ``value`` is not a finite real number, or lies outside the bounds.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if ok:
        return float(value)
    if minimum is not None and maximum is not None:
        where = f" in {'(' if strict_minimum else '['}{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        where = f" {'>' if strict_minimum else '>='} {minimum:g}"
    else:
        where = f" <= {maximum:g}" if maximum is not None else ""
    raise UsageError(f"{name} must be a finite number{where}{f' ({hint})' if hint else ''}, got {value!r}")


def check_choice(name: str, value, choices: Iterable, *, many: bool = False):
    """``value`` if it is one of ``choices``; with ``many=True``, a non-empty subset as a tuple.

    Parameters
    ----------
    name : str
    value : object, or str / iterable of them when ``many``
        With ``many=True`` a single string stands for a one-element subset.
    choices : iterable
        The allowed values, in the order the message lists them.
    many : bool, default=False

    Returns
    -------
    object or tuple
        ``value`` (``many=False``) or the tuple of chosen values (``many=True``).

    Raises
    ------
    UsageError
        Naming the allowed values.
    """
    allowed = tuple(choices)
    if not many:
        if any(value is c or (type(value) is type(c) and value == c) for c in allowed):
            return value
        raise UsageError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    given = (value,) if isinstance(value, str) else tuple(value)
    if not given or any(g not in allowed for g in given):
        raise UsageError(f"{name} must be a non-empty subset of {list(allowed)}; got {list(given)}")
    return given


def check_backbone(name: str, value):
    """``value`` if it is a :class:`~cliplab.models.Backbone` (anything with its encoders).

    Checked by interface (``model``, ``encode_images``, ``encode_texts``, ``tokenize``)
    so that this module does not import the model code.

    Raises
    ------
    UsageError
        Saying how to get a Backbone.
    """
    if all(hasattr(value, a) for a in ("model", "encode_images", "encode_texts", "tokenize")):
        return value
    raise UsageError(f"{name} must be a Backbone (cliplab.load(...)), got {type(value).__name__}")


def check_labels(y, n_classes: int, *, n_samples: int | None = None, name: str = "labels") -> np.ndarray:
    """Integer class indices in ``[0, n_classes)``, as an int64 array (N,).

    Parameters
    ----------
    y : array-like of int, shape (N,)
    n_classes : int
        C; every label must index into the C classes.
    n_samples : int, optional
        N expected (one label per sample).
    name : str, default="labels"

    Raises
    ------
    UsageError
        Wrong length or shape, a non-integer dtype, or a label out of range.
    """
    arr = np.asarray(y)
    if arr.ndim != 1 or (n_samples is not None and len(arr) != n_samples):
        expected = f"{n_samples} samples but " if n_samples is not None else ""
        raise UsageError(f"{name} must be one integer per sample: {expected}{name} of shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UsageError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = arr[(arr < 0) | (arr >= n_classes)]
    if bad.size:
        raise UsageError(f"{name} must lie in [0, {n_classes}) (indices into the {n_classes} classes); "
                         f"got {int(bad[0])}")
    return arr
