"""The conditional diffusion generator: closed forms, conditioning, and a falling denoising loss."""

import json

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.generative.generator import (
    ConditionalGenerator, GeneratorConfig, TinyUNet, clip_condition, ddpm_alphas_cumprod, denoising_loss,
    generator_pixels, q_sample, sample, train_generator, vision_features,
)
from cliplab.train import TrainConfig

from _generative_data import GEN, blobs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_and_noising_match_the_closed_forms():
    a = ddpm_alphas_cumprod(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(a.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(x0, t, noise, a)
    for i, ti in enumerate(t):
        ab = float(np.cumprod(1 - betas)[ti])
        np.testing.assert_allclose(xt[i].numpy(), (np.sqrt(ab) * x0[i] + np.sqrt(1 - ab) * noise[i]).numpy(),
                                   rtol=1e-5, atol=1e-5)
    assert denoising_loss(torch.zeros(2, 3), torch.ones(2, 3)).item() == 1.0


@pytest.mark.parametrize("mode", ["global", "tokens"])
def test_different_conditions_give_different_predictions(mode):
    torch.manual_seed(0)
    unet = TinyUNet(GeneratorConfig(mode=mode, cond_dim=32, **GEN))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)                  # it starts at zero
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    c1 = torch.randn(2, 32) if mode == "global" else torch.randn(2, 5, 32)
    c2 = torch.randn_like(c1)
    with torch.no_grad():
        e1, e1b, e2 = unet(x, t, c1), unet(x, t, c1), unet(x, t, c2)
    assert e1.shape == (2, 3, 16, 16)
    assert torch.equal(e1, e1b)                                            # deterministic
    assert (e1 - e2).abs().amax(dim=(1, 2, 3)).min() > 1e-3               # every image's prediction moved


def test_the_condition_follows_the_image(tiny):
    visual = tiny.model.visual
    images = torch.randn(2, 3, 32, 32)
    pooled, tokens = vision_features(visual, images)
    assert pooled.shape == (2, 32) and tokens.shape == (2, 16, 32)
    g = clip_condition(visual, images, "global")
    torch.testing.assert_close(g, torch.nn.functional.normalize(tiny.model.encode_image(images), dim=-1))
    torch.manual_seed(0)
    tok = clip_condition(visual, images, "tokens", n_tokens=5)
    torch.manual_seed(0)
    pick = torch.randint(0, 16, (2, 5))
    assert tok.shape == (2, 6, 32)
    torch.testing.assert_close(tok[:, 0], pooled)                           # the class token first
    torch.testing.assert_close(tok[:, 1:], tokens[torch.arange(2)[:, None], pick])
    with pytest.raises(UsageError, match="condition mode"):
        clip_condition(visual, images, "pixels")
    # a generator's prediction for the same x_t, t differs between two images
    torch.manual_seed(0)
    unet = TinyUNet(GeneratorConfig(mode="global", cond_dim=32, **GEN))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    gen = ConditionalGenerator(visual, unet, tiny.preprocess_cfg["mean"], tiny.preprocess_cfg["std"])
    x, t = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1), torch.tensor([300, 300])
    with torch.no_grad():
        eps = unet(x, t, gen.condition(images))
    assert (eps[0] - eps[1]).abs().max() > 1e-3


def test_pixels_round_trip_the_normalisation(tiny):
    pp = tiny.preprocess_cfg
    img = torch.rand(1, 3, 32, 32)
    norm = (img - torch.tensor(pp["mean"]).view(1, 3, 1, 1)) / torch.tensor(pp["std"]).view(1, 3, 1, 1)
    px = generator_pixels(norm, pp["mean"], pp["std"], 16)
    torch.testing.assert_close(px, torch.nn.functional.avg_pool2d(img * 2 - 1, 2), atol=1e-5, rtol=0)


def test_denoising_loss_falls_and_the_tower_stays_frozen(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    images = blobs(8)
    cfg = TrainConfig(steps=30, batch_size=8, lr=5e-3, warmup_steps=0, weight_decay=0.0, ckpt_every=0,
                      log_every=5, out_dir=str(tmp_path / "gen"))
    gen = train_generator(tiny, images, mode="global", config=cfg, gen_config=GEN, n_timesteps=2)
    rows = [json.loads(line) for line in (tmp_path / "gen" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss_denoise"], np.mean([r["loss_denoise"] for r in rows[-3:]])
    assert last < 0.6 * first, (first, last)
    assert not any(p.requires_grad for p in gen.parameters())
    for k, v in tiny.model.state_dict().items():                          # the Backbone is not touched
        assert torch.equal(v, before[k]), k
    pics = sample(gen, images[:2], steps=5)
    assert pics.shape == (2, 16, 16, 3) and pics.dtype == np.uint8
    assert np.array_equal(pics, sample(gen, images[:2], steps=5))          # seeded
    recon = sample(gen, images[:2], steps=5, start=0.3)
    assert recon.shape == (2, 16, 16, 3)
    with pytest.raises(UsageError, match="start"):
        sample(gen, images[:2], start=0)


def test_a_generator_trains_on_the_timesteps_asked_for(tiny, tmp_path, monkeypatch):
    from cliplab.generative.generator import DenoisingObjective

    seen = []
    original = DenoisingObjective.forward_model

    def recording(self, model, batch):
        out = original(self, model, batch)
        seen.append(out["t"])
        return out

    monkeypatch.setattr(DenoisingObjective, "forward_model", recording)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, weight_decay=0.0, ckpt_every=0,
                      log_every=1, out_dir=str(tmp_path / "gen"))
    train_generator(tiny, blobs(4), mode="global", config=cfg, gen_config=GEN, timesteps=(700, 1000))
    t = torch.cat(seen)
    assert len(seen) == 2 and int(t.min()) >= 700 and int(t.max()) <= 999
    with pytest.raises(UsageError, match="timesteps"):
        train_generator(tiny, blobs(4), mode="global", config=cfg, gen_config=GEN, timesteps=(700, 1200))
