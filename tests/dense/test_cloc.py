"""CLOC Prompter: region embeddings, the identity at init, the losses, training, save/load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.data.shapes.dense import dense_world
from cliplab.dense.cloc import (
    ClocModel,
    Prompter,
    RegionScenes,
    cloc_loss,
    crop_and_encode,
    ground,
    grounding_loss,
    load_prompter,
    region_embeddings,
    roi_mean_embeddings,
    save_prompter,
    sinusoidal_encoding,
    train_cloc,
)
from cliplab.errors import CheckpointMismatch, UsageError


def _images(n=3, size=32, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _boxes(n, k, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 1, (n, k, 2)), rng.uniform(0, 1, (n, k, 2))
    return np.concatenate([np.minimum(a, b), np.maximum(a, b)], -1).astype(np.float32)


def _trained_like(prompter, seed=0):
    """Perturb every parameter so that no part is at its zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prompter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return prompter


def test_region_embeddings_have_one_unit_vector_per_box(tiny):
    prompter = _trained_like(Prompter.from_backbone(tiny))
    emb = region_embeddings(tiny, prompter, _images(3), _boxes(3, 5))
    assert emb.shape == (3, 5, tiny.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    assert np.abs(emb[:, 0] - emb[:, 1]).max() > 1e-3                    # a trained prompter reads the box
    # each image's regions depend on that image only (batching does not mix images)
    one = region_embeddings(tiny, prompter, _images(3)[1:2], _boxes(3, 5)[1:2])
    np.testing.assert_allclose(one[0], emb[1], atol=1e-5)


def test_a_whole_image_box_at_init_is_the_mean_pooled_projected_tokens(tiny):
    images = _images(4)
    prompter = Prompter.from_backbone(tiny)
    whole = np.tile(np.array([0, 0, 1, 1], np.float32), (4, 1, 1))         # (N, 1, 4)
    emb = region_embeddings(tiny, prompter, images, whole)[:, 0]
    pooled = tiny.image_tokens(images, project=True).mean(1)              # (N, D)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(emb, pooled, atol=1e-5)


def test_tokens_at_a_larger_input_are_the_interpolated_tower(tiny):
    """At the tower's own size the Prompter's tokens are open_clip's; larger inputs run too."""
    images = _images(2, size=64)
    big = Prompter.from_backbone(tiny, image_size=64)
    emb = region_embeddings(tiny, big, images, _boxes(2, 3))
    assert emb.shape == (2, 3, tiny.embed_dim)
    with pytest.raises(UsageError, match="shape"):
        region_embeddings(tiny, big, images, _boxes(2, 3)[0])
    with pytest.raises(UsageError, match="normalised"):
        region_embeddings(tiny, big, images, _boxes(2, 3) * 32)


def test_sinusoidal_encoding_layout():
    enc = sinusoidal_encoding(torch.tensor([[0.25, 0.5]]), 2)               # (1, 8)
    expected = [math.sin(math.pi / 4), math.sin(math.pi / 2), math.cos(math.pi / 4), math.cos(math.pi / 2),
                math.sin(math.pi / 2), math.sin(math.pi), math.cos(math.pi / 2), math.cos(math.pi)]
    np.testing.assert_allclose(enc[0].numpy(), expected, atol=1e-6)


def test_cloc_loss_matches_the_closed_form_on_hand_made_features():
    r = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    t = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), dim=-1)   # captions 1 and 2 identical
    s = 2.0
    logits = s * (r @ t.T).numpy()

    def ce(rows, dropped):
        return np.mean([np.log(sum(np.exp(row[j]) for j in range(3) if j == i or (i, j) not in dropped)) - row[i]
                        for i, row in enumerate(rows)])

    plain = 0.5 * (ce(logits, set()) + ce(logits.T, set()))
    assert cloc_loss(r, t, s, duplicate_threshold=None).item() == pytest.approx(plain, abs=1e-5)
    dedup = 0.5 * (ce(logits, {(1, 2), (2, 1)}) + ce(logits.T, {(1, 2), (2, 1)}))
    assert cloc_loss(r, t, s).item() == pytest.approx(dedup, abs=1e-5)
    # padding rows are left out; random embeddings give about log(N)
    valid = torch.tensor([True, False, True])
    sub = logits[[0, 2]][:, [0, 2]]
    kept = 0.5 * (np.mean([np.log(np.exp(sub[i]).sum()) - sub[i, i] for i in range(2)])
                  + np.mean([np.log(np.exp(sub.T[i]).sum()) - sub.T[i, i] for i in range(2)]))
    assert cloc_loss(r, t, s, valid=valid, duplicate_threshold=None).item() == pytest.approx(kept, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    rnd = F.normalize(torch.randn(256, 64, generator=g), dim=-1), F.normalize(torch.randn(256, 64, generator=g), dim=-1)
    assert cloc_loss(*rnd, 1.0, duplicate_threshold=None).item() == pytest.approx(math.log(256), rel=0.02)


def test_grounding_loss_is_the_mean_squared_coordinate_error():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [9.0, 9.0, 9.0, 9.0]])
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    assert grounding_loss(pred, boxes, valid).item() == pytest.approx((0.25 + 0.5) / 2 / 4)


