"""W8A8 fake-quant simulation and the outlier statistics."""

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.surgery import apply_outlier_free, outlier_stats, quantize_w8a8
from cliplab.surgery.quantize import ActQuantizer, _sample_stats, fake_quantize_weight

from _tiny import TEXTS, snapshot


def _images(n=12, size=32, seed=0):
    return list((np.random.default_rng(seed).random((n, size, size, 3)) * 255).astype(np.uint8))


def test_weight_fake_quant_round_trips_known_values():
    w = torch.tensor([-127.0, 3.2, 0.0, 64.6, 126.5])
    assert torch.equal(fake_quantize_weight(w), torch.tensor([-127.0, 3.0, 0.0, 65.0, 126.0]))  # scale 1, half to even
    w = torch.randn(50, generator=torch.Generator().manual_seed(0))
    q, s = fake_quantize_weight(w), float(w.abs().max()) / 127
    assert torch.allclose(q / s, torch.round(q / s), atol=1e-4)             # on the grid
    assert float((q - w).abs().max()) <= s / 2 + 1e-7
    assert torch.equal(fake_quantize_weight(torch.zeros(3)), torch.zeros(3))


def test_activation_quantizer_running_minmax_and_grid():
    q = ActQuantizer("minmax", momentum=0.9)
    q.mode = "observe"
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([-1.0, 3.0]))
    assert float(q.lo) == pytest.approx(-0.1) and float(q.hi) == pytest.approx(2.1)
    q.lo.fill_(0.0), q.hi.fill_(2.55)
    q.mode = "quantize"
    assert q.scale_zero_point() == (pytest.approx(0.01), 0)
    out = q(torch.tensor([0.123, -1.0, 9.0]))
    assert torch.allclose(out, torch.tensor([0.12, 0.0, 2.55]))            # rounded, clipped to the range
    with pytest.raises(UsageError, match="before calibration"):
        fresh = ActQuantizer()
        fresh.mode = "quantize"
        fresh(torch.ones(2))


def test_percentile_range_ignores_a_single_outlier():
    x = torch.cat([torch.linspace(-1, 1, 100_000), torch.tensor([1000.0])])
    mm, pc = ActQuantizer("minmax"), ActQuantizer("percentile", percentile=99.9)
    for q in (mm, pc):
        q.mode = "observe"
        q(x)
    assert float(mm.hi) == 1000.0 and float(pc.hi) < 1.01


def test_w8a8_model_is_close_to_fp_and_leaves_the_input_alone(tiny):
    before = snapshot(tiny.model)
    images = _images()
    q = quantize_w8a8(tiny, images, TEXTS, progress=False)
    quantizers = q.model.w8a8_quantizers
    n_linear = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in tiny.model.modules())
    assert len(quantizers) >= n_linear + 4 and all(qz.mode == "quantize" for qz in quantizers.values())
    fp, w8 = tiny.encode_images(images).features, q.encode_images(images).features
    cos = (fp * w8).sum(1)
    assert cos.min() > 0.95 and not np.allclose(fp, w8, atol=1e-6)        # quantized, still close
    t_fp, t_w8 = tiny.encode_texts(TEXTS), q.encode_texts(TEXTS)
    assert (t_fp * t_w8).sum(1).min() > 0.95
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())
    clipped = quantize_w8a8(apply_outlier_free(tiny, gate="linear"), images, TEXTS, act_range="percentile",
                            progress=False)
    assert clipped.name.endswith("+w8a8-percentile")


def test_w8a8_errors(tiny):
    with pytest.raises(UsageError, match="at least one image"):
        quantize_w8a8(tiny, [], TEXTS)
    with pytest.raises(UsageError, match="act_range"):
        quantize_w8a8(tiny, _images(2), TEXTS, act_range="mse")


def test_sample_stats_closed_form():
    x = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 4.0]])
    inf, kurt = _sample_stats(x)
    assert inf.tolist() == [1.0, 4.0]
    # row 0: symmetric two-point, kurtosis 1; row 1: mean 1, var 3, 4th moment (3*1 + 81)/4 = 21 -> 21/9
    assert kurt[0] == pytest.approx(1.0 / (1 + 1e-6)) and kurt[1] == pytest.approx(21 / (9 + 1e-6))


def test_outlier_stats_cover_every_block(tiny):
    stats = outlier_stats(tiny, _images(4), TEXTS)
    assert len(stats.layers) == 8 and {"image.0.ffn", "text.1.residual"} <= set(stats.layers)
    s = stats.summary()
    assert s["max_inf_norm"] == pytest.approx(stats.inf_norm.max()) and s["max_kurtosis"] >= s["avg_kurtosis"] > 0
    with pytest.raises(UsageError):
        outlier_stats(tiny)
