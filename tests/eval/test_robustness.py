"""Corruption error and effective robustness on hand-made numbers."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.eval.robustness import corruption_errors, effective_robustness, split_severity


def test_split_severity():
    assert split_severity("noise-3") == ("noise", 3)
    assert split_severity("jpeg-quality-5") == ("jpeg-quality", 5)
    assert split_severity("outline") == ("outline", None)


def test_mce_and_relative_mce_follow_hendrycks_and_dietterich():
    errors = {"noise-1": 0.2, "noise-2": 0.4, "blur-1": 0.3, "outline": 0.9}
    base = {"noise-1": 0.4, "noise-2": 0.6, "blur-1": 0.5}
    res = corruption_errors(errors, 0.1, base, 0.2)
    assert res["ce"]["noise"] == pytest.approx((0.2 + 0.4) / (0.4 + 0.6))
    assert res["ce"]["blur"] == pytest.approx(0.3 / 0.5)
    assert res["mce"] == pytest.approx(np.mean([0.6, 0.6]))
    assert res["relative_ce"]["noise"] == pytest.approx((0.1 + 0.3) / (0.2 + 0.4))
    assert res["relative_mce"] == pytest.approx(np.mean([(0.1 + 0.3) / 0.6, 0.2 / 0.3]))
    assert set(res["mean_error"]) == {"noise", "blur"}                # 'outline' has no severity
    with pytest.raises(UsageError, match="no result for blur-1"):
        corruption_errors(errors, 0.1, {"noise-1": 0.4, "noise-2": 0.6}, 0.2)


def test_effective_robustness_is_the_residual_to_the_logit_line():
    ids = np.array([0.6, 0.7, 0.8, 0.9])
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    shifts = 1 / (1 + np.exp(-(0.8 * logit(ids) - 0.5)))               # all on one line
    on_line = effective_robustness(ids, shifts, 0.75, 1 / (1 + np.exp(-(0.8 * logit(0.75) - 0.5))))
    assert on_line["slope"] == pytest.approx(0.8) and on_line["intercept"] == pytest.approx(-0.5)
    assert on_line["effective_robustness"] == pytest.approx(0.0, abs=1e-9)
    above = effective_robustness(ids, shifts, 0.75, on_line["predicted"] + 0.1)
    assert above["effective_robustness"] == pytest.approx(0.1)
    with pytest.raises(UsageError):
        effective_robustness([0.5], [0.4], 0.5, 0.4)