def test_a_short_trainer_run_lowers_the_loss_and_leaves_the_backbone_bit_identical(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    grads = [p.requires_grad for p in tiny.model.parameters()]
    world = dense_world(seed=0, image_size=64, n_objects=(2, 4))
    train_set = RegionScenes(world, "train", 8, 32, k=2, repeats=4)
    prompter = train_cloc(tiny, 16, tmp_path / "run", train_set=train_set, batch_size=8, lr=3e-3,
                          warmup_steps=0, log_every=4, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_cloc", "loss_ground"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny.model.parameters()] == grads      # as the caller had them
    assert (tmp_path / "run" / "prompter" / "prompter.safetensors").is_file()
    boxes = ground(tiny, prompter, _images(2), [["a red circle", "a blue star"]] * 2)
    assert boxes.shape == (2, 2, 4) and boxes.min() >= 0 and boxes.max() <= 1
    assert (boxes[..., 2:] >= boxes[..., :2]).all()


def test_the_token_cache_is_exact(tiny):
    prompter = _trained_like(Prompter.from_backbone(tiny))
    grads = [p.requires_grad for p in tiny.model.parameters()]
    cached, plain = ClocModel(tiny.model, prompter), ClocModel(tiny.model, prompter, cache_mb=0)
    x = torch.randn(3, 3, 32, 32)
    first, grid = cached.image_tokens(x)
    again, _ = cached.image_tokens(x[[2, 0]])
    ref, _ = plain.image_tokens(x)
    assert grid == (4, 4) and torch.equal(first, ref) and torch.equal(again, ref[[2, 0]])
    for p, g in zip(tiny.model.parameters(), grads):
        p.requires_grad_(g)


def test_save_load_round_trip(tiny, tmp_path):
    prompter = _trained_like(Prompter.from_backbone(tiny, heads=2, n_freqs=4, image_size=64))
    save_prompter(prompter, tmp_path / "p", backbone=tiny)
    back = load_prompter(tmp_path / "p", backbone=tiny)
    assert back.config == prompter.config
    for k, v in prompter.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    images, boxes = _images(2, size=64), _boxes(2, 3)
    np.testing.assert_array_equal(region_embeddings(tiny, back, images, boxes),
                                  region_embeddings(tiny, prompter, images, boxes))
    with pytest.raises(UsageError, match="no prompter"):
        load_prompter(tmp_path / "nothing")
    record = json.loads((tmp_path / "p" / "prompter.json").read_text())
    record["config"]["width"] += 1
    (tmp_path / "p" / "prompter.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointMismatch, match="width"):
        load_prompter(tmp_path / "p", backbone=tiny)


def test_baselines_crop_and_roi_mean(tiny):
    images, boxes = _images(2), _boxes(2, 3)
    crop = crop_and_encode(tiny, images, boxes)
    assert crop.shape == (2, 3, tiny.embed_dim)
    # the whole-image box of a model-sized image is the image itself
    whole = np.array([[[0, 0, 1, 1]]] * 2, np.float32)
    np.testing.assert_allclose(crop_and_encode(tiny, images, whole)[:, 0], tiny.encode_images(images).features,
                               atol=1e-5)
    roi = roi_mean_embeddings(tiny, images, whole)[:, 0]
    pooled = tiny.image_tokens(images, project=True).mean(1)
    np.testing.assert_allclose(roi, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), atol=1e-5)
    # a box inside one patch takes that patch's token
    one = roi_mean_embeddings(tiny, images, np.array([[[0.3, 0.3, 0.32, 0.32]]] * 2, np.float32))[:, 0]
    patch = tiny.image_tokens(images, project=True)[:, 1 * 4 + 1]          # grid 4 x 4, row 1, col 1
    np.testing.assert_allclose(one, patch / np.linalg.norm(patch, axis=-1, keepdims=True), atol=1e-5)
