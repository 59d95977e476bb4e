"""Clipped softmax and gated attention (Quantizable Transformers) on the tiny CLIP."""

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.surgery import apply_outlier_free
from cliplab.surgery.outlier_free import OutlierFreeAttention, clipped_softmax, gamma_for_length

from _tiny import features, snapshot


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


def test_clipped_softmax_gives_exact_zeros_with_zero_gradient():
    x = torch.tensor([[8.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, -0.5]], requires_grad=True)
    p = clipped_softmax(x, gamma=-0.025, zeta=1.0).detach()
    plain = torch.softmax(x, -1).detach()
    # row 0: the dominant key gets 0.99..., the others fall below -gamma/(zeta-gamma) and clip to exactly 0
    assert torch.equal(p[0, 1:], torch.zeros(3))
    assert p[0, 0] == pytest.approx(min(1.0, 1.025 * float(plain[0, 0]) - 0.025), abs=1e-7)
    assert torch.allclose(p[1], 1.025 * plain[1] - 0.025)                 # no entry clipped: stretched softmax
    g = torch.autograd.grad(clipped_softmax(x, -0.025)[0, 1], x)[0]
    assert torch.equal(g, torch.zeros_like(x))                            # clipped entry: no gradient at all


def test_clipped_softmax_limits_and_masks():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clipped_softmax(x, 0.0, 1.0), torch.softmax(x, -1))
    masked = x.clone()
    masked[:, 2] = float("-inf")
    assert torch.equal(clipped_softmax(masked, -0.1)[:, 2], torch.zeros(3))
    with pytest.raises(UsageError, match="gamma <= 0"):
        clipped_softmax(x, 0.1)
    with pytest.raises(UsageError, match="zeta >= 1"):
        clipped_softmax(x, -0.1, 0.5)
    assert gamma_for_length(3.2, 128) == pytest.approx(-0.025)


@pytest.mark.parametrize("kw", [{"softmax": "vanilla"}, {"softmax": "vanilla", "gate": "linear"},
                                {"softmax": "vanilla", "gate": "mlp"}])
def test_explicit_attention_and_zero_gates_equal_the_original(tiny, images, kw):
    before = snapshot(tiny.model)
    ref_img, ref_txt = features(tiny, images)
    new = apply_outlier_free(tiny, **kw)
    img, txt = features(new, images)
    np.testing.assert_allclose(img, ref_img, atol=1e-5)
    np.testing.assert_allclose(txt, ref_txt, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())   # input untouched
    n = sum(isinstance(m, OutlierFreeAttention) for m in new.model.modules())
    assert n == 4                                                       # 2 image + 2 text blocks


def test_gated_attention_at_its_fine_tuning_init_trains_every_gate_weight(tiny, images):
    new = apply_outlier_free(tiny, softmax="vanilla", gate="mlp")     # fine-tuning init: equal to the original
    new.model.encode_image(images).pow(2).sum().backward()
    gates = new.model.visual.transformer.resblocks[1].attn.gates
    assert gates.w1.grad.abs().sum() == 0 and gates.w2.grad.abs().sum() > 0   # w2 = 0 blocks w1's first step only
    assert torch.equal(gates.w2.detach(), torch.zeros_like(gates.w2)) and gates.w1.detach().std() > 0


def test_gates_and_clipping_train(tiny, images):
    rule = apply_outlier_free(tiny, softmax="clipped", towers="image").model.visual.transformer.resblocks[0].attn
    assert rule.gamma == pytest.approx(-4.0 / 17)                      # alpha 4 over 16 patches + class token
    # at random init attention is near uniform (1/17 per key): gamma -4/17 would clip every weight
    new = apply_outlier_free(tiny, softmax="clipped", gamma=-0.02, gate="mlp", init_std=None)
    attn = new.model.visual.transformer.resblocks[0].attn
    out = new.model.encode_image(images).sum()
    out.backward()
    assert attn.gates.w1.grad is not None and attn.gates.w1.grad.abs().sum() > 0


def test_bool_and_float_masks_agree():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    attn = OutlierFreeAttention(mha)
    x = torch.randn(2, 5, 16)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    additive = torch.zeros(5, 5).masked_fill(causal, float("-inf"))
    a, _ = attn(x, x, x, attn_mask=causal)
    b, _ = attn(x, x, x, attn_mask=additive)
    ref, _ = mha(x, x, x, attn_mask=additive, need_weights=False)
    assert torch.allclose(a, b) and torch.allclose(a, ref, atol=1e-6)


def test_errors(tiny):
    with pytest.raises(UsageError, match="softmax must be"):
        apply_outlier_free(tiny, softmax="sparse")
    with pytest.raises(UsageError, match="gate must be"):
        apply_outlier_free(tiny, gate="conv")
    with pytest.raises(UsageError, match="pi_init"):
        apply_outlier_free(tiny, gate="linear", pi_init=1.0)
    with pytest.raises(UsageError, match="towers"):
        apply_outlier_free(tiny, towers="audio")
