"""Long-CLIP objective: primary component matching and the loss against closed forms, the kept
positional rows, and a short fine-tuning run that saves a loadable stretched model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplab.train.losses.base import Batch, ModelOutputs
from cliplab.surgery.longclip import LongCLIPLoss, primary_components


def _pca_numpy(x: np.ndarray, k: int) -> np.ndarray:
    mean = x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    v = vt[:k].T                                                     # (D, k)
    return (x - mean) @ v @ v.T + mean


def _smoothed_ce(logits: np.ndarray, eps: float) -> float:
    """Cross-entropy with label smoothing eps and the diagonal as labels, from its definition."""
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    n = len(logits)
    target = np.full((n, n), eps / n) + np.eye(n) * (1 - eps)
    return float(-(target * logp).sum(1).mean())


def _clip(x, y, t, eps=0.1):
    logits = t * x @ y.T
    return (_smoothed_ce(logits, eps) + _smoothed_ce(logits.T, eps)) / 2


def _features(n=12, d=8, seed=0):
    """Three (n, d) float32 feature sets (the PCA runs in float32, as the reference's)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(3)]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_primary_components_equal_the_svd_closed_form(k):
    x = _features()[0]
    np.testing.assert_allclose(primary_components(x, k).numpy(), _pca_numpy(x.double().numpy(), k), atol=2e-6)


def test_all_components_give_the_features_back():
    x = _features(n=5, d=8)[0]
    np.testing.assert_allclose(primary_components(x, 8).numpy(), x.numpy(), atol=2e-6)
    assert not np.allclose(primary_components(x, 2).numpy(), x.numpy(), atol=1e-3)


def test_loss_terms_equal_their_closed_forms():
    x, long, short = _features()
    t = torch.tensor(20.0)
    out = ModelOutputs(x, long, t, extra_text_features=short.unsqueeze(1))
    terms = LongCLIPLoss(pca_dim=3)(out)
    xn, ln, sn = x.double().numpy(), long.double().numpy(), short.double().numpy()
    assert set(terms) == {"long", "short"}
    assert terms["long"].item() == pytest.approx(_clip(xn, ln, 20.0), abs=1e-5)
    assert terms["short"].item() == pytest.approx(_clip(_pca_numpy(xn, 3), sn, 20.0), abs=1e-5)
    # no PCM: short captions against the full features; short_weight 0: long captions only
    no_pcm = LongCLIPLoss(pca_dim=None)(out)
    assert no_pcm["short"].item() == pytest.approx(_clip(xn, sn, 20.0), abs=1e-5)
    assert set(LongCLIPLoss(short_weight=0)(out)) == {"long"}
    with pytest.raises(ValueError, match="short captions"):
        LongCLIPLoss()(ModelOutputs(x, long, t))


def test_forward_model_is_unchanged_in_value_and_the_kept_rows_get_no_gradient(tiny):
    from cliplab.surgery import stretch_positions

    long = stretch_positions(tiny, keep=20)
    model = long.model.train()
    images = torch.randn(4, 3, 32, 32)
    tokens = long.tokenize(["a red star", "two blue squares", "a ring",               # one reaches past row 20
                            "a picture of three shapes on a striped background with a red circle, a blue "
                            "square, a green star and more"])
    short = long.tokenize(["red", "blue", "circle", "ring"]).unsqueeze(1)                 # (B, 1, T)
    batch = Batch(images=images, tokens=tokens, extra_tokens=short)
    obj = LongCLIPLoss(keep=20, pca_dim=2)
    outputs = obj.forward_model(model, batch)
    with torch.no_grad():
        assert torch.equal(outputs.text_features, model.encode_text(tokens, normalize=True))
    sum(obj(outputs, batch).values()).backward()
    grad = model.positional_embedding.grad
    assert (grad[:20] == 0).all() and grad[20:].abs().sum() > 0
    assert isinstance(model.positional_embedding, torch.nn.Parameter)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in long.model.named_parameters()]
    model.zero_grad()
    LongCLIPLoss(keep=0, pca_dim=2)(LongCLIPLoss(keep=0).forward_model(model, batch), batch)["long"].backward()
    assert model.positional_embedding.grad[:20].abs().sum() > 0          # keep=0 trains every row


def test_finetune_keeps_the_first_rows_and_saves_a_loadable_long_model(tiny, tmp_path):
    import cliplab
    from cliplab.data.shapes import shapes_tiny_world
    from cliplab.surgery.longclip import LongCaptionSet, finetune_longclip

    world = shapes_tiny_world(2, n_objects=(1, 3), image_size=32)
    image, captions, extras = LongCaptionSet(world)[0]
    scene = world.scene("train", 0)
    assert captions == [scene.long_caption] and extras == {"extra_captions": [scene.short_caption]}
    tuned = finetune_longclip(tiny, 2, tmp_path / "run", world=world, batch_size=4, lr=1e-3, progress=False)
    p0, p1 = tiny.model.positional_embedding, tuned.model.positional_embedding
    assert tuned.context_length == 36 and p1.shape[0] == 36
    assert torch.equal(p1[:20], p0[:20]) and not torch.equal(p1[20:24], p0[20:24])
    back = cliplab.load(tmp_path / "run" / "model")
    texts = [scene.long_caption, scene.short_caption]
    assert back.context_length == 36
    np.testing.assert_array_equal(back.encode_texts(texts), tuned.encode_texts(texts))
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("loss_short") >= 1
