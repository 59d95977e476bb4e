"""The shapes-tiny recipe: registered, its world, and reproducible bit for bit on CPU."""

import torch

from cliplab.train.recipes import get_recipe, list_recipes, run_recipe, shapes_world


def test_recipe_registered_and_world():
    assert "shapes-tiny" in list_recipes()
    w = shapes_world(0)
    assert len(w.shapes_of("train")) == 8 and "heart" not in w.shapes_of("train")


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
