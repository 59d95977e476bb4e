"""The ``anomaly`` eval task: MVTec-style folders and ``shapes:inspection`` through ``cliplab eval``."""

from __future__ import annotations

import json

import pytest

from cliplab.cli.main import main
from cliplab.data.shapes.inspection import InspectionWorld, export_mvtec
from cliplab.eval.anomaly import evaluate_anomaly
from cliplab.eval.tasks import TASKS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny MVTec AD-style folder, as a user's MVTec AD or VisA folder is laid out."""
    root = tmp_path_factory.mktemp("mvtec")
    export_mvtec(InspectionWorld(0, image_size=32, categories=["ring", "heart"]), root, n_train=2, n_test=1,
                 progress=False)
    return root


def _metrics(capsys):
    return {r["metric"]: r["value"] for r in json.loads(capsys.readouterr().out)}


def test_anomaly_task_is_registered_with_its_options():
    meta = TASKS.meta("anomaly")
    assert meta["data"] == "anomaly" and {"method", "prompts"} <= set(meta["options"])


def test_eval_anomaly_on_an_mvtec_style_folder_matches_evaluate_anomaly(folder, tiny, tiny_dir, tmp_path, capsys):
    rc = main(["eval", "--task", "anomaly", "--dataset", str(folder), "--model", str(tiny_dir), "--method", "winclip",
               "--no-cache", "--format", "json", "--out", str(tmp_path / "r.json"), "--report", str(tmp_path / "rep")])
    assert rc == 0
    got = _metrics(capsys)
    want = evaluate_anomaly(tiny, folder, method="winclip", progress=False)
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro"):
        assert got[key] == pytest.approx(want["mean"][key])
        assert got[f"{key}/ring"] == pytest.approx(want["ring"][key])
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["task"] == "anomaly" and set(record["cliplab"]["per_category"]["0-shot"]) == {"heart", "ring", "mean"}
    assert list((tmp_path / "rep").rglob("*.png"))                          # the report's per-category plot


def test_eval_anomaly_few_shot_takes_references_from_train(folder, tiny, tiny_dir, capsys):
    rc = main(["eval", "--task", "anomaly", "--dataset", str(folder), "--model", str(tiny_dir), "--method",
               "winclip+", "--shots", "1,2", "--seeds", "3", "--no-cache", "--format", "json"])
    assert rc == 0
    got = _metrics(capsys)
    want = evaluate_anomaly(tiny, folder, method="winclip+", shots=2, seed=3, progress=False)
    assert got["pixel_auroc@2shot"] == pytest.approx(want["mean"]["pixel_auroc"])
    assert got["image_auroc@2shot/ring"] == pytest.approx(want["ring"]["image_auroc"])
    assert 0 <= got["pixel_auroc@1shot"] <= 1 and "pixel_auroc" not in got


def test_eval_anomaly_on_shapes_inspection_with_prompts(tiny, tiny_dir, tmp_path, capsys):
    from cliplab.dense.anomaly.anomalyclip import AnomalyCLIPModel, AnomalyCLIPPrompts, save_prompts

    prompts = save_prompts(AnomalyCLIPModel(tiny, AnomalyCLIPPrompts(64, text_depth=2)), tmp_path)  # untrained
    rc = main(["eval", "--task", "anomaly", "--data", "shapes:inspection", "--n", "20", "--model", str(tiny_dir),
               "--method", "anomalyclip", "--prompts", str(prompts), "--no-cache", "--format", "json"])
    assert rc == 0
    got = _metrics(capsys)
    assert 0 <= got["pixel_auroc"] <= 1 and "image_auroc/crescent" in got     # all ten categories


@pytest.mark.parametrize("argv, msg", [
    (["--method", "anomalyclip"], "--prompts"),
    (["--method", "winclip", "--prompts", "x.safetensors"], "--prompts is an option of --method anomalyclip"),
    (["--method", "nothing"], "unknown anomaly method"),
])
def test_eval_anomaly_errors_are_one_line(folder, tiny_dir, capsys, argv, msg):
    rc = main(["eval", "--task", "anomaly", "--dataset", str(folder), "--model", str(tiny_dir), "--no-cache", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1
