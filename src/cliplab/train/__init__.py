"""Training: objectives (losses), one Trainer (resumable, data-parallel), checkpoints and recipes.

>>> from cliplab.train import get_recipe, list_recipes
>>> "shapes-tiny" in list_recipes()
True

The names below are imported on first use (:mod:`cliplab.lazy`), so that importing the
loss registry or one module does not import the Trainer.
"""

from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".trainer": ["Trainer", "TrainConfig"],
    ".losses": ["LOSSES", "Objective", "ModelOutputs", "Batch", "get_loss", "list_losses", "register_loss"],
    ".recipes": ["RECIPES", "Recipe", "init_model", "get_recipe", "list_recipes", "register_recipe"],
    ".checkpoint": ["latest_checkpoint"],
    ".freezing": ["frozen"],
})
