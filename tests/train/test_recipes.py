"""The shapes-tiny recipe: registered, its world, and reproducible bit for bit on CPU."""

import torch

from cliplab.data.shapes import get_world, shapes_tiny_world
from cliplab.train.recipes import get_recipe, list_recipes, run_recipe


def test_recipe_registered_and_world():
    assert "shapes-tiny" in list_recipes()
    w = shapes_tiny_world(0)
    assert len(w.shapes_of("train")) == 8 and "heart" not in w.shapes_of("train")


def test_recipe_trains_on_the_shared_world():
    """The recipe's data and validation are the world that export, eval and the demo use,
    and that world is still the one the bundled model was trained on."""
    recipe = get_recipe("shapes-tiny")
    single, multi = recipe.train_set.sets
    shared = get_world("shapes-tiny", 0).config()
    assert single.world.config() == shared
    assert recipe.evaluate.world.config() == shared and recipe.evaluate.split == "val"
    differs = {k for k in shared if multi.world.config()[k] != shared[k]}
    assert differs == {"seed", "n_objects", "split_sizes"} and multi.world.seed == 1
    assert shared == {  # the bundled model's training data: change it only with a retrain
        "seed": 0, "image_size": 64, "n_objects": [1, 1],
        "heldout": [["orange", "circle"], ["cyan", "square"], ["pink", "triangle"], ["yellow", "star"],
                    ["blue", "cross"], ["red", "diamond"], ["green", "hexagon"], ["purple", "ring"],
                    ["orange", "heart"], ["cyan", "crescent"]],
        "ood_shapes": ["heart", "crescent"], "spurious": 0.0, "defect_rate": 0.0,
        "split_sizes": {"train": 1_000_000, "val": 5000, "test": 5000, "ood": 5000},
        "antialias": True, "n_captions": 5,
    }


def _final_weights(out):
    recipe = get_recipe("shapes-tiny", steps=3, batch_size=16, warmup_steps=1, eval_every=0,
                        ckpt_every=0, log_every=1, out_dir=str(out))
    recipe.evaluate = None
    res = run_recipe(recipe, progress=False)
    from safetensors.torch import load_file

    return load_file(f"{res['checkpoint']}/open_clip_model.safetensors")


def test_same_seed_same_weights(tmp_path):
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
