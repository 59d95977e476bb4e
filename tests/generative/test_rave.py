"""RAVE: residual vector, guidance and reconstruction losses, enhancement net, training, metrics."""

import json

import numpy as np
import pytest
import torch

from cliplab.errors import ModelLoadError, UsageError
from cliplab.generative import rave
from cliplab.train.losses import Batch


@pytest.fixture(scope="module")
def backbone():
    import cliplab

    return cliplab.load("shapes-tiny")


def _toy_sets(seed=0, n=20, d=8):
    rng = np.random.default_rng(seed)
    pos = rng.normal(size=(n, d)) + 2.0 * np.eye(d)[0]
    neg = rng.normal(size=(n + 3, d)) + 2.0 * np.eye(d)[1]
    return pos, neg


def test_residual_is_unit_points_from_backlit_to_well_lit_and_flips_when_swapped():
    pos, neg = _toy_sets()
    res = rave.residual_direction(pos, neg)
    assert np.linalg.norm(res.vector) == pytest.approx(1.0, abs=1e-6)
    assert np.dot(res.vector, res.positive - res.negative) > 0
    assert res.threshold == pytest.approx(float(np.dot(res.positive, res.vector)), abs=1e-6)
    # the formula, re-derived in float64
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    v_pos, v_neg = unit(unit(pos).mean(0)), unit(unit(neg).mean(0))
    np.testing.assert_allclose(res.vector, unit(v_pos - v_neg), atol=1e-6)
    swapped = rave.residual_direction(neg, pos)
    np.testing.assert_allclose(swapped.vector, -res.vector, atol=1e-6)


def test_residual_refuses_bad_sets():
    pos, neg = _toy_sets()
    with pytest.raises(UsageError, match="non-empty"):
        rave.residual_direction(pos[:0], neg)
    with pytest.raises(UsageError, match="same mean direction"):
        rave.residual_direction(pos, pos)


def test_residual_vector_of_the_backbone(backbone):
    backlit, well_lit = rave.shapes_backlit("train", range(8))
    res = rave.residual_vector(backbone, well_lit, backlit, progress=False)
    assert res.vector.shape == (backbone.embed_dim,)
    assert np.linalg.norm(res.vector) == pytest.approx(1.0, abs=1e-5)
    f_pos = backbone.encode_images(well_lit, progress=False).features
    f_neg = backbone.encode_images(backlit, progress=False).features
    assert (f_pos @ res.vector).mean() > (f_neg @ res.vector).mean()   # well-lit project higher


def test_guidance_loss_hand_computed():
    r = torch.tensor([2.0, 0.0])                        # normalised inside: (1, 0)
    thr = 0.6
    on_target = torch.tensor([[0.6, 0.8]])              # cos = 0.6 = thr
    assert rave.guidance_loss(on_target, r, thr).item() == pytest.approx(0.0, abs=1e-7)
    feats = torch.tensor([[3.0, 4.0], [5.0, 0.0]])      # cos 0.6 and 1.0
    assert rave.guidance_loss(feats, r, thr).item() == pytest.approx((0.0 + 0.4 ** 2) / 2, abs=1e-6)


def test_reconstruction_loss_sums_images_and_weights_layers():
    a = [torch.zeros(2, 3), torch.zeros(2, 2, 2)]
    b = [torch.ones(2, 3), torch.full((2, 2, 2), 2.0)]  # per-image MSE 1 and 4
    assert rave.reconstruction_loss(a, b, [1.0, 0.5]).item() == pytest.approx(2 * (1.0 + 0.5 * 4.0))
    with pytest.raises(UsageError):
        rave.reconstruction_loss(a, b, [1.0])


