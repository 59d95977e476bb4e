"""The ranking-aware adapter: its loss, the pair head's identities, fit/predict/save on a tiny CLIP."""

import numpy as np
import pytest
import torch

from cliplab.adapt import RankingAdapter, load_adapter, load_ranker, save_adapter, save_ranker
from cliplab.adapt.ranking import RankAdapterNet, pair_labels, ranking_loss
from cliplab.errors import DataError, UsageError

SMALL = dict(n_text_tokens=4, layers=1, heads=2, n_queries=3, epochs=3, batch_size=4)


def _net(seed=0, width=16, text_width=None):
    torch.manual_seed(seed)
    return RankAdapterNet(width, text_width, n_text_tokens=4, layers=1, heads=2, n_queries=3).eval()


def _inputs(n, width=16, text_width=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, width, generator=g), torch.randn(1, 7, text_width, generator=g)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def fitted(tiny, images):
    return RankingAdapter(backbone=tiny, **SMALL).fit(images, [1, 2, 3, 4, 5, 6], prompt="Rank by size.")


def test_pair_labels_of_sorted_targets_are_strictly_lower_triangular():
    lab = pair_labels(torch.tensor([5.0, 3.0, 2.0, 0.0]))          # descending: y_i > y_j for i < j
    assert torch.equal(lab, torch.triu(torch.ones(4, 4), diagonal=1))
    lab = pair_labels(torch.tensor([0.0, 1.0, 2.0]))               # ascending: the lower triangle
    assert torch.equal(lab, torch.tril(torch.ones(3, 3), diagonal=-1))
    assert pair_labels(torch.tensor([2.0, 2.0])).sum() == 0         # ties are "not more" both ways


def test_ranking_loss_terms():
    y = torch.tensor([0.0, 1.0, 2.0])
    pairs = torch.zeros(3, 3)                                        # every pair at p = 1/2
    terms = ranking_loss(y.clone(), pairs, y)
    assert terms["rank"].item() == pytest.approx(np.log(2))
    assert terms["regression"].item() == 0.0                        # exact scores: log(1 + 0)
    scores = y + 3.0                                                 # SmoothL1 = 3 - 0.5 everywhere
    assert ranking_loss(scores, pairs, y, reg_weight=0.5)["regression"].item() == pytest.approx(0.5 * np.log(3.5))


def test_pair_head_identities():
    net = _net()
    img, txt = _inputs(5)
    with torch.no_grad():
        scores, o = net(img, txt)
        h = net.reg_token_pooler.pair_values(net.reg_tokens, net.fuse(img, txt))    # (N, N, Q, W)
    assert scores.shape == (5,) and o.shape == (5, 5)
    assert torch.allclose(torch.diagonal(o), torch.diagonal(o)[0].expand(5), atol=1e-6)   # o_ii one constant
    assert torch.count_nonzero(h[range(5), range(5)]) == 0                        # equal halves cancel
    assert torch.allclose(h, -h.transpose(0, 1), atol=1e-7)                       # swapping i, j negates
    assert not torch.allclose(o, o.T)                                             # the MLP is not odd


def test_pair_attention_equals_the_concatenated_softmax():
    """The O(N·T) form equals one softmax over the 2T keys of each pair, written out."""
    net = _net(width=16)
    img, txt = _inputs(3)
    att = net.reg_token_pooler
    with torch.no_grad():
        x = net.fuse(img, txt)
        got = att.pair_values(net.reg_tokens, x)
        H, d = att.heads, 16 // att.heads
        q = att.ln_q(att.q_proj(net.reg_tokens)).view(-1, H, d).transpose(0, 1)      # (H, Q, d)
        k = att.ln_kv(att.kv_proj(x)).view(3, 5, H, d).transpose(1, 2)                # (N, H, T, d)
        for i in range(3):
            for j in range(3):
                kk = torch.cat([k[i], k[j]], dim=1)                                  # (H, 2T, d)
                a = torch.softmax(q @ kk.transpose(1, 2) / d ** 0.5, dim=-1)         # (H, Q, 2T)
                want = a[..., :5] @ k[i] - a[..., 5:] @ k[j]                          # (H, Q, d)
                assert torch.allclose(got[i, j], want.transpose(0, 1).reshape(-1, 16), atol=1e-6)


