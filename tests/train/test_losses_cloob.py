"""CLOOB: InfoLOOB and Hopfield retrieval against their closed forms, the fixed temperature, the model init."""

import math

import numpy as np
import pytest
import torch

from cliplab.train import init_model
from cliplab.train.losses import ModelOutputs, get_loss
from cliplab.train.losses.cloob import cloob_loss, hopfield_retrieval, infoloob_loss

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _unit(rows):
    a = np.asarray(rows, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _np_infoloob(a, b, inv_tau):
    z = inv_tau * a @ b.T
    n = len(z)
    return np.mean([-z[i, i] + np.log(sum(np.exp(z[i, j]) for j in range(n) if j != i)) for i in range(n)])


def _np_ret(s, p, beta):
    w = np.exp(beta * s @ p.T)
    u = (w / w.sum(1, keepdims=True)) @ p
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def test_infoloob_leaves_the_positive_out_of_the_denominator():
    # 2 pairs: each row's denominator holds only its one negative, so L = mean(z_ij - z_ii)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    z = 2.0 * a.numpy() @ b.numpy().T
    expected = ((z[0, 1] - z[0, 0]) + (z[1, 0] - z[1, 1])) / 2
    assert infoloob_loss(a, b, 2.0).item() == pytest.approx(expected, abs=1e-12)
    # 4 pairs against the loop over j != i; InfoNCE would be larger (positive in its denominator)
    a, b = _unit(np.random.default_rng(0).normal(size=(4, 3))), _unit(np.random.default_rng(1).normal(size=(4, 3)))
    ours = infoloob_loss(torch.from_numpy(a), torch.from_numpy(b), 3.0).item()
    assert ours == pytest.approx(_np_infoloob(a, b, 3.0), abs=1e-12)
    z = 3.0 * a @ b.T
    assert ours < np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))


def test_infoloob_gradient_ignores_the_positive_in_the_denominator():
    # With 2 pairs, L = mean_i inv_tau (a_i.b_j - a_i.b_i): dL/da_0 = inv_tau (b_1 - b_0) / 2 exactly
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    infoloob_loss(a, b, 2.0).backward()
    torch.testing.assert_close(a.grad[0], 2.0 * (b[1] - b[0]) / 2, atol=1e-12, rtol=0)


def test_infoloob_needs_two_pairs():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        infoloob_loss(torch.ones(1, 2), torch.ones(1, 2), 1.0)


def test_hopfield_retrieval_large_beta_returns_the_nearest_stored_pattern():
    stored = torch.from_numpy(_unit([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]))
    state = torch.from_numpy(_unit([[0.9, 0.1, 0.0], [0.1, 0.2, 0.9], [0.6, 0.5, 0.1], [0.0, 1.0, 0.05]]))
    nearest = (state @ stored.T).argmax(1)                                 # [0, 2, 3, 1]
    assert nearest.tolist() == [0, 2, 3, 1]
    torch.testing.assert_close(hopfield_retrieval(state, stored, 1e4), stored[nearest], atol=1e-9, rtol=0)
    # beta = 0 averages the whole memory; in between, the closed form
    mean = stored.mean(0, keepdim=True)
    torch.testing.assert_close(hopfield_retrieval(state, stored, 0.0), (mean / mean.norm()).expand(4, 3))
    torch.testing.assert_close(hopfield_retrieval(state, stored, 2.5),
                               torch.from_numpy(_np_ret(state.numpy(), stored.numpy(), 2.5)), atol=1e-12, rtol=0)


def test_cloob_loss_closed_form():
    rng = np.random.default_rng(2)
    x, y = _unit(rng.normal(size=(5, 4))), _unit(rng.normal(size=(5, 4)))
    inv_tau, beta = 14.3, 8.0
    u_x, u_y = _np_ret(x, x, beta), _np_ret(y, x, beta)
    v_x, v_y = _np_ret(x, y, beta), _np_ret(y, y, beta)
    expected = (_np_infoloob(u_x, u_y, inv_tau) + _np_infoloob(v_y, v_x, inv_tau)) / inv_tau
    ours = cloob_loss(torch.from_numpy(x), torch.from_numpy(y), inv_tau, beta).item()
    assert ours == pytest.approx(expected, abs=1e-12)
    wrapped = get_loss("cloob", scale_hopfield=beta)(
        ModelOutputs(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(inv_tau, dtype=torch.float64)))
    assert wrapped["contrastive"].item() == pytest.approx(expected, abs=1e-12)


def test_temperature_is_fixed_unless_learnable_and_both_towers_get_gradient():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_(True)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_(True)
    log_scale = torch.tensor(math.log(14.3), requires_grad=True)
    get_loss("cloob")(ModelOutputs(img, txt, log_scale.exp()))["contrastive"].backward()
    assert log_scale.grad is not None and log_scale.grad.item() == 0.0    # used (DDP) but never moved
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    log_scale.grad = None
    get_loss("cloob", learnable_inv_tau=True)(ModelOutputs(img, txt, log_scale.exp()))["contrastive"].backward()
    assert log_scale.grad.item() != 0.0


def test_model_starts_at_the_reference_inverse_temperature():
    model = init_model(CFG, loss="cloob").model
    assert model.logit_scale.exp().item() == pytest.approx(14.3, rel=1e-6)
    assert getattr(model, "logit_bias", None) is None
    assert "init_logit_scale" not in init_model(CFG, loss="infonce").model_cfg   # CLIP's own default untouched
