"""VladVA: the joint objective against hand-computed values, the soft prompt's hooks, the
frozen weights after training, the image conditioning of the next-token pass, save/load."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from cliplab.errors import ModelLoadError, UsageError
from cliplab.generative.vladva import (VladVAModel, VladVAObjective, VladVASet, adapt_backbone,
                                       attach_soft_prompt, ntp_vocabulary, load_vladva, ntp_loss,
                                       save_vladva, soft_prompt_of, train_vladva)
from cliplab.train.losses.base import ModelOutputs

TEXTS = ["a photo of a red star.", "two blue squares on a striped background", "a circle"]


@pytest.fixture(scope="module")
def world():
    from cliplab.data.shapes import shapes_tiny_world

    return shapes_tiny_world(2, n_objects=(1, 2), image_size=32)


@pytest.fixture(scope="module")
def trained(tiny, world, tmp_path_factory):
    """λ = 1 on 4 scenes (batch 4, 40 steps): the adapted Backbone, its VladVAModel, the metrics."""
    out = tmp_path_factory.mktemp("vladva")
    tuned, model = train_vladva(tiny, steps=40, ntp_weight=1.0, train_set=VladVASet(world, n=4), batch_size=4,
                                lr=1e-2, warmup_steps=1, out_dir=out, log_every=1, return_model=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return tuned, model, rows


def _ce_diag(z: np.ndarray) -> float:
    """Mean cross-entropy of the rows of z against the diagonal, from the definition."""
    return float(np.mean([-z[i, i] + math.log(sum(math.exp(v) for v in z[i])) for i in range(len(z))]))


def test_zero_ntp_weight_is_exactly_the_contrastive_loss():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    t = torch.tensor(10.0)
    z = 10.0 * (img @ txt.T).numpy()                                  # [[8, 0], [8.4, 8]]
    expected = (_ce_diag(z) + _ce_diag(z.T)) / 2
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    out = ModelOutputs(img, txt, t, extras={"ntp_logits": logits, "ntp_targets": targets})
    terms = VladVAObjective(0.0)(out)
    assert list(terms) == ["contrastive"]
    assert terms["contrastive"].item() == pytest.approx(expected, rel=1e-6)
    # λ = 0.5: the same contrastive term plus half the mean CE over the 5 real targets
    logp = torch.log_softmax(logits, -1)
    ntp = -(logp[0, 0, 1] + logp[0, 1, 4] + logp[1, 0, 0] + logp[1, 1, 2] + logp[1, 2, 3]) / 5
    joint = VladVAObjective(0.5)(out)
    assert joint["contrastive"].item() == pytest.approx(expected, rel=1e-6)
    assert joint["ntp"].item() == pytest.approx(0.5 * ntp.item(), rel=1e-6)
    assert ntp_loss(logits, targets).item() == pytest.approx(ntp.item(), rel=1e-6)


def test_ntp_loss_falls_on_a_tiny_batch(trained):
    rows = trained[2]
    first, last = rows[0]["loss_ntp"], rows[-1]["loss_ntp"]
    assert last < 0.6 * first, (first, last)
    assert "loss_contrastive" in rows[-1]


def test_frozen_weights_bit_identical_after_training(tiny, trained, world):
    tuned, _, _ = trained
    base = tiny.model.state_dict()
    seen, trained_keys = set(), []
    for key, value in tuned.model.state_dict().items():
        if ".lora" in key or "soft_prompt" in key:
            trained_keys.append(key)
            continue
        name = key.replace(".parametrizations.", ".").replace(".original", "")
        assert torch.equal(value, base[name]), name
        seen.add(name)
    assert seen == set(base)                                          # every base weight compared
    assert any("visual" not in k for k in trained_keys) and not any(k.startswith("visual") for k in trained_keys)
    prompt = soft_prompt_of(tuned.model)
    assert prompt is not None and prompt.vectors.abs().sum() > 0
    assert any(v.abs().sum() > 0 for k, v in tuned.model.state_dict().items() if k.endswith("lora_B"))
    images = world.render_batch("test", range(3))[0]
    np.testing.assert_array_equal(tuned.encode_images(images).features, tiny.encode_images(images).features)


def test_ntp_logits_depend_on_the_image(trained, world):
    tuned, model, _ = trained
    images = world.render_batch("test", range(2))[0]
    x = torch.from_numpy(tuned.encode_images(images).features)                  # (2, D)
    tokens = tuned.tokenizer([world.scene("test", 0).long_caption] * 2)    # cut at the context, as in training
    with torch.no_grad():
        logits, targets = model.ntp_logits(x, tokens)
        again, _ = model.ntp_logits(x[:1], tokens[:1])
    assert logits.shape[:2] == targets.shape and logits.shape[2] == len(model.vocabulary)
    assert not torch.allclose(logits[0], logits[1])                   # same caption, other image
    torch.testing.assert_close(again[0], logits[0])


def test_adapted_backbone_encodes_texts(tiny, trained):
    tuned, _, _ = trained
    feats = tuned.encode_texts(TEXTS)
    assert feats.shape == (3, tiny.embed_dim) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    assert not np.allclose(feats, tiny.encode_texts(TEXTS), atol=1e-3)
    tokens = tuned.text_tokens(TEXTS)                                 # the prompt's outputs are dropped
    assert tokens.shape == tiny.text_tokens(TEXTS).shape
    slow = tuned.encode_texts(TEXTS, fast=False)                      # open_clip's encode_text sees the prompt too
    np.testing.assert_allclose(slow, feats, atol=1e-5)


def test_soft_prompt_is_read_and_survives_copies(tiny):
    adapted = adapt_backbone(tiny, n_prompts=3, seed=0)
    assert soft_prompt_of(tiny.model) is None                        # the input is untouched
    before = adapted.encode_texts(TEXTS)
    assert not np.allclose(before, tiny.encode_texts(TEXTS), atol=1e-4)
    clone = copy.deepcopy(adapted)                                    # hooks re-bound to the copy's prompt
    with torch.no_grad():
        soft_prompt_of(clone.model).vectors.normal_(generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(adapted.encode_texts(TEXTS), before)
    assert not np.allclose(clone.encode_texts(TEXTS), before, atol=1e-4)
    with pytest.raises(UsageError, match="already has a soft prompt"):
        attach_soft_prompt(adapted.model, 2)


def test_save_load_round_trip_and_merge(tiny, trained, tmp_path):
    from cliplab.surgery.lora import merge_lora

    tuned, _, _ = trained
    save_vladva(tuned, tmp_path / "adapter")
    loaded = load_vladva(tiny, tmp_path / "adapter")
    np.testing.assert_array_equal(loaded.encode_texts(TEXTS), tuned.encode_texts(TEXTS))
    merged = merge_lora(tuned)                                        # keeps the prompt
    np.testing.assert_allclose(merged.encode_texts(TEXTS), tuned.encode_texts(TEXTS), atol=1e-5)
    with pytest.raises(UsageError, match="no soft prompt"):
        save_vladva(tiny, tmp_path / "none")
    with pytest.raises(ModelLoadError, match="no VladVA adapter"):
        load_vladva(tiny, tmp_path)
    (tmp_path / "adapter" / "soft_prompt.safetensors").write_bytes(b"\x00" * 64)   # corrupt: one line, exit 3
    with pytest.raises(ModelLoadError, match="not a readable") as info:
        load_vladva(tiny, tmp_path / "adapter")
    assert "\n" not in str(info.value)
    save_vladva(tuned, tmp_path / "adapter")
    (tmp_path / "adapter" / "lora.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a readable"):
        load_vladva(tiny, tmp_path / "adapter")


def test_vocabulary_and_model_shapes(tiny, world):
    adapted = adapt_backbone(tiny, n_prompts=2)
    vocab = ntp_vocabulary(adapted.tokenizer, [world.scene("train", i).long_caption for i in range(8)])
    assert vocab.ndim == 1 and (vocab > 0).all() and 49407 in vocab.tolist()   # end-of-text is predicted
    model = VladVAModel(adapted.model, vocab, n_image_tokens=3)
    assert model.image_proj.out_features == 3 * adapted.model.token_embedding.weight.shape[1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"image_proj.weight", "image_proj.bias", "head_scale", "clip.transformer.soft_prompt.vectors"}
                         | {n for n in trainable if ".lora" in n})
    with pytest.raises(UsageError):
        train_vladva(tiny, steps=0)
