"""A-CLIP: attentive token selection, the EMA teacher, the losses, gradients, Trainer resume.

Its 2-rank run (model, heads and teacher in sync) is in test_losses_ddp.py.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.data.shapes import ShapesWorld
from cliplab.errors import UsageError
from cliplab.train import TrainConfig, Trainer, init_model
from cliplab.train.datasets import ShapesTrainSet
from cliplab.train.losses import Batch, ModelOutputs, get_loss
from cliplab.train.losses.aclip import (attentive_keep, byol_loss, crop_attention, ema_momentum, ema_update,
                                        simclr_loss, teacher_attention, vit_forward)
from cliplab.train.losses.infonce import infonce_loss

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _world():
    return ShapesWorld(seed=0, image_size=32, n_objects=(1, 2), split_sizes={"train": 32, "val": 4, "test": 4})


def _bound(steps=10, seed=0, **kw):
    built = init_model(CFG, loss="aclip", seed=seed)
    objective = get_loss("aclip", **kw)
    objective.setup(built.model, TrainConfig(steps=steps))
    return built, objective


def _batch(built, b=4, step=0):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, 32, 32, generator=g)
    tokens = built.tokenizer(["a red circle", "a blue square", "a green star", "a small red circle"][:b])
    return Batch(images=images, tokens=tokens, step=step)


# ------------------------------------------------------------------ token selection
def test_keeps_exactly_the_most_attended_blocks():
    # 8 x 8 patches = 4 x 4 blocks of 2 x 2; a distinct value per block, the same on its 4 patches
    block_values = torch.arange(16, dtype=torch.float64).reshape(4, 4)[torch.randperm(4)][:, torch.randperm(4)]
    att = block_values.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, 64)
    keep = attentive_keep(att, (8, 8), 0.5)
    n_blocks = int(16 * 0.5) + 1                                   # 9 blocks, the reference's floor + 1
    assert keep.shape == (1, 4 * n_blocks)
    top = set(torch.argsort(block_values.flatten(), descending=True)[:n_blocks].tolist())
    expected = sorted(p for p in range(64) if (p // 8 // 2) * 4 + (p % 8) // 2 in top)
    assert keep[0].tolist() == expected


def test_keep_follows_the_block_mean_and_the_ratio():
    att = torch.zeros(2, 16, dtype=torch.float64)                  # 4 x 4 patches, 2 x 2 blocks
    att[0, 0] = 4.0                                                # block 0 by one hot patch
    att[0, 15] = 3.0                                               # block 3
    att[0, 6] = 2.0                                                # block 1 (patch row 1, col 2)
    att[1, [10, 11, 14]] = 1.0                                     # block 3 is the only one lit
    keep = attentive_keep(att, (4, 4), 0.5)                        # int(4 * 0.5) + 1 = 3 blocks
    assert keep[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 14, 15]
    assert set([10, 11, 14, 15]) <= set(keep[1].tolist()) and keep.shape == (2, 12)
    assert attentive_keep(att, (4, 4), 0.0).shape == (2, 4)        # one block
    with pytest.raises(UsageError, match="even patch grid"):
        attentive_keep(torch.zeros(1, 9), (3, 3))


def test_view_attention_is_the_crop_of_the_map():
    grid = torch.zeros(8, 8)
    grid[:5, 3:] = 2.0                           # the top right quarter and a one-patch margin around it
    att = grid.reshape(1, 64)
    boxes = torch.tensor([[0, 32, 32, 32], [48, 0, 16, 16]])      # (top, left, h, w): top right, bottom left corner
    views = crop_attention(att.repeat(2, 1), (8, 8), (64, 64), boxes)
    torch.testing.assert_close(views[0], torch.full((64,), 2.0))
    torch.testing.assert_close(views[1], torch.zeros(64))


# ------------------------------------------------------------------ towers
def test_full_keep_is_the_open_clip_image_tower_and_attention_is_torchs():
    built, _ = _bound()
    model = built.model.eval()
    images = _batch(built).images
    keep = torch.arange(16).expand(4, 16)
    features, _ = vit_forward(model.visual, images, keep)
    torch.testing.assert_close(features, model.encode_image(images), atol=1e-5, rtol=0)
    # teacher attention = torch's MultiheadAttention weights, [CLS] row, mean over heads and layers
    att, _ = teacher_attention(model.visual, images)
    x = model.visual._embeds(images)
    maps = []
    for block in model.visual.transformer.resblocks:
        h = block.ln_1(x)
        maps.append(block.attn(h, h, h, need_weights=True, average_attn_weights=True)[1][:, 0, 1:])
        x = block(x)
    torch.testing.assert_close(att, torch.stack(maps).mean(0), atol=1e-6, rtol=0)
    # removing tokens changes the output; the kept ones alone decide it
    sub = torch.tensor([[0, 1, 4, 5]] * 4)
    f_sub, _ = vit_forward(model.visual, images, sub)
    f_perm, _ = vit_forward(model.visual, images, sub.flip(1))
    torch.testing.assert_close(f_sub, f_perm, atol=1e-5, rtol=0)
    assert not torch.allclose(f_sub, features, atol=1e-3)


# ------------------------------------------------------------------ EMA teacher
def test_momentum_schedule_and_ema_closed_form():
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    assert ema_momentum(100, 100) == pytest.approx(1.0)
    t, s = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    old = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for p_t, p_o, p_s in zip(t.parameters(), old, s.parameters()):
        torch.testing.assert_close(p_t, 0.9 * p_o + 0.1 * p_s, atol=1e-15, rtol=0)


def test_forward_updates_the_teacher_and_gradients_reach_only_the_online_side():
    built, obj = _bound(steps=10)
    model = built.model
    with torch.no_grad():                                          # a teacher that differs from the model
        for p in obj.teacher.parameters():
            p.add_(0.01)
    old_teacher = [p.clone() for p in obj.teacher.parameters()]
    online = [p.detach().clone() for p in model.visual.parameters()]
    batch = _batch(built, step=3)
    torch.manual_seed(0)
    outputs = obj.forward_model(model, batch)
    m = ema_momentum(3, 10)
    for p_t, p_o, p_s in zip(obj.teacher.parameters(), old_teacher, online):
        torch.testing.assert_close(p_t, m * p_o + (1 - m) * p_s, atol=1e-7, rtol=0)
    assert outputs.extras["keep"].shape == (2, 4, 12)              # 3 of 4 blocks: 12 of 16 patches
    terms = obj(outputs, batch)
    assert set(terms) == {"contrastive_1", "contrastive_2", "simclr", "byol"}
    sum(terms.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert all(p.grad is None for p in obj.teacher_projector.parameters())
    assert model.visual.conv1.weight.grad.abs().max() == 0          # frozen patch embedding: zero gradient
    for name in ("transformer.resblocks.0.mlp.c_fc.weight", "proj", "ln_post.weight", "class_embedding"):
        assert model.visual.get_parameter(name).grad.abs().max() > 0, name
    assert model.token_embedding.weight.grad.abs().max() > 0 and model.logit_scale.grad is not None
    for head in (obj.simclr_head, obj.byol_projector, obj.byol_predictor):
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in head.parameters())


def test_optimizer_groups_hold_the_heads_but_not_the_patch_embedding():
    built, obj = _bound()
    params = {id(p) for g in obj.parameter_groups(built.model, 0.1) for p in g["params"]}
    assert id(built.model.visual.conv1.weight) not in params
    assert id(built.model.visual.proj) in params
    assert all(id(p) in params for p in obj.byol_predictor.parameters())
    assert not any(id(p) in params for p in obj.teacher.parameters())
    with pytest.raises(UsageError, match="bound"):
        get_loss("aclip").parameter_groups(built.model, 0.1)


# ------------------------------------------------------------------ losses
def test_losses_equal_their_closed_forms():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.6, 0.8], [0.0, 2.0]], dtype=torch.float64)   # normalised inside: [0.6, 0.8], [0, 1]
    tau = 0.5
    # row 0 of view a: [a0.b0, a0.b1 | -inf, a0.a1] / tau, positive a0.b0
    la0 = -0.6 / tau + np.log(np.exp(0.6 / tau) + np.exp(0.0) + np.exp(0.0))
    la1 = -1.0 / tau + np.log(np.exp(0.8 / tau) + np.exp(1.0 / tau) + np.exp(0.0))
    lb0 = -0.6 / tau + np.log(np.exp(0.6 / tau) + np.exp(0.8 / tau) + np.exp(0.8 / tau))
    lb1 = -1.0 / tau + np.log(np.exp(0.0) + np.exp(1.0 / tau) + np.exp(0.8 / tau))
    assert simclr_loss(a, b, tau).item() == pytest.approx(((la0 + la1) / 2 + (lb0 + lb1) / 2) / 2, abs=1e-12)
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 3.0], [2.0, 2.0]], dtype=torch.float64)
    assert byol_loss(p, z).item() == pytest.approx((2.0 + 0.0) / 2, abs=1e-12)

    g = torch.Generator().manual_seed(0)
    x1, x2, y = (F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(3))
    s, on = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    target = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor(7.0, dtype=torch.float64)
    terms = get_loss("aclip", simclr_weight=0.5)(ModelOutputs(x1, y, t, extras={
        "image_features_2": x2, "simclr": s, "byol_online": on, "byol_target": target}))
    assert terms["contrastive_1"].item() == pytest.approx(0.5 * infonce_loss(x1, y, t).item(), abs=1e-12)
    assert terms["contrastive_2"].item() == pytest.approx(0.5 * infonce_loss(x2, y, t).item(), abs=1e-12)
    assert terms["simclr"].item() == pytest.approx(0.5 * simclr_loss(s[0], s[1], 0.1).item(), abs=1e-12)
    cos = F.cosine_similarity(on, target[None], dim=-1)
    assert terms["byol"].item() == pytest.approx(2 * (2 - 2 * cos).mean().item(), abs=1e-12)


# ------------------------------------------------------------------ Trainer
def _fit(out_dir, steps, stop_at=None, resume=False):
    built = init_model(CFG, loss="aclip", seed=0)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, ckpt_every=2, log_every=1,
                         out_dir=str(out_dir), loss="aclip", device="cpu")
    objective = get_loss("aclip")
    Trainer(built.model, built.tokenizer, built.preprocess, ShapesTrainSet(_world()), config,
            model_cfg=built.model_cfg, progress=False, objective=objective).fit(resume=resume, stop_at=stop_at)
    return built.model, objective


def test_trainer_runs_and_resumes_exactly(tmp_path):
    model_a, obj_a = _fit(tmp_path / "straight", 4)
    _fit(tmp_path / "split", 4, stop_at=2)
    state = torch.load(tmp_path / "split/checkpoints/step_0000002/trainer_state.pt", weights_only=True)
    assert any(k.startswith("teacher.") for k in state["objective"])          # the EMA teacher is checkpointed
    model_b, obj_b = _fit(tmp_path / "split", 4, resume=True)
    for k, v in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[k], v, atol=0, rtol=0, msg=k)
    for k, v in obj_a.state_dict().items():
        torch.testing.assert_close(obj_b.state_dict()[k], v, atol=0, rtol=0, msg=k)
    assert not torch.equal(obj_a.teacher.proj, model_a.visual.proj)            # the teacher lags behind
    rows = (tmp_path / "straight/metrics.csv").read_text().splitlines()[0]
    assert all(f"loss_{k}" in rows for k in ("contrastive_1", "contrastive_2", "simclr", "byol"))
