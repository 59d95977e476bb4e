"""DIVA and un²CLIP: only the vision tower trains; the generator and the text tower stay bit-identical."""

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.generative.diva import diva
from cliplab.generative.generator import denoising_error, train_generator
from cliplab.generative.un2clip import un2clip
from cliplab.train import TrainConfig

from _generative_data import GEN, blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, name, steps, lr):
    return TrainConfig(steps=steps, batch_size=8, lr=lr, warmup_steps=0, weight_decay=0.0, ckpt_every=0,
                       log_every=1, out_dir=str(tmp_path / name))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method, mode", [(diva, "tokens"), (un2clip, "global")])
def test_only_the_vision_tower_changes(tiny, tmp_path, method, mode):
    images = blobs(8)
    gen = train_generator(tiny, images, mode=mode, config=config(tmp_path, "gen", 3, 3e-3), gen_config=GEN)
    gen_before, model_before = snapshot(gen.unet), snapshot(tiny.model)
    tuned = method(tiny, gen, images, config=config(tmp_path, "fb", 4, 1e-3))
    assert tuned.name == f"{tiny.name}+{method.__name__}"
    for k, v in gen.unet.state_dict().items():                             # the frozen generator
        assert torch.equal(v, gen_before[k]), k
    assert not any(p.requires_grad for p in gen.unet.parameters())
    after = tuned.model.state_dict()
    changed = [k for k in after if not torch.equal(after[k], model_before[k])]
    assert changed and all(k.startswith("visual.") for k in changed), changed  # text tower, logit_scale intact
    assert "visual.proj" in changed
    for k, v in tiny.model.state_dict().items():                          # the input Backbone is not touched
        assert torch.equal(v, model_before[k]), k
    texts = ["a red square", "a blue square"]
    # same weights; only torch's attention kernel may differ (frozen parameters take its fast path)
    np.testing.assert_allclose(tuned.encode_texts(texts), tiny.encode_texts(texts), atol=1e-6)
    x_old, x_new = tiny.encode_images(images[:4]).features, tuned.encode_images(images[:4]).features
    assert x_new.shape == x_old.shape and not np.array_equal(x_new, x_old)  # a usable Backbone, changed
    err = denoising_error(gen, images, seed=3)                             # seeded: a fixed held-out score
    assert err == denoising_error(gen, images, seed=3) and 0 < err < 2
    assert denoising_error(gen, images, visual=tuned.model.visual, seed=3) != err
    assert denoising_error(gen, images, seed=3, shuffle_conditions=True) != err    # other conditions, same draws


def test_each_method_refuses_the_other_condition(tiny, tmp_path):
    images = blobs(8)
    gen = train_generator(tiny, images, mode="global", config=config(tmp_path, "gen", 1, 1e-3), gen_config=GEN)
    with pytest.raises(UsageError, match="mode='tokens'"):
        diva(tiny, gen, images, config=config(tmp_path, "fb", 1, 1e-3))
    gen.unet.cfg.mode = "tokens"
    with pytest.raises(UsageError, match="mode='global'"):
        un2clip(tiny, gen, images, config=config(tmp_path, "fb", 1, 1e-3))


@pytest.mark.parametrize("method, mode", [(diva, "tokens"), (un2clip, "global")])
def test_feedback_draws_only_the_timesteps_asked_for(tiny, tmp_path, method, mode):
    images = blobs(8)
    gen = train_generator(tiny, images, mode=mode, config=config(tmp_path, "gen", 1, 1e-3), gen_config=GEN)
    seen = []
    hook = gen.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    try:
        method(tiny, gen, images, config=config(tmp_path, "fb", 3, 1e-3), timesteps=(600, 610))
    finally:
        hook.remove()
    t = torch.cat(seen)
    assert len(seen) == 3 and int(t.min()) >= 600 and int(t.max()) <= 609 and len(t.unique()) > 1
    for bad in ((500, 500), (-1, 10), (0, 1001), (3,)):
        with pytest.raises(UsageError, match="timesteps"):
            method(tiny, gen, images, config=config(tmp_path, "bad", 1, 1e-3), timesteps=bad)


def test_the_default_timesteps_are_all_of_them_as_before(tiny, tmp_path):
    """``timesteps=None`` draws exactly what ``(0, T)`` draws: U{0..T-1}, the papers' objective."""
    images = blobs(8)
    gen = train_generator(tiny, images, mode="global", config=config(tmp_path, "gen", 1, 1e-3), gen_config=GEN)
    x = torch.randn(4, 3, 32, 32)
    draws = []
    for timesteps in (None, (0, gen.cfg.steps)):
        torch.manual_seed(5)
        draws.append(gen.denoise(x, n_timesteps=50, timesteps=timesteps))
    assert torch.equal(draws[0]["t"], draws[1]["t"]) and torch.equal(draws[0]["eps"], draws[1]["eps"])
    assert int(draws[0]["t"].max()) > 900 and int(draws[0]["t"].min()) < 100        # 200 draws over all of T
    band = denoising_error(gen, images, seed=1, timesteps=(0, 10))                   # nearly clean: tiny noise
    assert denoising_error(gen, images, seed=1, timesteps=(0, 10)) == band
    assert band != denoising_error(gen, images, seed=1, timesteps=(990, 1000))
