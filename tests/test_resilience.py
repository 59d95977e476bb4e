"""Bit-flip fault injection and ProAct's hybrid clipped activations."""

import numpy as np
import pytest
import torch

from cliplab.errors import UsageError
from cliplab.resilience import (HybridClippedActivation, apply_proact, bounded_layers, fault_campaign,
                                flip_bits, inject_faults, train_proact, weight_tensors)

from _tiny import snapshot


def _bits_fp32(t):
    return np.unpackbits(t.detach().numpy().astype(np.float32).view(np.uint8))


def test_fp32_flips_exactly_the_requested_bits_reproducibly():
    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    a = flip_bits(w, 37, fmt="fp32", rng=5)
    b = flip_bits(w, 37, fmt="fp32", rng=5)
    assert torch.equal(a, b)                                                    # same seed, same faults
    assert torch.isfinite(a).all()                                              # inf/nan replaced
    zeros = torch.zeros(64, 8)                      # no element can reach an all-ones exponent: nothing replaced
    assert int((_bits_fp32(flip_bits(zeros, 37, fmt="fp32", rng=5)) != _bits_fp32(zeros)).sum()) == 37
    clean = flip_bits(w, 37, fmt="fp32", rng=6)
    assert not torch.equal(clean, a)


def test_fp32_sign_and_exponent_flip_of_one():
    one = torch.ones(1)
    # the only bit: with 32 positions and 32 flips every bit of 1.0 flips -> ~bits of 1.0
    allflip = flip_bits(one, 32, fmt="fp32", rng=0)
    expected = (~np.array([1.0], np.float32).view(np.uint32)).view(np.float32)
    assert allflip.numpy().tobytes() == expected.tobytes()
    # an exponent flip of 1.0f (bit 30) gives 2**128 = inf, replaced by 1e31 as the reference does
    hits = {float(flip_bits(one, 1, fmt="fp32", rng=s)[0]) for s in range(200)}
    assert float(np.float32(1e31)) in hits and -1.0 in hits                                      # bit 30 and the sign bit


def test_int8_flips_are_in_the_code_and_exact_in_count():
    w = torch.tensor([1.27, -0.5, 0.0, 0.25])
    scale = 1.27 / 127
    out = flip_bits(w, 1, fmt="int8", rng=0)
    codes_before = np.round(w.numpy() / scale).astype(np.int8)
    codes_after = np.round(out.numpy() / scale).astype(np.int8)
    diff = np.unpackbits(codes_before.view(np.uint8) ^ codes_after.view(np.uint8)).sum()
    assert diff == 1
    everything = flip_bits(w, 32, fmt="int8", rng=0)                            # all 4x8 bits
    assert np.array_equal(np.round(everything.numpy() / scale).astype(np.int8), ~codes_before)


def test_inject_faults_counts_and_leaves_the_input_alone(tiny):
    before = snapshot(tiny.model)
    faulty, report = inject_faults(tiny, 1e-4, fmt="fp32", seed=3)
    tensors = weight_tensors(tiny.model, "image")
    assert report.flips == {n: int(p.numel() * 32 * 1e-4) for n, p in tensors}
    assert report.total > 0
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())
    changed = sum(not torch.equal(a, b) for a, b in zip(faulty.model.visual.parameters(),
                                                         tiny.model.visual.parameters()))
    assert changed > 0
    again, _ = inject_faults(tiny, 1e-4, fmt="fp32", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(faulty.model.parameters(), again.model.parameters()))
    with pytest.raises(UsageError, match="ber"):
        inject_faults(tiny, 2.0)
    with pytest.raises(UsageError, match="fmt"):
        inject_faults(tiny, 1e-5, fmt="bf16")


def test_fault_campaign_shape(tiny):
    images = list((np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8))
    ref = tiny.encode_images(images).features

    def agreement(bb):
        return float((bb.encode_images(images).features * ref).sum(1).mean())

    out = fault_campaign(tiny, agreement, [0.0, 1e-3], trials=2, fmt="int8", progress=False)
    assert out["clean"] == pytest.approx(1.0, abs=1e-5) and out["mean"][0] == pytest.approx(1.0, abs=1e-5)
    assert len(out["trials"][1]) == 2 and out["flips"][0] == 0 and out["flips"][1] > 0


def test_hybrid_clipped_activation_equals_the_reference_formula_for_relu():
    x = torch.linspace(-3, 5, 101)
    t = torch.tensor(2.0)
    ours = HybridClippedActivation(torch.nn.ReLU(), t)(x)
    reference = torch.maximum(torch.tensor(0.0), x - x * torch.sigmoid(20 * (x - t)))   # HyReLU (ProAct)
    assert torch.allclose(ours, reference, atol=1e-7)
    assert ours[x > 3].abs().max() < 1e-3                                         # zeroed above T


def test_apply_proact_bounds_every_mlp_and_the_last_is_neuron_wise(tiny):
    images = list((np.random.default_rng(0).random((8, 32, 32, 3)) * 255).astype(np.uint8))
    bounded = apply_proact(tiny, images)
    layers = bounded_layers(bounded.model)
    assert len(layers) == 2 and not layers[0].neuron_wise and layers[1].threshold.shape == (256,)
    cos = (bounded.encode_images(images).features * tiny.encode_images(images).features).sum(1)
    assert cos.min() > 0.9                                                        # thresholds at the maxima


def test_train_proact_changes_only_thresholds(tiny):
    rng = np.random.default_rng(0)
    images = list((rng.random((16, 32, 32, 3)) * 255).astype(np.uint8))
    labels = rng.integers(0, 3, 16)
    bounded = apply_proact(tiny, images)
    weights = {k: v.clone() for k, v in bounded.model.state_dict().items() if "threshold" not in k}
    start = [m.threshold.detach().clone() for m in bounded_layers(bounded.model)]
    out = train_proact(bounded, images, labels, ["red", "green", "blue"], steps_per_layer=3, batch_size=8,
                       decays=(0.4,), tolerance=1.0, progress=False)
    assert [r["layer"] for r in out["layers"]] == [1, 0]                          # last layer first
    after = bounded.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert any(not torch.equal(a, m.threshold) for a, m in zip(start, bounded_layers(bounded.model)))
    with pytest.raises(UsageError, match="apply_proact"):
        train_proact(tiny, images, labels, ["a", "b", "c"])
