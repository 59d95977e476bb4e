"""OOD scores and metrics on hand-made cases with known values."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.errors import UsageError
from cliplab.eval.ood import energy_score, fpr_at_tpr, max_logit_score, mcm_score, msp_score, ood_auroc


def test_mcm_is_max_softmax_of_cosines():
    cos = np.array([[0.3, 0.1], [0.2, 0.2]])
    expected = np.exp(0.3) / (np.exp(0.3) + np.exp(0.1))
    assert mcm_score(cos) == pytest.approx([expected, 0.5])
    assert mcm_score(cos, temperature=0.01)[0] == pytest.approx(1.0, abs=1e-6)


def test_energy_max_logit_and_msp():
    logits = np.array([[2.0, 0.0, 0.0]])
    assert energy_score(logits) == pytest.approx(np.log(np.exp(2) + 2))
    assert energy_score(logits, temperature=2.0) == pytest.approx(2 * np.log(np.exp(1) + 2))
    assert max_logit_score(logits) == pytest.approx([2.0])
    assert msp_score(np.array([[0.2, 0.8]])) == pytest.approx([0.8])


def test_auroc_known_values():
    assert ood_auroc([1, 2, 3], [4, 5]) == 0.0
    assert ood_auroc([4, 5], [1, 2, 3]) == 1.0
    assert ood_auroc([1, 1], [1, 1]) == 0.5                     # identical scores: no separation
    assert ood_auroc([3, 1], [2]) == 0.5


def test_fpr_at_95_tpr_known_values():
    id_scores = np.arange(100, 200)                            # 100 ID images
    ood_scores = np.arange(0, 110)                             # 10 of 110 OOD images score >= 100
    # keeping 95 % of ID needs threshold 105: OOD scores >= 105 are 105..109 -> 5 / 110
    assert fpr_at_tpr(id_scores, ood_scores) == pytest.approx(5 / 110)
    assert fpr_at_tpr([5, 6], [1, 2]) == 0.0
    assert fpr_at_tpr([1, 2], [5, 6]) == 1.0


def test_fpr_ties_and_errors():
    assert fpr_at_tpr([1, 1, 1], [1, 1]) == 1.0                # all tied: accepting ID accepts all OOD
    with pytest.raises(UsageError):
        fpr_at_tpr([], [1])
    with pytest.raises(UsageError):
        ood_auroc([np.nan], [1])
    with pytest.raises(UsageError):
        mcm_score(np.zeros(3))