def test_enhancement_net_shapes_names_and_identity_start():
    net = rave.EnhancementNet(width=8, seed=0)
    x = torch.rand(2, 3, 20, 24)
    assert net(x).shape == (2, 1, 20, 24)
    with torch.no_grad():
        y = net.enhance(x)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert (y - x).abs().max().item() < 0.1             # M ~ 1 at the start
    keys = set(net.state_dict())
    assert {"cond1.weight", "cond_add1.bias", "condx.weight", "condy.weight", "ResidualBlock6.conv2.weight",
            "PPM1.features.3.1.weight", "PPM1.features.3.2.weight", "PPM1.fuse.0.weight",
            "PPM1.fuse.1.weight"} <= keys
    assert len(keys) == 30                              # the reference checkpoint's entries
    same = rave.EnhancementNet(width=8, seed=0)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in net.state_dict().items())


def test_objective_schedule_warmup_then_guidance(backbone):
    pos, neg = _toy_sets(d=backbone.embed_dim)
    res = rave.residual_direction(pos, neg)
    obj = rave.RaveObjective(backbone.model, backbone.preprocess_cfg, res, warmup_fraction=0.5)
    net = rave.EnhancementNet(width=4, seed=0)
    batch = Batch(images=torch.rand(2, 3, 64, 64), step=0, total_steps=10)
    out = obj.forward_model(net, batch)
    assert len(out["maps"]) == 1 + len(backbone.model.visual.transformer.resblocks)
    warm = obj(out, batch)
    assert warm["guidance"].item() == 0.0
    expected = rave.WARMUP_REC_WEIGHT * rave.reconstruction_loss(out["maps"], out["maps_input"], obj.warmup_weights)
    assert warm["reconstruction"].item() == pytest.approx(expected.item(), rel=1e-6)
    batch.step = 5
    joint = obj(out, batch)
    g = rave.GUIDANCE_WEIGHT * rave.guidance_loss(out["embedding"], obj.residual, res.threshold)
    assert joint["guidance"].item() == pytest.approx(g.item(), rel=1e-6) and g.item() > 0
    assert obj.joint_weights[-1] == 0.5
    unguided = rave.RaveObjective(backbone.model, backbone.preprocess_cfg, res, guided=False, warmup_fraction=0.5)
    assert unguided(out, batch)["guidance"].item() == 0.0


def test_training_leaves_the_backbone_bit_identical(backbone, tmp_path):
    backlit, well_lit = rave.shapes_backlit("train", range(8))
    res = rave.residual_vector(backbone, well_lit, backlit, progress=False)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    net = rave.train_rave(backbone, backlit, res, steps=4, batch_size=4, width=4, lr=1e-3, log_every=1,
                          warmup_fraction=0.5, out_dir=tmp_path / "run", progress=False)
    for k, v in backbone.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_guidance"] == 0.0 for r in rows] == [True, True, False, False]
    out = rave.enhance(net, backlit)
    assert out.shape == backlit.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # save / load round trip
    rave.save_enhancer(net, tmp_path / "enh")
    again = rave.load_enhancer(tmp_path / "enh")
    np.testing.assert_array_equal(rave.enhance(again, backlit), out)
    with pytest.raises(ModelLoadError, match="not a RAVE enhancer"):
        rave.load_enhancer(tmp_path / "run")


def test_image_quality_agrees_with_the_library_and_a_closed_form():
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    rng = np.random.default_rng(0)
    target = rng.uniform(0.2, 0.8, size=(3, 32, 32, 3))
    shifted = target + 0.1                               # MSE 0.01 -> PSNR 20 dB
    q = rave.image_quality(shifted, target)
    assert q["psnr"] == pytest.approx(20.0, abs=1e-6)
    assert rave.image_quality(target, target)["ssim"] == pytest.approx(1.0, abs=1e-9)
    noisy = np.clip(target + rng.normal(0, 0.05, size=target.shape), 0, 1)
    q = rave.image_quality(noisy, target)
    t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).double()  # noqa: E731
    psnr = np.mean([PeakSignalNoiseRatio(data_range=1.0)(t(noisy[i:i + 1]), t(target[i:i + 1])).item()
                    for i in range(3)])
    ssim = np.mean([StructuralSimilarityIndexMeasure(data_range=1.0)(t(noisy[i:i + 1]), t(target[i:i + 1])).item()
                    for i in range(3)])
    assert q["psnr"] == pytest.approx(psnr, abs=1e-4)     # the class API keeps float32 states
    assert q["ssim"] == pytest.approx(ssim, abs=1e-5)
    u8, v8 = (target * 255).round().astype(np.uint8), (noisy * 255).round().astype(np.uint8)
    assert rave.image_quality(v8, u8)["psnr"] == pytest.approx(rave.image_quality(v8 / 255.0, u8 / 255.0)["psnr"])


