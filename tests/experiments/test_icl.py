"""ICL vs weight shifting for softmax regression: hand-worked cases, gradients, the derived bound."""

import json
import math

import pytest
import torch

from cliplab.errors import UsageError
from cliplab.experiments import (ICLWeightShiftResult, attention_context_shift, compare_icl_gd, gd_step,
                                 run_icl_experiment, softmax_regression_grad, softmax_regression_loss)

from _benchmarks import load_benchmark, run_benchmark


def sigmoid(t):
    return 1.0 / (1.0 + math.exp(-t))


def test_hand_case_weights_from_zero():
    """A = I, x = 0, b = (1, 0), eta = 1: worked on paper.

    p = (1/2, 1/2), p - b = (-1/2, 1/2), <p, p - b> = 0, so u = p * (p - b) = (-1/4, 1/4).
    GD: x' = -A^T u = (1/4, -1/4), logits (1/4, -1/4), p_gd = (sigmoid(1/2), sigmoid(-1/2)).
    ICL: grad_A = u x^T = 0, so A' = A and p_icl = (1/2, 1/2).
    Distance sqrt(2) (sigmoid(1/2) - 1/2); D1 = 1/2 ||A A^T u|| = sqrt(2)/8; D2 = 1/4 * 1 * sqrt(2)/2.
    """
    A, b, x = torch.eye(2, dtype=torch.float64), torch.tensor([1.0, 0.0]), torch.zeros(2)
    assert softmax_regression_loss(A, b, x).item() == pytest.approx(0.25, abs=1e-15)
    assert gd_step(A, b, x, 1.0).tolist() == pytest.approx([0.25, -0.25], abs=1e-15)
    out = compare_icl_gd(A, b, x, 1.0)
    assert out["p_gd"].tolist() == pytest.approx([sigmoid(0.5), sigmoid(-0.5)], abs=1e-15)
    assert out["p_icl"].tolist() == pytest.approx([0.5, 0.5], abs=1e-15)
    assert out["distance"].item() == pytest.approx(math.sqrt(2) * (sigmoid(0.5) - 0.5), rel=1e-12)
    assert out["bound_data"].item() == pytest.approx(math.sqrt(2) / 8, rel=1e-12)
    assert out["bound_r"].item() == pytest.approx(math.sqrt(2) / 8, rel=1e-12)
    assert out["distance"].item() / out["bound_data"].item() > 0.97                       # the bound is tight here


def test_hand_case_both_updates_move():
    """A = diag(2, 0), x = (1, 0), b = (0, 1), eta = 1/2: worked on paper.

    Logits Ax = (2, 0), so p = (s, 1 - s) with s = sigmoid(2); p - b = (s, -s);
    <p, p - b> = s (2s - 1); u = c (1, -1) with c = 2 s^2 (1 - s).
    GD: grad_x = A^T u = (2c, 0), x' = (1 - 2 eta c, 0), logits (2 - 4 eta c, 0).
    ICL: A' = A - eta u x^T = [[2 - eta c, 0], [eta c, 0]], logits A' x = (2 - eta c, eta c).
    Distance sqrt(2) |sigmoid(2 - 2 eta c) - sigmoid(2 - 4 eta c)|;
    D1 = eta/2 ||(diag(4, 0) - I) u|| = eta/2 * c * sqrt(10); D2 = eta/4 * 2^2 * ||p - b|| = eta s sqrt(2).
    """
    eta = 0.5
    s = sigmoid(2.0)
    c = 2 * s * s * (1 - s)
    A = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b, x = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    grad_x, grad_a = softmax_regression_grad(A, b, x)
    assert grad_x.tolist() == pytest.approx([2 * c, 0.0], abs=1e-15)
    assert grad_a.flatten().tolist() == pytest.approx([c, 0.0, -c, 0.0], abs=1e-15)
    shifted = attention_context_shift(A, b, x, eta).flatten().tolist()
    assert shifted == pytest.approx([2 - eta * c, 0, eta * c, 0], abs=1e-15)
    out = compare_icl_gd(A, b, x, eta)
    assert out["p_gd"][0].item() == pytest.approx(sigmoid(2 - 4 * eta * c), rel=1e-13)
    assert out["p_icl"][0].item() == pytest.approx(sigmoid(2 - 2 * eta * c), rel=1e-13)
    dist = math.sqrt(2) * abs(sigmoid(2 - 2 * eta * c) - sigmoid(2 - 4 * eta * c))
    assert out["distance"].item() == pytest.approx(dist, rel=1e-12)
    assert out["bound_data"].item() == pytest.approx(eta / 2 * c * math.sqrt(10), rel=1e-12)
    assert out["bound_r"].item() == pytest.approx(eta * s * math.sqrt(2), rel=1e-12)
    assert dist < eta / 2 * c * math.sqrt(10)


