"""Tasks: zero-shot on a tiny model, the linear-probe C search and the few-shot protocol.

The protocol tests use estimators that record what they see, so they fail if test
features or labels ever reach ``fit`` or the hyper-parameter choice.
"""

import numpy as np
import pytest

from cliplab.eval import tasks
from cliplab.data.datasets import ClassificationData, RetrievalData
from cliplab.eval.tasks import (fewshot, linear_probe, select_on_validation, zeroshot_classification,
                                zeroshot_retrieval)


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _blobs(n_per_class, n_classes=3, d=6, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    centers = 3 * np.eye(n_classes, d)
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centers[y] + noise * rng.normal(size=(len(y), d))
    return x.astype(np.float32), y


def test_zeroshot_classification_tiny(tiny, tmp_path):
    data = ClassificationData(_images(6) + [b"not an image"], np.array([0, 1, 2, 0, 1, 2, 0]),
                              ["red", "green", "blue"], "toy")
    res = zeroshot_classification(tiny, data, templates="a photo of a {c}.")
    assert set(res.metrics) == {"acc1", "acc5", "mean_per_class_recall"}
    assert np.isnan(res.metrics["acc5"])                          # 3 classes: NaN, as CLIP_benchmark
    cm = np.array(res.details["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == 6                   # the bad image is skipped
    assert res.skipped and res.skipped[0]["index"] == 6
    assert res.metrics["acc1"] == pytest.approx(np.trace(cm) / 6)
    from cliplab.features import FeatureStore

    cached = zeroshot_classification(tiny, data, templates="a photo of a {c}.",
                                     store=FeatureStore(tmp_path, tiny))
    assert cached.details["confusion_matrix"] == res.details["confusion_matrix"]


def test_zeroshot_retrieval_tiny(tiny):
    data = RetrievalData(_images(4), [["a red square", "red"], ["a blue circle"], ["green", "x", "y"],
                                      ["a star"]], "toy")
    res = zeroshot_retrieval(tiny, data)
    assert res.details["n_texts"] == 7
    for k in (1, 5, 10):
        assert 0 <= res.metrics[f"image_retrieval_recall@{k}"] <= 1
    assert res.metrics["image_retrieval_recall@5"] == 1.0         # 4 images: every one is in the top 5
    assert res.metrics["text_retrieval_recall@10"] == 1.0         # 7 captions: all are in the top 10


class Recorder:
    """Wraps the linear-probe estimator; logs every fit / predict input."""

    def __init__(self, log, real):
        self.log = log
        self.real = real

    def __call__(self, C=1.0, **kw):
        inner = self.real(C, **kw)
        log = self.log

        class Est:
            classes_ = None

            def fit(self, X, y):
                log.append(("fit", C, X.copy(), np.asarray(y).copy()))
                inner.fit(X, y)
                self.classes_ = inner.classes_
                return self

            def predict(self, X):
                log.append(("predict", C, X.copy(), None))
                return inner.predict(X)

            def decision_function(self, X):
                log.append(("decision", C, X.copy(), None))
                return inner.decision_function(X)

            def __getattr__(self, name):                           # coef_, intercept_, n_iter_
                return getattr(inner, name)

        return Est()


@pytest.fixture
def recorded_lr(monkeypatch):
    from cliplab.adapt import linear

    log = []
    monkeypatch.setattr(linear, "logistic_regression", Recorder(log, linear.logistic_regression))
    return log


def test_linear_probe_chooses_C_on_validation(recorded_lr):
    from cliplab.adapt.linear import C_GRID

    xt, yt = _blobs(10, seed=0, noise=1.5)
    xv, yv = _blobs(10, seed=1, noise=1.5)
    xs, ys = _blobs(10, seed=2, noise=1.5)
    xs = xs + 0.001                                                # distinguishable test rows
    res = linear_probe(xt, yt, xv, yv, xs, ys, refine=2)
    fits = [e for e in recorded_lr if e[0] == "fit"]
    *sweep_fits, final = fits
    assert all(np.array_equal(f[2], xt) and np.array_equal(f[3], yt) for f in sweep_fits)
    assert len(sweep_fits) == len(C_GRID) + 2 * 2                   # coarse grid + 2 binary-search rounds
    assert np.array_equal(final[2], np.concatenate([xt, xv])) and final[1] == res.details["C"]
    preds = [e for e in recorded_lr if e[0] == "predict"]
    assert all(np.array_equal(p[2], xv) for p in preds)            # selection scores val only
    # the search is CoOp's lpclip: its coarse grid in its order, then the binary search;
    # the chosen C is the winner of the last round, with the validation accuracy recorded
    sweep = res.details["sweep"]
    assert [c for c, _ in sweep[:len(C_GRID)]] == [pytest.approx(c) for c in C_GRID]
    assert dict((c, a) for c, a in sweep)[res.details["C"]] == res.details["val_accuracy"]
    # test data never reaches the probe's fits or the choice (the probe scores it itself)
    assert not any(len(e[2]) == len(xs) and np.allclose(e[2], xs) for e in recorded_lr)


def test_linear_probe_choice_ignores_test_labels():
    xt, yt = _blobs(8, seed=0, noise=2.0)
    xv, yv = _blobs(8, seed=1, noise=2.0)
    xs, ys = _blobs(8, seed=2, noise=2.0)
    a = linear_probe(xt, yt, xv, yv, xs, ys, refine=2)
    b = linear_probe(xt, yt, xv, yv, xs, np.random.default_rng(0).permutation(ys), refine=2)
    assert a.details["C"] == b.details["C"] and a.details["sweep"] == b.details["sweep"]
    assert a.metrics["lp_acc1"] > 0.6
    assert set(a.metrics) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}   # CLIP_benchmark's names
    assert np.isnan(a.metrics["lp_acc5"])                                         # 3 classes


class RecordingEstimator:
    """Nearest-centroid with a shrink parameter; records every (X, y) passed to fit."""

    seen_fit: list = []
    seen_predict: list = []

    def __init__(self, shrink=0.0):
        self.shrink = shrink

    def fit(self, X, y):
        RecordingEstimator.seen_fit.append((X.copy(), np.asarray(y).copy()))
        self.classes_ = np.unique(y)
        self.means_ = np.stack([X[y == c].mean(0) for c in self.classes_]) * (1 - self.shrink)
        return self

    def predict(self, X):
        RecordingEstimator.seen_predict.append(X.copy())
        d = ((X[:, None, :] - self.means_[None]) ** 2).sum(-1)
        return self.classes_[d.argmin(1)]


def test_fewshot_never_shows_test_to_fit_or_selection():
    RecordingEstimator.seen_fit.clear()
    RecordingEstimator.seen_predict.clear()
    train = _blobs(20, seed=0)
    val = _blobs(5, seed=1)
    xs, ys = _blobs(5, seed=2)
    xs[:, -1] = 1000.0                                             # marks test rows
    grid = {"shrink": [0.0, 0.5]}
    res = fewshot(RecordingEstimator, train, val, (xs, ys), ks=(1, 2, 4), seeds=(0, 1), grid=grid,
                  method="centroid")
    for X, y in RecordingEstimator.seen_fit:
        assert (X[:, -1] < 100).all()                              # no test rows in any fit
    fit_sizes = sorted({len(y) for _, y in RecordingEstimator.seen_fit})
    assert fit_sizes == [3, 6, 12]                                 # exactly k per class, 3 classes
    curve = res.details["fewshot"][0]
    assert curve["ks"] == [1, 2, 4] and len(curve["per_seed"][0]) == 2
    assert curve["mean"][0] == pytest.approx(np.mean(curve["per_seed"][0]))
    assert curve["std"][0] == pytest.approx(np.std(curve["per_seed"][0]))
    assert set(res.metrics) == {"acc1@1shot", "acc1@2shot", "acc1@4shot"}
    # permuting the test labels changes no choice
    shuffled = fewshot(RecordingEstimator, train, val, (xs, np.random.default_rng(1).permutation(ys)),
                       ks=(1, 2, 4), seeds=(0, 1), grid=grid)
    assert shuffled.details["fewshot"][0]["params"] == curve["params"]


def test_select_on_validation_picks_best_val():
    train, val = _blobs(10, seed=0), _blobs(10, seed=1)

    class Const:
        def __init__(self, label=0):
            self.label = label

        def fit(self, X, y):
            return self

        def predict(self, X):
            return np.full(len(X), self.label)

    # val labels: 10 of each class -> every constant ties; an unbalanced val breaks the tie
    xv, yv = val
    yv = yv.copy()
    yv[:15] = 2
    best, score, scores = select_on_validation(Const, {"label": [0, 1, 2]}, train, (xv, yv))
    assert best == {"label": 2} and score == pytest.approx(25 / 30) and len(scores) == 3


def test_linear_probe_counts_unseen_test_classes_as_errors():
    xt, yt = _blobs(10, n_classes=3, seed=0, noise=0.3)
    xv, yv = _blobs(5, n_classes=3, seed=1, noise=0.3)
    xs, ys = _blobs(5, n_classes=4, seed=2, noise=0.3)            # class 3 never seen in train/val
    res = linear_probe(xt, yt, xv, yv, xs, ys, refine=1, classnames=["a", "b", "c", "d"])
    assert res.details["unseen_test_classes"] == [3]
    assert res.metrics["lp_acc1"] == pytest.approx(15 / 20)      # the 5 unseen examples are errors
    assert res.metrics["lp_mean_per_class_recall"] == pytest.approx(3 / 4)


def _choices(parser, command, option):
    """The ``choices`` of ``cliplab COMMAND OPTION`` in the real parser."""
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return next(a.choices for a in sub.choices[command]._actions if option in a.option_strings)


def test_task_registry_is_what_the_cli_and_the_suite_offer():
    """Each registered task has a help line and its dataset kind, and is a choice of
    ``cliplab eval --task`` and ``cliplab interpolate --task``; every suite entry names one."""
    from cliplab.cli.main import build_parser
    from cliplab.data.datasets import AnomalyData, ClassificationData, DetectionData, RetrievalData
    from cliplab.eval.suite import SUITES

    names = tasks.TASKS.names()
    assert names[:4] == ["zeroshot_classification", "zeroshot_retrieval", "linear_probe", "fewshot"]
    assert {"calibration", "ood_detection", "zeroshot_segmentation"} <= set(names)           # task modules found by the registry
    for name in names:
        meta = tasks.TASKS.meta(name)
        assert meta["help"] and meta["data"] in (ClassificationData.kind, RetrievalData.kind, "segmentation",
                                                 AnomalyData.kind, DetectionData.kind)
    assert tasks.TASKS.get("fewshot") is fewshot
    assert list(_choices(build_parser("eval"), "eval", "--task")) == names
    assert list(_choices(build_parser("interpolate"), "interpolate", "--task")) == names
    assert {e["task"] for suite in SUITES.values() for e in suite} <= set(names)
