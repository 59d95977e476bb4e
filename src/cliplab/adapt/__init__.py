"""Few-shot adaptation: training-free adapters on image features and trainable learners.

Every method is registered in :data:`METHODS` where its class is defined
(``@METHODS.register("gda", kind="adapter", help=...)``); the ``cliplab adapt --method``
choices and help, :func:`save_adapter` / :func:`load_adapter` and the documentation tables
read that registry (:func:`method_table`).  ``kind`` is ``"adapter"`` for the
scikit-learn classifiers on image features (N, D) (subclasses of :class:`FeatureAdapter`)
and ``"learner"`` for the classifiers trained by gradient descent over the Backbone
(:mod:`cliplab.adapt._trainable`); a learner's ``input_kind`` says whether ``fit`` takes
image features or images.

Adding a training-free adapter is one new module in this package (a ``FeatureAdapter``
subclass with the decorator) plus its test: the registry imports every module of the
package on its first lookup.

Every adapter chooses its hyper-parameters on a validation split (``fit(X, y, X_val,
y_val)``, or carved from ``X``), never on test.  ``save_adapter`` / ``load_adapter``
write and read a fitted adapter (JSON + safetensors).

:class:`RankingAdapter` (:mod:`cliplab.adapt.ranking`, the ranking-aware adapter) is not
in :data:`METHODS`: it regresses one score per image for an instruction instead of
predicting classes, so it has neither ``classnames`` nor the per-class shots of ``cliplab
adapt``; ``cliplab rank --fit`` trains it, and ``save_adapter`` / ``load_adapter`` save it.

The classes are imported on first use, so that ``import cliplab.adapt`` (and building the
command-line parser from :data:`METHODS`) stays cheap.
"""

from __future__ import annotations

from ..lazy import lazy_exports
from ..registry import Registry

#: Few-shot methods by CLI name: metadata ``kind`` ("adapter" or "learner") and ``help``.
METHODS: Registry = Registry("few-shot method", package=__name__)

__getattr__, __dir__, _LAZY_NAMES = lazy_exports(__name__, {
    ".linear": ["LinearProbe"],
    ".gda": ["GDA"],
    ".tip": ["TipAdapter", "TipAdapterF"],
    ".caps": ["CapSAdapter"],
    ".coop": ["CoOp", "KgCoOp"],
    ".mocoop": ["MoCoOp"],
    ".finetune": ["FineTuner", "LoRAFineTuner", "SVDFineTuner", "FullFineTuner"],
    ".ranking": ["RankingAdapter", "save_ranker", "load_ranker"],
    ".io": ["save_adapter", "load_adapter"],
    ".fewshot": ["fit_adapter"],
    "._base": ["FeatureAdapter"],
})

__all__ = ["METHODS", "list_methods", "method_table", *_LAZY_NAMES]


def list_methods(kind: str | None = None) -> list[str]:
    """Registered method names, all or those of one ``kind`` ("adapter" or "learner")."""
    if kind not in (None, "adapter", "learner"):
        raise ValueError(f"kind must be None, 'adapter' or 'learner'; got {kind!r}")
    return [n for n in METHODS.names() if kind is None or METHODS.meta(n).get("kind") == kind]


def method_table() -> list[dict]:
    """One row per method (``name``, ``class``, ``kind``, ``input``, ``help``): the docs table.

    Adapters first, then learners, each in registration order.
    """
    rows = [{"name": n, "class": cls.__name__, "kind": METHODS.meta(n).get("kind", ""),
             "input": getattr(cls, "input_kind", "features"), "help": METHODS.meta(n).get("help", "")}
            for n, cls in METHODS.items()]
    return sorted(rows, key=lambda r: r["kind"] != "adapter")
