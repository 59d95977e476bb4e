"""Hard-negative InfoNCE (UniME): reduction to InfoNCE, mining, weighting, false-negative filter, gradients."""

import math

import numpy as np
import pytest
import torch

from cliplab.train import init_model
from cliplab.train.losses import ModelOutputs, get_loss
from cliplab.train.losses.hard_negatives import hard_negative_nce
from cliplab.train.losses.infonce import infonce_loss


def _features(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    txt = torch.nn.functional.normalize(img + torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return img, txt


def test_all_negatives_no_filter_weight_zero_is_infonce():
    img, txt = _features(7, 5, 0)
    loss = get_loss("hard-negatives", topk=None, margin=math.inf, hardness=0.0)
    ours = loss(ModelOutputs(img, txt, torch.tensor(3.0, dtype=torch.float64)))["contrastive"]
    torch.testing.assert_close(ours, infonce_loss(img, txt, 3.0), atol=1e-12, rtol=0)
    # topk >= N-1 is the same as keeping all of them
    assert hard_negative_nce(img, txt, 3.0, topk=50, margin=math.inf).item() == pytest.approx(
        hard_negative_nce(img, txt, 3.0, topk=None, margin=math.inf).item(), abs=1e-12)


def test_topk_keeps_the_hardest_negatives_closed_form():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    k = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.28, 0.96]], dtype=torch.float64)
    s = (q @ k.T).numpy()          # s[0] = [0.8, 0, 0.28]: query 0's hardest negative is key 2
    t = 5.0
    expected = []
    for i in range(3):
        neg = max((j for j in range(3) if j != i), key=lambda j: s[i, j])
        expected.append(-t * s[i, i] + np.log(np.exp(t * s[i, i]) + np.exp(t * s[i, neg])))
    assert hard_negative_nce(q, k, t, topk=1, margin=math.inf).item() == pytest.approx(np.mean(expected), abs=1e-12)


def test_hardness_weights_closed_form():
    img, txt = _features(5, 4, 1)
    t, h = 4.0, 1.5
    z = (t * img @ txt.T).numpy()
    expected = []
    for i in range(5):
        neg = np.array([z[i, j] for j in range(5) if j != i])
        w = len(neg) * np.exp(h * neg) / np.exp(h * neg).sum()      # HCL weights, mean 1
        expected.append(-z[i, i] + np.log(np.exp(z[i, i]) + (w * np.exp(neg)).sum()))
    ours = hard_negative_nce(img, txt, t, topk=None, margin=math.inf, hardness=h).item()
    assert ours == pytest.approx(np.mean(expected), abs=1e-12)
    assert ours > hard_negative_nce(img, txt, t, topk=None, margin=math.inf, hardness=0.0).item()


def test_false_negative_filter_drops_a_duplicate_caption():
    img, txt = _features(6, 8, 2)
    txt = txt.clone()
    txt[4] = txt[1]                                                   # two images share a caption
    t = 10.0
    with_dup = hard_negative_nce(img, txt, t, topk=None, margin=0.0)
    # margin 0 drops every key at least as similar as the positive, so caption 4 for query 1 and
    # caption 1 for query 4; by hand: each row's denominator over the keys that survive
    s = (img @ txt.T).numpy()
    expected = []
    for i in range(6):
        keep = [j for j in range(6) if j != i and s[i, j] < s[i, i]]
        assert (i not in (1, 4)) or ({1, 4} - {i}).isdisjoint(keep)
        expected.append(-t * s[i, i] + np.log(np.exp(t * s[i, i]) + sum(np.exp(t * s[i, j]) for j in keep)))
    assert with_dup.item() == pytest.approx(np.mean(expected), abs=1e-12)
    # with no filter the duplicate stays a negative and costs at least log 2 on its rows
    assert hard_negative_nce(img, txt, t, topk=None, margin=math.inf).item() > with_dup.item()


def test_gradient_reaches_only_the_positive_and_the_mined_negatives():
    # queries = identity rows, so s = keys.T and keys.grad.T is dL/ds entry by entry
    n = 10
    q = torch.eye(n, dtype=torch.float64)
    keys = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(True)
    hard_negative_nce(q, keys, 5.0, topk=2, margin=0.0).backward()
    s, grad = keys.detach().T, keys.grad.T                                  # (N, N) s_ij, dL/ds_ij
    for i in range(n):
        survivors = [j for j in range(n) if j != i and s[i, j] < s[i, i]]  # filter (F), margin 0
        mined = set(sorted(survivors, key=lambda j: -s[i, j].item())[:2])  # top-2 (K)
        assert {j for j in range(n) if grad[i, j] != 0} == {i} | mined, i


def test_model_starts_at_unime_temperature_and_train_it():
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    assert init_model(cfg, loss="hard-negatives").model.logit_scale.exp().item() == pytest.approx(50.0, rel=1e-6)
    img, txt = _features(12, 8, 4, torch.float32)
    scale = torch.tensor(math.log(50.0), requires_grad=True)
    get_loss("hard-negatives")(ModelOutputs(img, txt, scale.exp()))["contrastive"].backward()
    assert scale.grad.item() != 0.0                                  # the temperature is learnable
    with pytest.raises(ValueError, match="topk"):
        get_loss("hard-negatives", topk=0)
