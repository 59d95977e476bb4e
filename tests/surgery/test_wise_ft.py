"""WiSE-FT interpolation: endpoints, the midpoint, no mutation, mismatch errors and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny import TINY_CFG, make_model


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """Two tiny CLIPs of the same architecture (seeds 0 and 1) saved as open_clip folders."""
    from cliplab.models.convert import save_open_clip_folder

    dirs = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"wise-ft-seed{seed}")
        save_open_clip_folder(out, TINY_CFG, make_model(seed=seed).state_dict())
        dirs.append(out)
    return dirs


@pytest.fixture(scope="module")
def pair(pair_dirs):
    import cliplab

    return cliplab.load(pair_dirs[0]), cliplab.load(pair_dirs[1])


def _sd(backbone):
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def _assert_sd_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_endpoints_are_exact(pair):
    from cliplab.surgery.wise_ft import interpolate

    zs, ft = pair
    _assert_sd_equal(_sd(interpolate(zs, ft, 0.0)), _sd(zs))
    _assert_sd_equal(_sd(interpolate(zs, ft, 1.0)), _sd(ft))
    assert zs.fingerprint != ft.fingerprint                       # the endpoints really differ


def test_midpoint_is_elementwise_mean_and_new_backbone(pair):
    from cliplab import Backbone
    from cliplab.surgery.wise_ft import interpolate

    zs, ft = pair
    mid = interpolate(zs, ft, 0.5)
    assert isinstance(mid, Backbone) and mid is not zs and mid.model is not zs.model
    sd0, sd1, sdm = _sd(zs), _sd(ft), _sd(mid)
    n_float = 0
    for k, v in sdm.items():
        if v.is_floating_point():
            n_float += 1
            torch.testing.assert_close(v, (sd0[k] + sd1[k]) / 2, rtol=0, atol=1e-7)
        else:
            assert torch.equal(v, sd0[k])
    assert n_float > 10
    assert mid.encode_texts(["a red star"]).shape == (1, TINY_CFG["embed_dim"])


def test_extrapolate_only_when_asked(pair):
    from cliplab.errors import UsageError
    from cliplab.surgery.wise_ft import interpolate

    zs, ft = pair
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(UsageError, match="alpha"):
            interpolate(zs, ft, bad)
    out = _sd(interpolate(zs, ft, 1.5, extrapolate=True))
    sd0, sd1 = _sd(zs), _sd(ft)
    k = "text_projection"
    torch.testing.assert_close(out[k], sd0[k] + 1.5 * (sd1[k] - sd0[k]), rtol=1e-5, atol=1e-6)


def test_inputs_not_mutated(pair):
    from cliplab.surgery.wise_ft import interpolate

    zs, ft = pair
    before0, before1 = _sd(zs), _sd(ft)
    mid = interpolate(zs, ft, 0.3)
    with torch.no_grad():
        for p in mid.model.parameters():                         # the result shares no storage
            p.add_(1.0)
    _assert_sd_equal(_sd(zs), before0)
    _assert_sd_equal(_sd(ft), before1)


@pytest.mark.parametrize("overrides, key", [
    (dict(embed_dim=16), "text_projection"),
    (dict(vision_cfg={**TINY_CFG["vision_cfg"], "layers": 3}), "visual.transformer.resblocks.2"),
])
def test_mismatched_architectures_name_the_key(pair, overrides, key):
    from cliplab import Backbone
    from cliplab.errors import CheckpointMismatch
    from cliplab.surgery.wise_ft import interpolate

    zs, _ = pair
    cfg = {**TINY_CFG, **overrides}
    other = Backbone(make_model(cfg, seed=2), model_cfg=cfg, preprocess_cfg=zs.preprocess_cfg,
                     tokenizer=zs.tokenizer, name="other")
    with pytest.raises(CheckpointMismatch, match=key.replace(".", r"\.")):
        interpolate(zs, other, 0.5)


def test_sweep_reports_alpha_and_metrics(pair):
    from cliplab.errors import UsageError
    from cliplab.surgery.wise_ft import sweep

    zs, ft = pair
    k = "text_projection"
    x0, x1 = float(zs.state_dict()[k][0, 0]), float(ft.state_dict()[k][0, 0])
    rows = sweep(zs, ft, [0, 0.5, 1], lambda bb: {"w": float(bb.state_dict()[k][0, 0])})
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["w"] == x0 and rows[2]["w"] == x1
    assert rows[1]["w"] == pytest.approx((x0 + x1) / 2, abs=1e-7)
    with pytest.raises(UsageError):
        sweep(zs, ft, [0.5, 2.0], lambda bb: pytest.fail("evaluated before alphas were checked"))


def test_cli_alpha_writes_a_loadable_model(pair, pair_dirs, tmp_path, capsys):
    import cliplab
    from cliplab.cli.main import main
    from cliplab.surgery.wise_ft import interpolate

    out = tmp_path / "mid"
    rc = main(["interpolate", str(pair_dirs[0]), str(pair_dirs[1]), "--alpha", "0.5", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert str(out) in printed
    loaded = cliplab.load(out)
    _assert_sd_equal(_sd(loaded), _sd(interpolate(*pair, 0.5)))


def test_cli_errors(pair_dirs, tmp_path, capsys):
    from cliplab.cli.main import main
    from cliplab.models.convert import save_open_clip_folder

    a, b = str(pair_dirs[0]), str(pair_dirs[1])
    assert main(["interpolate", a, b, "--alpha", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert main(["interpolate", a, b, "--alpha", "0.5"]) == 2               # --out missing
    assert main(["interpolate", a, b, "--sweep", "0,1"]) == 2               # --dataset missing
    cfg = {**TINY_CFG, "embed_dim": 16}
    other = save_open_clip_folder(tmp_path / "other", cfg, make_model(cfg).state_dict())
    assert main(["interpolate", a, str(other), "--alpha", "0.5", "--out", str(tmp_path / "y")]) == 3
    err = capsys.readouterr().err
    assert "text_projection" in err and not (tmp_path / "y").exists()


def test_cli_sweep_prints_a_row_per_alpha(pair_dirs, tmp_path, capsys):
    from cliplab.cli.main import main

    from cliplab.eval.results import read_results

    argv = ["interpolate", str(pair_dirs[0]), str(pair_dirs[1]), "--sweep", "0,0.5,1",
            "--task", "zeroshot_classification", "--dataset", "shapes:shape", "--n", "8"]
    assert main([*argv, "--out", str(tmp_path / "sweep.json")]) == 2   # one file per record: a folder
    assert "must be a folder" in capsys.readouterr().err
    out = tmp_path / "sweep"
    rc = main([*argv, "--out", str(out)])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    lines = printed.strip().splitlines()
    assert lines[0].split()[:2] == ["alpha", "acc1"]
    assert [line.split()[0] for line in lines[2:]] == ["0", "0.5", "1"]
    assert all(isinstance(json.loads(f.read_text()), dict) for f in out.glob("*.json"))
    recs = read_results(out)
    assert [r["cliplab"]["alpha"] for r in recs] == [0.0, 0.5, 1.0]
    assert all(r["task"] == "zeroshot_classification" and "acc1" in r["metrics"] for r in recs)
    assert recs[0]["cliplab"]["fingerprint"] != recs[2]["cliplab"]["fingerprint"]
