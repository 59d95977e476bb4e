"""CLIP-SVD surgery on the tiny CLIP: identity at init, only singular values train."""

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from cliplab.errors import UsageError
from cliplab.surgery import apply_lora, apply_svd, trainable_parameters
from cliplab.surgery.layers import find_layers
from cliplab.surgery.svd import SVDWeight

from _tiny import TEXTS, features, snapshot


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


def test_identity_at_init(tiny, images):
    sb = apply_svd(tiny)
    for got, want in zip(features(sb, images), features(tiny, images)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    qkv = sb.model.visual.transformer.resblocks[0].attn
    torch.testing.assert_close(qkv.in_proj_weight,
                               tiny.model.visual.transformer.resblocks[0].attn.in_proj_weight,
                               atol=1e-5, rtol=0)


def test_every_linear_layer_factorised(tiny):
    sb = apply_svd(tiny)
    layers = find_layers(sb.model)
    assert len(layers) == 4 * 4                                        # 4 layers × 4 blocks
    for key, (mod, attr) in layers.items():
        assert parametrize.is_parametrized(mod, attr), key
        s = getattr(mod.parametrizations, attr).original              # (blocks, k)
        assert s.shape[0] == (3 if attr == "in_proj_weight" else 1)   # q, k, v on their own
        assert torch.all(s >= 0)
        assert torch.all(s[:, :-1] >= s[:, 1:] - 1e-6)                # sorted descending


def test_only_singular_values_train(tiny, images):
    sb = apply_svd(tiny)
    trainable = [n for n, p in sb.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".original") for n in trainable)
    n_train, n_total = trainable_parameters(sb)
    expected = sum(3 * 64 if a == "in_proj_weight" else min(getattr(m, a).shape)
                   for m, a in find_layers(tiny.model).values())
    assert n_train == expected == 4 * 6 * 64                          # 6W per block
    assert n_total > n_train

    before = snapshot(sb.model)
    sb.model.train()
    out = sb.model.encode_image(images).pow(2).sum() + sb.model.encode_text(sb.tokenize(TEXTS)).pow(2).sum()
    out.backward()
    params = dict(sb.model.named_parameters())
    assert all(params[n].grad is None for n in params if n not in trainable)
    torch.optim.SGD([params[n] for n in trainable], lr=0.1).step()
    after = snapshot(sb.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(trainable)                                   # U, V, biases, rest unchanged


def test_original_not_mutated_and_towers(tiny, images):
    before = snapshot(tiny.model)
    sb = apply_svd(tiny, towers=("visual",))
    assert all(k.startswith("visual.") for k in find_layers(sb.model, towers=("visual",)))
    assert not any(isinstance(m, SVDWeight) for m in sb.model.transformer.modules())
    assert trainable_parameters(sb)[0] == 2 * 6 * 64
    after = snapshot(tiny.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(parametrize.is_parametrized(m) for m in tiny.model.modules())


def test_errors(tiny):
    with pytest.raises(UsageError, match="towers"):
        apply_svd(tiny, towers=("audio",))
    with pytest.raises(UsageError, match="merge_lora"):
        apply_svd(apply_lora(tiny))
