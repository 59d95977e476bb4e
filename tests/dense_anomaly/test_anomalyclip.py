"""AnomalyCLIP: DPAM, the glocal loss terms, prompt training through the Trainer, prompt files, CLI."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab.cli.main import main
from cliplab.data.shapes.inspection import InspectionWorld, export_mvtec
from cliplab.dense.anomaly import ANOMALY_METHODS, AnomalyMethod
from cliplab.dense.anomaly import anomalyclip as ac


def _images(n=3, size=32, category="ring"):
    w = InspectionWorld(0, image_size=size)
    kinds = ("good", "hole", "scratch", "stain")
    return [w.scene(category, "test", 0, kinds[i % len(kinds)]).image for i in range(n)]


def test_vv_attention_is_softmax_of_v_v_transpose_times_v():
    v = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))   # (B, H, T, d)
    out = ac.vv_attention(v, 0.5)
    assert out.shape == (2, 3, 5, 4)
    b, h = 1, 2
    w = np.exp(0.5 * v[b, h].numpy() @ v[b, h].numpy().T)
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out[b, h].numpy(), w @ v[b, h].numpy(), rtol=1e-5, atol=1e-6)


def test_default_layers_follow_the_reference_at_24_blocks():
    assert ac.default_layers(24) == (6, 12, 18, 24)
    assert ac.default_layers(12) == (3, 6, 9, 12)
    assert ac.default_layers(2) == (1, 2)


def test_dpam_features_by_hand(tiny):
    visual = tiny.model.visual
    x = AnomalyMethod(tiny)._pixels(_images())
    from cliplab.dense.attention import prelast_tokens, project_tokens, qkv

    with torch.no_grad():
        glob, feats, grid = ac.dpam_features(visual, x, (1, 2), 1)
        assert grid == (4, 4) and [f.shape for f in feats] == [(3, 16, 32), (3, 16, 32)]
        # the global embedding is the tower's own
        np.testing.assert_allclose(F.normalize(glob, dim=-1).numpy(), tiny.encode_images(_images()).features,
                                   atol=1e-5)
        # no DPAM: the last layer's patch features are the tower's projected tokens
        _, plain, _ = ac.dpam_features(visual, x, (2,), 0)
        np.testing.assert_allclose(plain[0].numpy(), tiny.image_tokens(_images(), project=True), atol=1e-5)
        # DPAM on the last block: x_1 + W_o softmax(s v v^T) v, v from LN1(x_1), no FFN
        x1, _ = prelast_tokens(visual, x)
        block = visual.transformer.resblocks[-1]
        _, _, v = qkv(block, x1)
        w = torch.softmax(v @ v.transpose(-2, -1) * v.shape[-1] ** -0.5, dim=-1)
        side = x1 + block.attn.out_proj((w @ v).transpose(1, 2).reshape(x1.shape))
        np.testing.assert_allclose(feats[1].numpy(), project_tokens(visual, side)[:, 1:].numpy(), atol=1e-5)
        np.testing.assert_allclose(feats[0].numpy(), project_tokens(visual, x1)[:, 1:].numpy(), atol=1e-5)


def test_focal_and_dice_on_hand_values():
    probs = torch.tensor([0.8, 0.2, 0.3, 0.7]).reshape(2, 1, 1, 2).permute(0, 3, 1, 2)   # (B=2, C=2, 1, 1)
    target = torch.tensor([0.0, 1.0]).reshape(2, 1, 1)
    # one-hot clamped to [1e-5, 1 - 1e-5]; p_t = sum(onehot * p) + 1e-5
    pt = [0.8 * (1 - 1e-5) + 0.2 * 1e-5 + 1e-5, 0.7 * (1 - 1e-5) + 0.3 * 1e-5 + 1e-5]
    want = np.mean([-(1 - p) ** 2 * math.log(p) for p in pt])
    assert ac.focal_loss(probs, target).item() == pytest.approx(want, rel=1e-6)
    pred = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])                 # (B=2, 1, 2)
    gt = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    # image 1: (2 + 1) / (1 + 1 + 1) = 1; image 2: (1 + 1) / (1 + 1 + 1) = 2/3
    assert ac.dice_loss(pred, gt).item() == pytest.approx(1 - (1 + 2 / 3) / 2)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny.model.parameters()]
    out = tmp_path_factory.mktemp("anomalyclip")
    path = ac.train_anomalyclip(tiny, ["circle", "square"], steps=40, out=out, n_per_category=8, batch_size=8,
                                lr=1e-2, warmup_steps=0, progress=False)
    return path, out, before, flags


def test_training_lowers_the_loss_and_changes_only_the_prompts(tiny, trained):
    path, out, before, flags = trained
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_image", "loss_focal", "loss_dice"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    for k, v in tiny.model.state_dict().items():                          # the Backbone is bit-identical
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny.model.parameters()] == flags  # and its flags are restored
    init = ac.AnomalyCLIPPrompts(tiny.model.token_embedding.weight.shape[1], text_depth=2, seed=0)
    model = ac.load_prompts(tiny, path)
    for name, p in model.prompts.state_dict().items():                   # the prompts did move
        assert not torch.equal(p, init.state_dict()[name]), name
    cfg = json.loads(path.with_suffix(".json").read_text())
    assert cfg["train_categories"] == ["circle", "square"] and cfg["feature_layers"] == [1, 2]
    assert cfg["dpam_layers"] == 2 and cfg["text_depth"] == 2 and cfg["n_ctx"] == 12


def test_saved_prompts_give_identical_scores(tiny, trained):
    path, *_ = trained
    images = _images(4)
    model = ac.load_prompts(tiny, path)
    direct = ANOMALY_METHODS.get("anomalyclip")(tiny, prompts=model).predict(images)
    again = ac.save_prompts(model, path.parent / "copy")
    loaded = ANOMALY_METHODS.get("anomalyclip")(tiny, prompts=again).predict(images)
    assert direct.scores.shape == (4,) and direct.maps.shape == (4, 32, 32)
    assert ((direct.scores > 0) & (direct.scores < 1)).all()
    np.testing.assert_array_equal(direct.scores, loaded.scores)
    np.testing.assert_array_equal(direct.maps, loaded.maps)


def test_prompts_are_required_and_checked(tiny, tmp_path):
    from cliplab.errors import UsageError

    with pytest.raises(UsageError, match="--prompts"):
        ANOMALY_METHODS.get("anomalyclip")(tiny)
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(UsageError, match="not a safetensors file"):
        ac.load_prompts(tiny, tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="not found"):
        ac.load_prompts(tiny, tmp_path / "nothing.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec-style")
    export_mvtec(InspectionWorld(0, image_size=32, categories=["ring", "heart"]), root, n_train=2, n_test=1,
                 progress=False)
    return root


def test_anomaly_cli_with_learned_prompts(folder, trained, tiny_dir, tmp_path, capsys):
    path, *_ = trained
    rc = main(["anomaly", str(folder), "--method", "anomalyclip", "--prompts", str(path), "--model", str(tiny_dir),
               "--format", "json", "--out", str(tmp_path / "m.json")])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["category"] for r in rows] == ["heart", "ring", "mean"]
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["prompts"] == str(path) and res["results"]["ring"]["n_test"] == 7
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0 <= res["results"]["mean"][key] <= 1


def test_anomaly_cli_trains_prompts_on_another_folder(folder, tiny_dir, tmp_path, capsys):
    aux = tmp_path / "aux"
    export_mvtec(InspectionWorld(1, image_size=32, categories=["star"]), aux, n_train=1, n_test=1, progress=False)
    rc = main(["anomaly", str(folder), "--method", "anomalyclip", "--train-on", str(aux), "--train-steps", "2",
               "--prompts", str(tmp_path / "learned"), "--model", str(tiny_dir), "--format", "json",
               "--out", str(tmp_path / "m.json")])
    assert rc == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert Path(res["prompts"]).is_file() and Path(res["prompts"]).parent == tmp_path / "learned"
    assert [r["category"] for r in json.loads(capsys.readouterr().out)] == ["heart", "ring", "mean"]


@pytest.mark.parametrize("argv, msg", [
    (["--method", "anomalyclip"], "needs --prompts PATH"),
    (["--method", "winclip", "--train-on", "{tmp}"], "--train-on needs --method anomalyclip"),
    (["--method", "winclip", "--prompts", "p.safetensors"], "--prompts is an option of --method anomalyclip"),
    (["--method", "anomalyclip", "--prompts", "{tmp}/none.safetensors"], "prompts not found"),
])
def test_anomalyclip_cli_errors_are_one_line(folder, tiny_dir, tmp_path, capsys, argv, msg):
    rc = main(["anomaly", str(folder), *[a.format(tmp=tmp_path) for a in argv], "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
