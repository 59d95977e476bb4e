"""Metrics against hand-computed cases and CLIP_benchmark's definitions."""

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.eval.metrics import confusion_matrix, mean_per_class_recall, retrieval_recall, topk_accuracy


def test_topk_accuracy_hand_computed():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    # top-1 predictions 1, 0, 2 -> only row 1 right; top-2 sets {1,2}, {0,*}, {2,1}
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 3) == 1.0
    assert topk_accuracy(logits, labels, 5) == 1.0          # k capped at C
    with pytest.raises(UsageError):
        topk_accuracy(logits, labels[:2], 1)


def test_confusion_and_mean_per_class_recall_hand_computed():
    pred = np.array([0, 0, 1, 1, 2])
    labels = np.array([0, 1, 1, 1, 0])
    cm = confusion_matrix(pred, labels, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 1], [1, 2, 0], [0, 0, 0]])
    # class 0: 1/2, class 1: 2/3, class 2 has no examples and is left out
    assert mean_per_class_recall(pred, labels, 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    from sklearn.metrics import balanced_accuracy_score

    with pytest.warns(UserWarning):
        ref = balanced_accuracy_score(labels, pred)
    assert mean_per_class_recall(pred, labels, 3) == pytest.approx(ref)
    with pytest.raises(UsageError):
        confusion_matrix(np.array([3]), np.array([0]), 3)


def test_retrieval_multi_caption_hand_computed():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    t2i = np.array([0, 0, 1])                       # image 0 has two captions, image 1 one
    # S = [[1, .6, .8], [0, .8, .6]]
    r = retrieval_recall(img, txt, t2i, ks=(1, 2, 10))
    # text->image: t0 -> i0 right; t1 -> i1 first (wrong); t2 -> i0 first (wrong)
    assert r["image_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert r["image_retrieval_recall@2"] == 1.0
    # image->text: i0's best caption is t0 (its own); i1's best is t1 (image 0's), then t2
    assert r["text_retrieval_recall@1"] == pytest.approx(1 / 2)
    assert r["text_retrieval_recall@2"] == 1.0
    assert r["text_retrieval_recall@10"] == 1.0


def test_retrieval_any_caption_counts():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[-1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])   # image 0: a bad caption and a good one
    r = retrieval_recall(img, txt, np.array([0, 0, 1]), ks=(1,))
    assert r["text_retrieval_recall@1"] == 1.0               # t1 is i0's top caption
    assert r["image_retrieval_recall@1"] == pytest.approx(2 / 3)  # t0 finds i1 first


def _clip_benchmark_recall(scores, positive, k):
    """CLIP_benchmark's recall_at_k (> 0) on a (queries, candidates) score matrix."""
    top = torch.topk(scores, k, dim=1)[1]
    onehot = torch.nn.functional.one_hot(top, num_classes=scores.shape[1])
    tp = (onehot * positive.view(scores.shape[0], 1, -1)).sum(dim=(1, 2))
    return ((tp / positive.sum(dim=1)) > 0).float().mean().item()


def test_retrieval_matches_clip_benchmark_definition():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 8)).astype(np.float32)
    t2i = np.repeat(np.arange(20), rng.integers(1, 4, size=20))
    txt = (img[t2i] + 1.5 * rng.normal(size=(len(t2i), 8))).astype(np.float32)
    r = retrieval_recall(img, txt, t2i, ks=(1, 5, 10))
    scores = torch.from_numpy(txt @ img.T)                   # (T, I) as CLIP_benchmark builds it
    positive = torch.zeros(scores.shape, dtype=torch.long)
    positive[torch.arange(len(t2i)), torch.from_numpy(t2i)] = 1
    for k in (1, 5, 10):
        assert r[f"image_retrieval_recall@{k}"] == pytest.approx(_clip_benchmark_recall(scores, positive, k))
        assert r[f"text_retrieval_recall@{k}"] == pytest.approx(_clip_benchmark_recall(scores.T, positive.T, k))
    assert 0 < r["image_retrieval_recall@1"] < r["image_retrieval_recall@10"] <= 1


def test_retrieval_rejects_bad_index():
    with pytest.raises(UsageError, match="index"):
        retrieval_recall(np.eye(2), np.eye(2), np.array([0, 2]))


# --------------------------------------------------------------------- correlation
def test_rank_correlation():
    from scipy.stats import kendalltau

    from cliplab.eval.metrics import rank_correlation

    x = [0.1, 0.4, 0.2, 0.9, 0.5]
    assert rank_correlation(x, [2 * v for v in x]) == pytest.approx(1.0)
    assert rank_correlation(x, [-v for v in x]) == pytest.approx(-1.0)
    a = np.array([1, 2, 2, 3, 5, 4, 4, 0], dtype=float)                # ties in both
    b = np.array([3, 1, 2, 2, 5, 6, 1, 0], dtype=float)
    assert rank_correlation(a, b) == pytest.approx(kendalltau(a, b).statistic, abs=1e-12)
    with pytest.raises(UsageError, match="same length"):
        rank_correlation([1, 2, 3], [1, 2])


def test_ranking_metrics_on_known_permutations():
    from cliplab.eval.metrics import kendall_tau, ndcg_at_k, spearman

    truth = [0, 1, 2, 3]
    swapped = [1, 0, 2, 3]                          # one discordant pair of 6
    assert kendall_tau(truth, swapped) == pytest.approx((5 - 1) / 6)
    assert spearman(truth, swapped) == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))   # Σd² = 2
    assert kendall_tau(truth, truth[::-1]) == pytest.approx(-1.0)
    assert spearman(truth, truth[::-1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rel, scores = [3, 2, 1, 0], [2, 3, 1, 0]        # the two most relevant items swapped
    dcg = 2 / np.log2(2) + 3 / np.log2(3) + 1 / np.log2(4)
    ideal = 3 / np.log2(2) + 2 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(rel, scores) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(rel, scores, k=1) == pytest.approx(2 / 3)
    assert ndcg_at_k(rel, rel, k=2) == pytest.approx(1.0)
    with pytest.raises(UsageError, match="non-negative"):
        ndcg_at_k([-1, 2], [1, 2])
    with pytest.raises(UsageError, match="same length"):
        spearman([1, 2, 3], [1, 2])
