"""LoRA surgery on the tiny CLIP: identity at init, merge/unmerge, freezing, save/load."""

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from cliplab.errors import CheckpointMismatch, UsageError
from cliplab.surgery import (apply_lora, load_lora, lora_state_dict, merge_lora, save_lora,
                             trainable_parameters, unmerge_lora)
from cliplab.surgery.layers import find_layers
from cliplab.surgery.lora import LoRALinear

from _tiny import TEXTS, features, snapshot


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


def perturb(bb, seed=1):
    """Stand-in for a training step: random A and non-zero B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_identity_at_init(tiny, images):
    lb = apply_lora(tiny)
    for got, want in zip(features(lb, images), features(tiny, images)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert all(torch.all(t == 0) for k, t in lora_state_dict(lb).items() if k.endswith("lora_B"))


def test_adapts_fused_qkv_and_all_targets(tiny):
    lb = apply_lora(tiny, rank=2)
    keys = lora_state_dict(lb)
    n_blocks = 4  # 2 visual + 2 text residual blocks
    assert len(keys) == 2 * 4 * n_blocks
    qkv = keys["visual.transformer.resblocks.0.attn.in_proj.lora_B"]
    assert qkv.shape == (3 * 64, 2)                                   # one B over the fused (3W, W)
    assert keys["transformer.resblocks.1.attn.in_proj.lora_A"].shape == (2, 64)
    assert isinstance(lb.model.transformer.resblocks[0].mlp.c_fc, LoRALinear)
    assert parametrize.is_parametrized(lb.model.transformer.resblocks[0].attn, "in_proj_weight")


def test_only_adapters_train_and_frozen_weights_stay(tiny, images):
    lb = apply_lora(tiny)
    trainable = [n for n, p in lb.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    before = snapshot(lb.model)
    lb.model.train()
    out = lb.model.encode_image(images).pow(2).sum() + lb.model.encode_text(lb.tokenize(TEXTS)).pow(2).sum()
    out.backward()
    params = dict(lb.model.named_parameters())
    assert all(params[n].grad is None for n in params if n not in trainable)
    opt = torch.optim.SGD([params[n] for n in trainable], lr=0.1)
    opt.step()
    after = snapshot(lb.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)
    assert any(k.endswith("lora_B") for k in changed)                # B = 0 gets the gradient first


def test_merge_equals_unmerged_forward_and_unmerge_restores(tiny, images):
    lb = apply_lora(tiny)
    perturb(lb)
    merged = merge_lora(lb)
    for got, want in zip(features(merged, images), features(lb, images)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) or parametrize.is_parametrized(m)
                   for m in merged.model.modules())
    assert set(merged.model.state_dict()) == set(tiny.model.state_dict())  # a plain checkpoint
    assert not np.allclose(features(merged, images)[0], features(tiny, images)[0], atol=1e-3)

    back = unmerge_lora(merged)
    want, got = snapshot(lb.model), snapshot(back.model)
    assert set(got) == set(want)
    for k in want:
        if k.endswith(("lora_A", "lora_B")):
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    for got_f, want_f in zip(features(back, images), features(lb, images)):
        np.testing.assert_allclose(got_f, want_f, atol=1e-6)


def test_original_backbone_not_mutated(tiny, images, tmp_path):
    before = snapshot(tiny.model)
    flags = {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    feats = features(tiny, images)
    lb = apply_lora(tiny)
    perturb(lb)
    unmerge_lora(merge_lora(lb))
    load_lora(tiny, save_lora(lb, tmp_path / "a.safetensors"))
    after = snapshot(tiny.model)
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in tiny.model.named_parameters()}
    assert not any(parametrize.is_parametrized(m) for m in tiny.model.modules())
    for got, want in zip(features(tiny, images), feats):
        np.testing.assert_array_equal(got, want)


def test_save_load_round_trip(tiny, images, tmp_path):
    lb = apply_lora(tiny, rank=3, alpha=6, targets=("attn.in_proj", "mlp.c_proj"))
    perturb(lb, seed=2)
    path = save_lora(lb, tmp_path / "adapter.safetensors")
    state = lora_state_dict(lb)
    assert path.stat().st_size < 4 * sum(t.numel() for t in state.values()) + 4096  # adapter only
    loaded = load_lora(tiny, path)
    got = lora_state_dict(loaded)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    for got_f, want_f in zip(features(loaded, images), features(lb, images)):
        np.testing.assert_array_equal(got_f, want_f)
    with pytest.raises(UsageError, match="rank"):
        load_lora(tiny, path, rank=4)


def test_load_rejects_foreign_file(tiny, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointMismatch, match="save_lora"):
        load_lora(tiny, tmp_path / "x.safetensors")


def test_trainable_parameter_count(tiny):
    rank = 4
    lb = apply_lora(tiny, rank=rank)
    n_train, n_total = trainable_parameters(lb)
    expected = sum(rank * sum(getattr(m, a).shape) for m, a in find_layers(tiny.model).values())
    assert n_train == expected == 16384                                # r·(in + out) per layer
    assert n_total == trainable_parameters(tiny)[1] + n_train

    vis = apply_lora(tiny, rank=rank, targets=("mlp.c_fc",), towers=("visual",))
    assert set(lora_state_dict(vis)) == {f"visual.transformer.resblocks.{i}.mlp.c_fc.lora_{m}"
                                         for i in range(2) for m in "AB"}
    assert trainable_parameters(vis)[0] == 2 * rank * (64 + 256)


def test_errors(tiny):
    with pytest.raises(UsageError, match="rank"):
        apply_lora(tiny, rank=0)
    with pytest.raises(UsageError, match="alpha"):
        apply_lora(tiny, alpha=-1)
    with pytest.raises(UsageError, match="targets"):
        apply_lora(tiny, targets=("attn.qkv",))
    with pytest.raises(UsageError, match="towers"):
        apply_lora(tiny, towers=("audio",))
    lb = apply_lora(tiny)
    with pytest.raises(UsageError, match="already"):
        apply_lora(lb)
    with pytest.raises(UsageError, match="no LoRA"):
        merge_lora(tiny)
    with pytest.raises(UsageError, match="merge_lora"):
        unmerge_lora(lb)
