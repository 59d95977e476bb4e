"""Objectives (losses): registry, hand-computed values, parity with open_clip."""

import math

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.train.losses import ModelOutputs, get_loss, list_losses, register_loss
from cliplab.train.losses.infonce import infonce_loss
from cliplab.train.losses.sigmoid import sigmoid_loss


def _features(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return img, txt


def test_registry():
    assert {"infonce", "sigmoid"} <= set(list_losses())
    with pytest.raises(UsageError, match="unknown loss 'nope'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("infonce")(type("Other", (torch.nn.Module,), {}))


def _feature_losses() -> list[str]:
    """Losses computed from the paired features alone: not those that change the forward pass
    (aclip, lightclip) or read stored teacher outputs (mobileclip-dr); each of those has its own tests."""
    from cliplab.train.losses import Objective, get_loss_class

    return [n for n in list_losses() if not get_loss_class(n).needs_teacher
            and get_loss_class(n).forward_model is Objective.forward_model]


@pytest.mark.parametrize("name", _feature_losses())
def test_every_loss_returns_finite_terms_with_gradient(name):
    loss = get_loss(name)
    img, txt = _features(6, 8, 0)
    img.requires_grad_(True)
    scale = torch.tensor(math.exp(loss.init_logit_scale if loss.init_logit_scale is not None else 0.0))
    bias = None if loss.init_logit_bias is None else torch.tensor(loss.init_logit_bias)
    terms = loss(ModelOutputs(img, txt, scale, bias))
    assert isinstance(terms, dict) and terms
    total = sum(terms.values())
    assert total.ndim == 0 and torch.isfinite(total)
    total.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


def test_infonce_hand_2x2():
    # x0=(1,0), x1=(0,1); y0=(0.6,0.8), y1=(0.8,-0.6); t=2
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    z = np.array([[1.2, 1.6], [1.6, -1.2]])  # t * x_i . y_j
    i2t = -(z[0, 0] - np.log(np.exp(z[0]).sum())) - (z[1, 1] - np.log(np.exp(z[1]).sum()))
    t2i = -(z[0, 0] - np.log(np.exp(z[:, 0]).sum())) - (z[1, 1] - np.log(np.exp(z[:, 1]).sum()))
    expected = (i2t / 2 + t2i / 2) / 2
    assert infonce_loss(img, txt, 2.0).item() == pytest.approx(expected, abs=1e-6)
    wrapped = get_loss("infonce")(ModelOutputs(img, txt, torch.tensor(2.0)))["contrastive"]
    assert wrapped.item() == pytest.approx(expected, abs=1e-6)


def test_infonce_4x4_matches_numpy_and_open_clip():
    img, txt = _features(4, 5, 1)
    z = 3.0 * img.numpy().astype(np.float64) @ txt.numpy().astype(np.float64).T
    lse_rows = np.log(np.exp(z).sum(1))
    lse_cols = np.log(np.exp(z).sum(0))
    expected = ((lse_rows - np.diag(z)).mean() + (lse_cols - np.diag(z)).mean()) / 2
    ours = infonce_loss(img, txt, 3.0).item()
    wrapped = get_loss("infonce")(ModelOutputs(img, txt, torch.tensor(3.0)))["contrastive"].item()
    assert ours == pytest.approx(expected, abs=1e-5)
    assert wrapped == pytest.approx(ours, abs=1e-6)


def test_sigmoid_hand_2x2():
    # orthonormal pairs at SigLIP's init t=10, b=-10: z_ii = 0, z_ij = -10
    img = torch.eye(2)
    expected = (2 * math.log(2) + 2 * math.log1p(math.exp(-10))) / 2
    assert sigmoid_loss(img, img, 10.0, -10.0).item() == pytest.approx(expected, abs=1e-6)
    wrapped = get_loss("sigmoid")(ModelOutputs(img, img, torch.tensor(10.0), torch.tensor(-10.0)))["contrastive"]
    assert wrapped.item() == pytest.approx(expected, abs=1e-6)


def test_sigmoid_matches_open_clip_on_random_features():
    img, txt = _features(5, 7, 2)
    ours = sigmoid_loss(img, txt, 4.0, -2.0)
    wrapped = get_loss("sigmoid")(ModelOutputs(img, txt, torch.tensor(4.0), torch.tensor(-2.0)))["contrastive"]
    torch.testing.assert_close(wrapped, ours, atol=1e-6, rtol=0)


def test_bias_contract():
    img, txt = _features(3, 4, 3)
    with pytest.raises(ValueError, match="no logit_bias"):
        get_loss("infonce")(ModelOutputs(img, txt, torch.tensor(1.0), torch.tensor(0.0)))
    with pytest.raises(ValueError, match="needs a logit_bias"):
        get_loss("sigmoid")(ModelOutputs(img, txt, torch.tensor(1.0)))


@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_objectives_equal_open_clip_losses_value_and_gradient(name):
    # What the Trainer computed before the objective interface: open_clip's loss on the raw features.
    from open_clip.loss import ClipLoss, SigLipLoss

    img, txt = _features(6, 8, 4)
    scale, bias = torch.tensor(5.0), (torch.tensor(-3.0) if name == "sigmoid" else None)
    reference = ClipLoss(local_loss=False, gather_with_grad=True) if name == "infonce" else SigLipLoss()
    results = []
    for fn in (lambda i, t: get_loss(name)(ModelOutputs(i, t, scale, bias))["contrastive"],
               lambda i, t: reference(i, t, scale) if bias is None else reference(i, t, scale, bias)):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        value = fn(i, t)
        value.backward()
        results.append((value.detach(), i.grad, t.grad))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
