"""Calibration metrics on hand-made cases with known values, and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.eval.calibration import (TemperatureScaling, adaptive_calibration_error, brier_score,
                                      calibration_metrics, expected_calibration_error, negative_log_likelihood,
                                      reliability_bins, softmax)


def test_ece_hand_case():
    # confidences 0.9, 0.9 (one right) -> bin (13/15, 14/15]: |0.9 - 0.5| * 2/4; 0.6, 0.6 (both right) -> |0.6 - 1| * 2/4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    # equal-mass bins, 2 bins: {0.6, 0.6} and {0.9, 0.9}: same gaps here
    assert adaptive_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.4)


def test_ece_bin_edges_follow_the_reference_rule():
    # a confidence exactly on an edge belongs to the lower bin (lower < conf <= upper)
    probs = np.array([[0.6, 0.4], [0.8, 0.2]])
    labels = np.array([0, 1])
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins["count"] == [0, 0, 1, 1, 0]


def test_perfectly_calibrated_sample_has_ece_near_zero():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200_000)
    correct = rng.random(conf.size) < conf
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.where(correct, 0, 1)
    assert expected_calibration_error(probs, labels) < 0.005
    assert adaptive_calibration_error(probs, labels) < 0.005


def test_brier_and_nll_closed_forms():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1])
    assert brier_score(probs, labels) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.81 + 0.64)) / 2)
    assert negative_log_likelihood(probs, labels) == pytest.approx(-(np.log(0.7) + np.log(0.1)) / 2)


def test_temperature_scaling_fixes_an_overconfident_model_and_finds_the_nll_minimum():
    rng = np.random.default_rng(1)
    n, c = 4000, 5
    y = rng.integers(0, c, n)
    true_logits = rng.normal(0, 1, (n, c))
    true_logits[np.arange(n), y] += 1.5
    labels = np.array([rng.choice(c, p=p) for p in softmax(true_logits)])      # calibrated at T = 1
    logits = 3.0 * true_logits                                                 # over-confident by 3x
    val, test = slice(0, n // 2), slice(n // 2, n)
    ts = TemperatureScaling().fit(logits[val], labels[val])
    assert ts.temperature_ == pytest.approx(3.0, rel=0.1)
    assert ts.nll_after_ < ts.nll_before_
    before = calibration_metrics(softmax(logits[test]), labels[test])
    after = calibration_metrics(ts.predict_proba(logits[test]), labels[test])
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"]
    assert after["acc1"] == before["acc1"]                                     # argmax unchanged
    grid = [negative_log_likelihood(softmax(logits[val], t), labels[val]) for t in (ts.temperature_ * 0.98,
                                                                                    ts.temperature_ * 1.02)]
    assert min(grid) >= ts.nll_after_ - 1e-9


@pytest.mark.parametrize("probs, labels", [
    (np.ones((3, 2)) / 2, np.array([0, 1])),            # length mismatch
    (np.ones((2, 2)) / 2, np.array([0, 2])),            # label out of range
    (np.ones((0, 2)), np.array([], dtype=int)),         # empty
])
def test_bad_inputs_are_one_line_usage_errors(probs, labels):
    with pytest.raises(UsageError):
        expected_calibration_error(probs, labels)


def test_unfitted_temperature_scaling_says_what_to_do():
    with pytest.raises(UsageError, match="fit"):
        TemperatureScaling().predict_proba(np.zeros((1, 2)))