def test_enhance_cli_writes_pngs_and_skips_bad_images(tmp_path, capsys):
    from PIL import Image

    from cliplab.cli.main import main

    backlit, _ = rave.shapes_backlit("test", range(2))
    src = tmp_path / "in"
    src.mkdir()
    for i, a in enumerate(backlit):
        Image.fromarray(a).save(src / f"scene{i}.png")
    (src / "broken.png").write_bytes(b"not an image")
    net = rave.EnhancementNet(width=4, seed=0)
    rave.save_enhancer(net, tmp_path / "enh")
    assert main(["enhance", str(src), "--enhancer", str(tmp_path / "enh"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "wrote 2 enhanced image(s)" in err and "skipped 1 unreadable image(s)" in err
    got = np.asarray(Image.open(tmp_path / "out" / "scene0.png"))
    want = (rave.enhance(net, backlit[:1])[0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    assert main(["enhance", str(src), "--enhancer", str(tmp_path / "enh"), "--out", str(tmp_path / "o2"),
                 "--strict"]) == 4
    assert main(["enhance", str(src), "--enhancer", str(tmp_path / "in"), "--out", str(tmp_path / "o3")]) == 3


def test_training_leaves_the_callers_flags_train_mode_and_device():
    import cliplab

    bb = cliplab.load("shapes-tiny")
    bb.model.train()                                     # the caller's state, whatever it is
    bb.model.visual.conv1.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in bb.model.named_parameters()}
    modes = {n: m.training for n, m in bb.model.named_modules()}
    backlit, well_lit = rave.shapes_backlit("train", range(4))
    res = rave.residual_vector(bb, well_lit, backlit, progress=False)
    rave.train_rave(bb, backlit, res, steps=1, batch_size=4, width=4, progress=False)
    assert {n: p.requires_grad for n, p in bb.model.named_parameters()} == flags
    assert sum(flags.values()) == len(flags) - 1          # a mix of on and off, both restored
    assert {n: m.training for n, m in bb.model.named_modules()} == modes and bb.model.training
    assert {p.device for p in bb.model.parameters()} == {bb.device}


def test_training_on_a_bf16_backbone():
    import cliplab

    bb = cliplab.load("shapes-tiny", precision="bf16")
    backlit, well_lit = rave.shapes_backlit("train", range(4))
    res = rave.residual_vector(bb, well_lit, backlit, progress=False)
    net = rave.train_rave(bb, backlit, res, steps=2, batch_size=4, width=4, warmup_fraction=0.5, progress=False)
    out = rave.enhance(net, backlit)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert bb.model.visual.conv1.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("case, match", [
    ("garbage weights", "not a readable"),
    ("json list", "integer 'width'"),
    ("json garbage", "not readable JSON"),
    ("other width", "do not fit an enhancer of width 8"),
])
def test_corrupt_enhancer_folders_raise_one_line_model_load_errors(tmp_path, case, match):
    rave.save_enhancer(rave.EnhancementNet(width=4, seed=0), tmp_path)
    if case == "garbage weights":
        (tmp_path / "enhancer.safetensors").write_bytes(b"\x00" * 64)
    elif case == "json list":
        (tmp_path / "enhancer.json").write_text("[4]")
    elif case == "json garbage":
        (tmp_path / "enhancer.json").write_text("{width")
    else:
        (tmp_path / "enhancer.json").write_text(json.dumps({"method": "RAVE", "width": 8}))
    with pytest.raises(ModelLoadError, match=match) as info:
        rave.load_enhancer(tmp_path)
    assert "\n" not in str(info.value)


def test_enhance_cli_exit_codes_for_a_corrupt_enhancer_and_no_readable_image(tmp_path, capsys):
    from cliplab.cli.main import main

    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.png").write_bytes(b"not an image")
    rave.save_enhancer(rave.EnhancementNet(width=4, seed=0), tmp_path / "enh")
    assert main(["enhance", str(src), "--enhancer", str(tmp_path / "enh"), "--out", str(tmp_path / "out")]) == 4
    err = capsys.readouterr().err
    assert "none of the 1 image(s) could be read" in err and "Traceback" not in err
    assert "wrote" not in err
    (tmp_path / "enh" / "enhancer.safetensors").write_bytes(b"garbage")
    (src / "ok.png").write_bytes(b"")
    assert main(["enhance", str(src), "--enhancer", str(tmp_path / "enh"), "--out", str(tmp_path / "o2")]) == 3
    err = capsys.readouterr().err
    assert "not a readable" in err and len(err.strip().splitlines()) == 1


def test_large_images_get_a_downscaled_illumination_map_at_full_output_size():
    net = rave.EnhancementNet(width=4, seed=0)
    backlit, _ = rave.shapes_backlit("test", range(1))
    big = np.repeat(np.repeat(backlit, 4, axis=1), 4, axis=2)            # (1, 256, 256, 3)
    full = rave.enhance(net, big)
    capped = rave.enhance(net, big, max_side=64)
    assert capped.shape == full.shape == (1, 256, 256, 3)
    assert 0 < np.abs(capped - full).mean() < 0.05                       # close, not the same map
    np.testing.assert_array_equal(rave.enhance(net, backlit, max_side=64), rave.enhance(net, backlit))
    with pytest.raises(UsageError):
        rave.enhance(net, backlit, max_side=2)


def test_enhance_cli_refuses_to_overwrite_inputs_and_maps_names(tmp_path, capsys):
    import csv

    from PIL import Image

    from cliplab.cli.main import main

    backlit, _ = rave.shapes_backlit("test", range(2))
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    Image.fromarray(backlit[0]).save(tmp_path / "a" / "img.png")
    Image.fromarray(backlit[1]).save(tmp_path / "b" / "img.png")
    rave.save_enhancer(rave.EnhancementNet(width=4, seed=0), tmp_path / "enh")
    assert main(["enhance", str(tmp_path / "a" / "img.png"), "--enhancer", str(tmp_path / "enh"),
                 "--out", str(tmp_path / "a")]) == 2
    assert "would overwrite an input image" in capsys.readouterr().err
    assert main(["enhance", str(tmp_path / "a"), str(tmp_path / "b"), "--enhancer", str(tmp_path / "enh"),
                 "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.reader(open(tmp_path / "out" / "enhanced.csv")))
    assert rows[0] == ["input", "output"] and [r[1] for r in rows[1:]] == ["img.png", "img_1.png"]
    assert [r[0] for r in rows[1:]] == [str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png")]
    assert main(["enhance", str(tmp_path / "a"), "--enhancer", str(tmp_path / "enh"), "--out", str(tmp_path / "o"),
                 "--max-side", "3"]) == 2
    (tmp_path / "c").mkdir()
    Image.fromarray(backlit[0]).save(tmp_path / "c" / "photo.jpg")
    assert main(["enhance", str(tmp_path / "c"), "--enhancer", str(tmp_path / "enh"),
                 "--out", str(tmp_path / "c")]) == 2                   # no name clash, still refused
    assert main(["enhance", str(tmp_path / "c"), "--enhancer", str(tmp_path / "enh"),
                 "--out", str(tmp_path / "c" / "sub")]) == 2
    assert "is an input folder or inside one" in capsys.readouterr().err
    assert main(["enhance", str(tmp_path / "c"), "--enhancer", str(tmp_path / "enh"), "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.reader(open(tmp_path / "out" / "enhanced.csv")))       # earlier rows kept, one per output
    assert sorted(r[1] for r in rows[1:]) == ["img.png", "img_1.png", "photo.png"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    assert main(["enhance", str(tmp_path / "bad"), "--enhancer", str(tmp_path / "enh"),
                 "--out", str(tmp_path / "never")]) == 4
    assert not (tmp_path / "never").exists()
