"""Training from scratch with outlier-free attention: the recipe option, its init and its checkpoints."""

import math

import pytest
import torch

import cliplab
from cliplab.cli.train import add_parser
from cliplab.errors import UsageError
from cliplab.models.attention import ATTENTION_PRESETS, OutlierFreeAttention
from cliplab.train import Trainer
from cliplab.train.checkpoint import latest_checkpoint
from cliplab.train.recipes import get_recipe, init_model


@pytest.mark.parametrize("attention", ["clipped", "gated-linear"])
def test_trained_from_scratch_and_loaded_back_exactly(tmp_path, attention):
    recipe = get_recipe("shapes-tiny", attention=attention, steps=2, batch_size=8, warmup_steps=1,
                        eval_every=0, ckpt_every=0, log_every=1, out_dir=str(tmp_path))
    built = init_model(recipe.model_cfg, recipe.preprocess_cfg, seed=0)
    attn = [m for m in built.model.modules() if isinstance(m, OutlierFreeAttention)]
    assert len(attn) == 6                                           # 3 image + 3 text blocks
    preset = ATTENTION_PRESETS[attention]
    if attention == "clipped":                                      # gamma = -alpha / T, T = 65 image / 32 text tokens
        assert [m.gamma for m in attn[:3]] == pytest.approx([-3.2 / 65] * 3)
        assert [m.gamma for m in attn[3:]] == pytest.approx([-3.2 / 32] * 3)
    else:                                                           # from-scratch gates: nn.Linear init, no 1/pi scale
        gates = attn[0].gates
        assert torch.allclose(gates.b1, torch.full_like(gates.b1, math.log(0.25 / 0.75)))
        assert gates.w1.abs().max() > 0 and attn[0].gate_scale == 1.0 and preset["pi_init"] == 0.25
    Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config, None,
            model_cfg=built.model_cfg, progress=False).fit()
    loaded = cliplab.load(latest_checkpoint(tmp_path))
    trained = built.model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))      # (B, 3, H, W)
    tokens = built.tokenizer(["a red star", "two blue squares"])
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_image(x), trained.encode_image(x), atol=1e-6)
        assert torch.allclose(loaded.model.encode_text(tokens), trained.encode_text(tokens), atol=1e-6)
    sd, ref = loaded.model.state_dict(), trained.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_attention_option_names_the_presets():
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    action = next(a for a in sub.choices["train"]._actions if a.dest == "attention")
    assert action.choices == ["vanilla", *ATTENTION_PRESETS]       # the CLI cannot import torch to read them
    assert "cliplab" not in get_recipe("shapes-tiny", attention="vanilla").model_cfg
    with pytest.raises(UsageError, match="sparsemax"):
        get_recipe("shapes-tiny", attention="sparsemax")


def test_the_recorded_clipped_attention_survives_a_longer_context(tmp_path):
    """The config records gamma, not alpha: stretching the text positions (Long-CLIP) and
    reloading keeps the gamma the model was built with."""
    from cliplab.models.backbone import Backbone
    from cliplab.surgery import stretch_positions

    recipe = get_recipe("shapes-tiny", attention="clipped", steps=1, out_dir=str(tmp_path))
    built = init_model(recipe.model_cfg, recipe.preprocess_cfg, seed=0)
    spec = built.model_cfg["cliplab"]["attention"]
    assert spec["gamma"] == pytest.approx({"image": -3.2 / 65, "text": -3.2 / 32}) and "alpha" not in spec
    bb = Backbone(built.model, model_cfg=built.model_cfg, preprocess_cfg=dict(built.model.visual.preprocess_cfg),
                  tokenizer=built.tokenizer, name="clipped")
    long = stretch_positions(bb)
    long.save(tmp_path / "long")
    back = cliplab.load(tmp_path / "long")
    text_gammas = [m.gamma for m in back.model.transformer.modules() if isinstance(m, OutlierFreeAttention)]
    assert text_gammas == pytest.approx([-3.2 / 32] * 3)
    tokens = long.tokenize(["a red star above a blue square and a green circle"])
    with torch.no_grad():
        assert torch.allclose(back.model.encode_text(tokens), long.model.encode_text(tokens), atol=1e-6)


def test_resume_refuses_another_attention_or_objective(tmp_path):
    from cliplab.errors import CheckpointMismatch

    def run(attention, loss="infonce", resume=False, steps=1):
        recipe = get_recipe("shapes-tiny", attention=attention, loss=loss, steps=steps, batch_size=4,
                            warmup_steps=1, eval_every=0, ckpt_every=0, log_every=1, out_dir=str(tmp_path))
        built = init_model(recipe.model_cfg, recipe.preprocess_cfg, loss=loss, seed=0)
        Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config, None,
                model_cfg=built.model_cfg, progress=False).fit(resume=resume)

    run("clipped")
    with pytest.raises(CheckpointMismatch, match="softmax|attention|clipped"):
        run(None, resume=True, steps=2)          # would silently train a clipped model as vanilla
    with pytest.raises(CheckpointMismatch, match="--loss infonce"):
        run("clipped", loss="sigmoid", resume=True, steps=2)
    run("clipped", resume=True, steps=2)          # the same options resume
    with pytest.raises(UsageError, match="at least 2"):
        recipe = get_recipe("shapes-tiny", steps=1, batch_size=1, out_dir=str(tmp_path / "b1"))
        built = init_model(recipe.model_cfg, recipe.preprocess_cfg, seed=0)
        Trainer(built.model, built.tokenizer, built.preprocess, recipe.train_set, recipe.config, None,
                model_cfg=built.model_cfg, progress=False).fit()
