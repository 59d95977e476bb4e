"""Lazy re-exports for package ``__init__`` modules (PEP 562).

A package that re-exports names of heavy modules (torch, scikit-learn, open_clip) imports
them on first use instead of at ``import``, so that ``import cliplab.x.light`` and the
command line stay fast::

    # cliplab/models/__init__.py
    from ..lazy import lazy_exports

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {
        ".backbone": ["Backbone", "EncodedImages", "Skipped"],
        ".loading": ["SOURCES", "build_model", "list_sources", "load"],
    })

``from cliplab.models import Backbone``, ``cliplab.models.Backbone``, ``dir()`` and
``from cliplab.models import *`` work as with eager imports; the module is imported the
first time one of its names is read, and the name is then a plain attribute.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """The ``__getattr__``, ``__dir__`` and ``__all__`` of a package with lazy re-exports.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : mapping of str to sequence of str
        Module (relative to ``package``, e.g. ``".backbone"``, or absolute) -> names it
        defines that the package re-exports.

    Returns
    -------
    __getattr__ : callable
        Imports the module of a re-exported name on first access; raises
        ``AttributeError`` for any other name (so ``from package import submodule``
        still imports the submodule).
    __dir__ : callable
        The package's attributes plus the re-exported names.
    __all__ : list of str
        The re-exported names, in the order given.
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)  # later reads skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__, list(where)


__all__ = ["lazy_exports"]