def test_one_image_batch_has_only_the_diagonal_pair():
    net = _net()
    img, txt = _inputs(1)
    scores, o = net(img, txt)
    assert scores.shape == (1,) and o.shape == (1, 1)
    terms = ranking_loss(scores, o, torch.tensor([3.0]))            # label 0: y_1 > y_1 is false
    sum(terms.values()).backward()                                   # gradients flow with N = 1
    assert net.regressor.output_head.weight.grad is not None


def test_text_of_another_width_is_mapped():
    net = _net(width=16, text_width=24)
    img, txt = _inputs(2, text_width=24)
    assert net(img, txt)[1].shape == (2, 2)


def test_fit_predict_rank(fitted, tiny, images):
    s = fitted.predict(images)
    assert s.shape == (6,) and np.all(np.isfinite(s))
    assert np.array_equal(fitted.rank(images), np.argsort(-s, kind="stable"))
    assert fitted.text_tokens_.shape == (1, tiny.context_length, 64)
    assert len(fitted.history_) == 3 and fitted.n_trainable_ > 0
    assert fitted.predict(images[:1]).shape == (1,)
    p = fitted.pair_proba(images[:3])
    assert p.shape == (3, 3) and np.allclose(np.diagonal(p), np.diagonal(p)[0], atol=1e-6)


def test_fit_keeps_the_backbone_frozen(tiny, images):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    RankingAdapter(backbone=tiny, **{**SMALL, "epochs": 1}).fit(images, [0, 1, 0, 1, 0, 1], prompt="x")
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert all(p.requires_grad for p in tiny.model.parameters())    # flags restored


def test_fit_is_seeded(fitted, tiny, images):
    again = RankingAdapter(backbone=tiny, **SMALL).fit(images, [1, 2, 3, 4, 5, 6], prompt="Rank by size.")
    assert np.array_equal(again.predict(images), fitted.predict(images))


def test_save_load_round_trip(fitted, tiny, images, tmp_path):
    save_ranker(fitted, tmp_path / "r", dataset="test")
    back = load_ranker(tmp_path / "r", tiny)
    assert back.prompt_ == "Rank by size." and back.get_params()["layers"] == 1
    np.testing.assert_array_equal(back.predict(images), fitted.predict(images))
    plain = load_adapter(save_adapter(fitted, tmp_path / "plain"))      # the generic adapter format
    plain.backbone = tiny
    np.testing.assert_array_equal(plain.predict(images), fitted.predict(images))


def test_load_refuses_other_model_and_classifier_folders(fitted, tiny, tmp_path):
    import cliplab
    from _tiny import TINY_CFG, make_model
    from cliplab.models.convert import save_open_clip_folder

    save_ranker(fitted, tmp_path / "r")
    save_open_clip_folder(tmp_path / "other", TINY_CFG, make_model(seed=1).state_dict())
    with pytest.raises(UsageError, match="was fit on"):
        load_ranker(tmp_path / "r", cliplab.load(tmp_path / "other"))
    from cliplab.adapt.fewshot import load_fitted

    with pytest.raises(UsageError, match="ranking adapter"):
        load_fitted(tmp_path / "r", tiny)
    with pytest.raises(DataError, match="no cliplab_adapter.json"):
        load_ranker(tmp_path, tiny)


def test_errors(tiny, images):
    with pytest.raises(UsageError, match="backbone"):
        RankingAdapter().fit(images, range(6))
    with pytest.raises(UsageError, match="6 images but 5 targets"):
        RankingAdapter(backbone=tiny, **SMALL).fit(images, range(5))
    with pytest.raises(UsageError, match="different targets"):
        RankingAdapter(backbone=tiny, **SMALL).fit(images, [2] * 6)
    with pytest.raises(UsageError, match="finite"):
        RankingAdapter(backbone=tiny, **SMALL).fit(images, [1, 2, np.nan, 4, 5, 6])
    with pytest.raises(UsageError, match="prompt"):
        RankingAdapter(backbone=tiny, **SMALL).fit(images, range(6), prompt=" ")
    with pytest.raises(UsageError, match="divisible"):
        RankingAdapter(backbone=tiny, **{**SMALL, "heads": 3}).fit(images, range(6))