def test_orthogonal_context_makes_the_two_updates_coincide():
    """A = I, ||x|| = 1: A A^T = ||x||^2 I, so both logit shifts are -eta u; distance and D1 are 0."""
    A, b, x = torch.eye(2, dtype=torch.float64), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    s = sigmoid(1.0)
    assert softmax_regression_loss(A, b, x).item() == pytest.approx(s * s, rel=1e-14)   # 1/2 (s^2 + s^2)
    out = compare_icl_gd(A, b, x, 0.7)
    c = 2 * s * s * (1 - s)
    assert out["p_gd"][0].item() == pytest.approx(sigmoid(1 - 2 * 0.7 * c), rel=1e-13)
    assert out["distance"].item() < 1e-15 and out["bound_data"].item() < 1e-15
    assert out["target_shift_gd"].item() > 0.05                           # both did move


def test_step_size_zero_gives_distance_zero():
    A, b, x = torch.randn(5, 7, 3, dtype=torch.float64), torch.rand(5, 7, dtype=torch.float64), torch.randn(5, 3)
    out = compare_icl_gd(A, b, x, 0.0)
    assert torch.equal(out["p_gd"], out["p"]) and torch.equal(out["p_icl"], out["p"])
    assert out["distance"].abs().max().item() == 0.0 and out["bound_r"].max().item() == 0.0


def test_gradients_equal_autograd():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    loss = 0.5 * ((torch.softmax((A @ x.unsqueeze(-1)).squeeze(-1), -1) - b) ** 2).sum()
    auto_a, auto_x = torch.autograd.grad(loss, (A, x))
    grad_x, grad_a = softmax_regression_grad(A.detach(), b, x.detach())
    torch.testing.assert_close(grad_x, auto_x, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_a, auto_a, rtol=0, atol=1e-14)
    assert softmax_regression_loss(A.detach(), b, x.detach()).sum().item() == pytest.approx(loss.item(), rel=1e-14)


def test_distance_within_the_bound_over_a_random_sweep():
    res = run_icl_experiment((1, 2, 3, 7, 20), (0.0, 0.05, 0.5, 5.0), d=3, trials=64, seed=1)
    assert isinstance(res, ICLWeightShiftResult) and len(res.rows) == 20 and res.within_bound
    assert max(r["ratio_max"] for r in res.rows) <= 1.0 + 1e-12
    assert max(r["ratio_r_max"] for r in res.rows) <= 1.0 + 1e-12
    assert max(r["shift_ratio_max"] for r in res.rows) <= 1.0 + 1e-12        # target shift <= its bound, both moves
    assert max(r["ratio_max"] for r in res.rows) > 0.5                      # the bound is not vacuous
    assert all(r["distance_max"] == 0.0 for r in res.rows if r["eta"] == 0.0)
    assert all(r["distance_max"] == 0.0 for r in res.rows if r["n"] == 1)    # one token: softmax is 1
    json.dumps(res.to_dict())
    # wider problems than the experiment draws: large weights, targets that are not distributions
    g = torch.Generator().manual_seed(7)
    A = 3 * torch.randn(256, 9, 4, generator=g, dtype=torch.float64)
    x = 2 * torch.randn(256, 4, generator=g, dtype=torch.float64)
    b = torch.randn(256, 9, generator=g, dtype=torch.float64)
    for eta in (1e-3, 0.1, 2.0):
        out = compare_icl_gd(A, b, x, eta)
        assert (out["distance"] <= out["bound_data"] * (1 + 1e-12)).all()
        assert (out["bound_data"] <= out["bound_r"] * (1 + 1e-12)).all()
        assert (out["target_shift_gd"] <= out["part1_bound"] * (1 + 1e-12)).all()
        assert (out["target_shift_icl"] <= out["part2_bound"] * (1 + 1e-12)).all()


def test_errors():
    with pytest.raises(UsageError, match="expected A"):
        compare_icl_gd(torch.zeros(3, 2), torch.zeros(2), torch.zeros(2), 0.1)
    with pytest.raises(UsageError, match="step size"):
        gd_step(torch.zeros(3, 2), torch.zeros(3), torch.zeros(2), -0.1)
    with pytest.raises(UsageError, match="d must be"):
        run_icl_experiment((2,), (0.1,), d=0)


def test_benchmark_quick_run(tmp_path):
    out = tmp_path / "r.json"
    run_benchmark(load_benchmark("icl_weight_shift.py"), ["--quick", "--out", str(out), "--no-figure"])
    data = json.loads(out.read_text())
    assert data["within_bound"] is True and data["rows"] and data["config"]["trials"] == 8
