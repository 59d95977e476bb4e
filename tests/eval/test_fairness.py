"""Subgroup metrics, shortcut test and attribute probe against hand counts."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.eval.fairness import attribute_probe, bootstrap_auroc, shortcut_test, subgroup_metrics


def test_subgroup_rates_and_fairlearn_differences_match_hand_counts():
    #            group a: 4 positives (3 found), 4 negatives (1 false alarm); group b: 2 positives (1), 2 neg (0)
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0])
    p = np.array([1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0])
    g = np.array(["a"] * 8 + ["b"] * 4)
    res = subgroup_metrics(y, p, g, positive=1)
    a, b = res["groups"]["a"], res["groups"]["b"]
    assert (a["n"], b["n"]) == (8, 4)
    assert a["tpr"] == pytest.approx(3 / 4) and b["tpr"] == pytest.approx(1 / 2)
    assert a["fpr"] == pytest.approx(1 / 4) and b["fpr"] == pytest.approx(0.0)
    assert a["fnr"] == pytest.approx(1 / 4) and b["fnr"] == pytest.approx(1 / 2)
    assert a["accuracy"] == pytest.approx(6 / 8) and b["accuracy"] == pytest.approx(3 / 4)
    assert a["selection_rate"] == pytest.approx(4 / 8) and b["selection_rate"] == pytest.approx(1 / 4)
    assert res["gaps"]["tpr"] == pytest.approx(0.25) and res["gaps"]["fnr"] == pytest.approx(0.25)
    assert res["equalized_odds_difference"] == pytest.approx(max(0.25, 0.25))
    assert res["demographic_parity_difference"] == pytest.approx(0.25)
    assert res["worst"]["accuracy"] == pytest.approx(0.75)


def test_subgroup_auroc_and_multiclass_accuracy():
    y = np.array([0, 1, 0, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    g = np.array(["x", "x", "y", "y", "x", "y"])
    res = subgroup_metrics(y, p, g)
    assert res["groups"]["x"]["accuracy"] == 1.0 and res["groups"]["y"]["accuracy"] == pytest.approx(1 / 3)
    assert set(res["groups"]["x"]) == {"accuracy", "n"}                 # no positive class: no rates
    scores = np.array([0.1, 0.9, 0.8, 0.7, 0.2, 0.3])
    res = subgroup_metrics(y, p, g, positive=1, scores=scores)
    assert res["groups"]["x"]["auroc"] == 1.0 and res["groups"]["y"]["auroc"] == pytest.approx(0.5)
    with pytest.raises(UsageError):
        subgroup_metrics(y, p, g, scores=scores)                         # AUROC needs the positive class
    with pytest.raises(UsageError):
        subgroup_metrics(y, p[:3], g)


def test_shortcut_test_counts_aligned_and_conflicting():
    y = np.array([0, 0, 1, 1, 0, 1])
    bg = np.array(["plain", "plain", "stripes", "stripes", "stripes", "plain"])
    p = np.array([0, 0, 1, 1, 1, 0])                                    # wrong exactly where the background flips
    res = shortcut_test(y, p, bg, aligned={0: "plain", 1: "stripes"})
    assert (res["n_aligned"], res["n_conflicting"]) == (4, 2)
    assert res["aligned_accuracy"] == 1.0 and res["conflicting_accuracy"] == 0.0 and res["gap"] == 1.0


def test_attribute_probe_finds_a_planted_attribute_and_not_a_shuffled_one():
    rng = np.random.default_rng(0)
    attr = rng.choice(["f", "m"], 300)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[:, 3] += 3.0 * (attr == "m")
    res = attribute_probe(x, attr, n_boot=200)
    assert res["auroc"] > 0.95 and res["auroc_low"] <= res["auroc"] <= res["auroc_high"]
    assert abs(res["shuffled_auroc"] - 0.5) < 0.15
    with pytest.raises(UsageError):
        attribute_probe(x[:4], attr[:4])


def test_bootstrap_interval_contains_the_point_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    s = y + rng.normal(0, 1.0, 2000)
    small = bootstrap_auroc(y[:100], s[:100], n_boot=300)
    big = bootstrap_auroc(y, s, n_boot=300)
    assert small[1] <= small[0] <= small[2] and big[1] <= big[0] <= big[2]
    assert big[2] - big[1] < small[2] - small[1]
