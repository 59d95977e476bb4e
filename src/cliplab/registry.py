"""One registry mechanism for every kind of method.

Each kind of method (few-shot adapters and learners, training objectives, evaluation tasks,
model sources, dense methods, index types...) keeps one :class:`Registry`.  A method is
registered where it is defined, with the registry's decorator; the CLI choices, suite lists
and documentation tables are read from the registry, never from a hand-kept list::

    from cliplab.registry import Registry

    ADAPTERS = Registry("adapter", package="cliplab.adapt")

    @ADAPTERS.register("gda")
    class GDA(...):
        ...

``package`` names the package whose modules define the entries: the first lookup imports
every module of it (as timm's ``models/__init__.py`` star-imports its families), so a new
method is one new module in that package and nothing else is edited.

The registry imports nothing heavy itself, so building the CLI parser from it is cheap
as long as the registered modules are cheap to import.  :func:`all_registries` finds every
registry of cliplab (for tests and documentation tools; it imports every module).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import UsageError

T = TypeVar("T")

logger = logging.getLogger(__name__)


class Registry(Generic[T]):
    """A name → object mapping filled by a decorator where each object is defined.

    Parameters
    ----------
    kind : str
        What the entries are, in the singular (``"adapter"``, ``"loss"``); used in errors.
    package : str, optional
        Dotted name of the package whose modules register entries.  Every module of it
        (recursively, skipping names that start with ``_``) is imported on the first
        lookup, so that their decorators have run.

    Examples
    --------
    >>> from cliplab.registry import Registry
    >>> colours = Registry("colour")
    >>> @colours.register("red")
    ... def red():
    ...     return (255, 0, 0)
    >>> colours.names(), colours.get("red")()
    (['red'], (255, 0, 0))
    """

    def __init__(self, kind: str, *, package: str | None = None):
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._loaded = package is None

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``.

        Extra keyword arguments are stored as metadata of the entry (:meth:`meta`), for
        example a one-line ``help`` that the CLI and docs show.  A class gets a ``name``
        attribute.  Registering a second, different object under a taken name raises
        ``ValueError``.
        """
        def decorator(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                raise ValueError(f"{self.kind} {name!r} is already registered by {_qualname(old)}")
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            if isinstance(obj, type):
                obj.name = name
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register temporary entries)."""
        self._entries.pop(name, None)
        self._meta.pop(name, None)

    def get(self, name: str) -> T:
        """The object registered under ``name``.

        Raises
        ------
        UsageError
            ``name`` is not registered; the message lists the registered names.
        """
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}") from None

    def meta(self, name: str) -> dict[str, Any]:
        """The keyword metadata given at registration of ``name``."""
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        """Registered names, in registration order within a module, modules in import order."""
        self._load()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        import_submodules(self.package)


def import_submodules(package: str) -> None:
    """Import every module of ``package`` recursively, skipping private (``_``) names."""
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(pkg, "__path__", []), prefix=f"{package}."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)


def all_registries() -> list[Registry]:
    """Every registry of cliplab: the :class:`Registry` objects at module level of its modules.

    Imports every public module of cliplab (slow; not for start-up), as scikit-learn's
    ``all_estimators`` does.  A module that needs a missing optional package is skipped.

    Returns
    -------
    list of Registry
        Each registry once (a re-exported one is not repeated), sorted by ``kind``.
    """
    found: dict[int, Registry] = {}
    root = importlib.import_module(__package__)
    names = [__package__] + [info.name for info in pkgutil.walk_packages(root.__path__, f"{__package__}.")
                             if not info.name.rsplit(".", 1)[-1].startswith("_")]
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] == __package__:
                raise
            logger.info("all_registries: skipped %s (needs %s)", name, e.name)
            continue
        for value in vars(module).values():
            if isinstance(value, Registry):
                found[id(value)] = value
    return sorted(found.values(), key=lambda r: r.kind)


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


__all__ = ["Registry", "all_registries", "import_submodules"]
