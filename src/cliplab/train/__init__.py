"""Training: objectives (losses), one Trainer (resumable, data-parallel), checkpoints and recipes.

>>> from cliplab.train import get_recipe, list_recipes
>>> "shapes-tiny" in list_recipes()
True
"""

from cliplab.train.checkpoint import latest_checkpoint
from cliplab.train.losses import Batch, ModelOutputs, Objective, get_loss, list_losses, register_loss
from cliplab.train.recipes import Recipe, get_recipe, init_model, list_recipes, register_recipe
from cliplab.train.trainer import TrainConfig, Trainer

__all__ = [
    "Trainer",
    "TrainConfig",
    "Objective",
    "ModelOutputs",
    "Batch",
    "get_loss",
    "list_losses",
    "register_loss",
    "Recipe",
    "init_model",
    "get_recipe",
    "list_recipes",
    "register_recipe",
    "latest_checkpoint",
]
