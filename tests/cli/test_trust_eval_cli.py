"""``cliplab eval --task calibration | ood_detection`` round trips on a tiny random model."""

import json

import numpy as np
import pytest

from cliplab.cli.main import main
from cliplab.data.datasets import load_dataset


def _run(capsys, *argv):
    rc = main(["eval", *argv, "--format", "json", "--no-cache"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_calibration_task_fits_temperature_on_val(tiny_dir, tmp_path, capsys):
    out, report = tmp_path / "cal.json", tmp_path / "rep" / "r.html"
    rc, printed, err = _run(capsys, "--model", str(tiny_dir), "--task", "calibration",
                            "--dataset", "shapes:shape", "--n", "24", "--out", str(out), "--report", str(report))
    assert rc == 0, err
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    assert {"ece", "adaptive_ece", "brier", "nll", "ece_ts", "nll_ts", "temperature", "val_ece_ts"} <= set(m)
    assert 0 <= m["ece"] <= 1 and m["temperature"] > 0
    assert rec["cliplab"]["val_source"] == "val split"
    assert sum(rec["cliplab"]["reliability"]["count"]) == 24
    page = report.read_text()
    assert "<h2>Calibration</h2>" in page and "Reliability diagrams" in page
    assert any((tmp_path / "rep" / "r_figures").glob("calibration_*.png"))


def test_calibration_on_a_folder_without_splits_uses_disjoint_halves(tiny_dir, tmp_path, capsys):
    data = load_dataset("shapes:shape", "test", n=12)
    from PIL import Image

    for i, (img, y) in enumerate(zip(data.items, data.labels)):
        d = tmp_path / "f" / data.classnames[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    out = tmp_path / "cal.json"
    rc, _, err = _run(capsys, "--model", str(tiny_dir), "--task", "calibration", "--dataset",
                      str(tmp_path / "f"), "--out", str(out))
    assert rc == 0, err
    rec = json.loads(out.read_text())["cliplab"]
    assert rec["val_source"].startswith("half") and rec["n_test"] + rec["n_val"] == 12


def test_ood_detection_task(tiny_dir, tmp_path, capsys):
    out, report = tmp_path / "ood.json", tmp_path / "o.html"
    rc, _, err = _run(capsys, "--model", str(tiny_dir), "--task", "ood_detection", "--dataset", "shapes:shape",
                      "--ood-dataset", "shapes:ood", "--n", "16", "--out", str(out), "--report", str(report))
    assert rc == 0, err
    rec = json.loads(out.read_text())
    for score in ("mcm", "energy", "max_logit", "msp", "msp_probe"):
        assert 0 <= rec["metrics"][f"auroc_{score}"] <= 1 and 0 <= rec["metrics"][f"fpr95_{score}"] <= 1
    hist = rec["cliplab"]["histograms"]["mcm"]
    assert sum(hist["id"]) == 16 and sum(hist["ood"]) == 16
    assert "<h2>Out-of-distribution detection</h2>" in report.read_text()


@pytest.mark.parametrize("argv, message", [
    (["--task", "ood_detection", "--dataset", "shapes:shape"], "needs --ood-dataset"),
    (["--task", "calibration", "--dataset", "shapes:shape", "--ood-dataset", "shapes:ood"], "option of task"),
    (["--task", "calibration", "--dataset", "shapes:retrieval"], "classification dataset"),
])
def test_task_option_errors_are_one_line(tiny_dir, capsys, argv, message):
    rc, _, err = _run(capsys, "--model", str(tiny_dir), *argv, "--n", "4")
    assert rc == 2 and message in err and "Traceback" not in err


def test_shapes_ood_task_has_only_ood_shapes():
    data = load_dataset("shapes:ood", "test", n=10)
    assert data.classnames == ["heart", "crescent"] and len(data.items) == 10
    assert np.asarray(data.items[0]).shape == (64, 64, 3)


def test_fairness_task_on_a_csv_with_group_columns(tiny_dir, tmp_path, capsys):
    from PIL import Image

    data = load_dataset("shapes:shape", "test", n=40)
    rows = ["filepath,label,sex,site"]
    for i, (img, y) in enumerate(zip(data.items, data.labels)):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        label = "circle" if data.classnames[y] == "circle" else "other"
        rows.append(f"{i}.png,{label},{'FM'[i % 2]},{'AB'[(i // 2) % 2]}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    out, report = tmp_path / "f.json", tmp_path / "f.html"
    rc, _, err = _run(capsys, "--model", str(tiny_dir), "--task", "fairness", "--dataset", str(tmp_path / "meta.csv"),
                      "--positive", "circle", "--shortcut", "site", "--out", str(out), "--report", str(report))
    assert rc == 0, err
    rec = json.loads(out.read_text())
    m = rec["metrics"]
    for a in ("sex", "site"):
        assert 0 <= m[f"{a}:worst_accuracy"] <= m["acc1"] + 1e-9 <= 1
        assert f"{a}:equalized_odds_difference" in m and f"{a}:fnr_gap" in m
    groups = rec["cliplab"]["groups"]["sex"]["groups"]
    assert groups["F"]["n"] == 20 and groups["M"]["n"] == 20
    assert rec["cliplab"]["shortcut"]["aligned_from"] == "evaluated images"
    assert "<h2>Subgroups</h2>" in report.read_text()
    rc, _, err = _run(capsys, "--model", str(tiny_dir), "--task", "fairness", "--dataset", str(tmp_path / "meta.csv"),
                      "--attributes", "age")
    assert rc == 2 and "no attribute 'age'" in err


def test_robustness_task_on_user_folders_and_a_baseline(tiny_dir, tmp_path, capsys):
    from PIL import Image, ImageFilter

    data = load_dataset("shapes:shape", "test", n=16)
    for folder, blur in (("clean", 0), ("blur-1", 1), ("blur-2", 3), ("grey", None)):
        for i, (img, y) in enumerate(zip(data.items, data.labels)):
            d = tmp_path / folder / data.classnames[y]
            d.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(img)
            im = im.convert("L").convert("RGB") if blur is None else im.filter(ImageFilter.GaussianBlur(blur))
            im.save(d / f"{i}.png")
    # every class folder exists in each set, so the class lists agree
    for folder in ("clean", "blur-1", "blur-2", "grey"):
        for c in data.classnames:
            (tmp_path / folder / c).mkdir(exist_ok=True)
    shifted = ",".join(str(tmp_path / f) for f in ("blur-1", "blur-2", "grey"))
    out = tmp_path / "rob.json"
    rc, _, err = _run(capsys, "--model", str(tiny_dir), "--task", "robustness", "--dataset", str(tmp_path / "clean"),
                      "--shifted", shifted, "--out", str(out))
    assert rc == 0, err
    m = json.loads(out.read_text())["metrics"]
    assert m["mean_shift_acc1"] == pytest.approx(np.mean([m[f"acc1@{tmp_path / f}"] for f in ("blur-1", "blur-2",
                                                                                              "grey")]))
    out2 = tmp_path / "rob2.json"
    rc, _, err = _run(capsys, "--model", str(tiny_dir), "--task", "robustness", "--dataset", str(tmp_path / "clean"),
                      "--shifted", shifted, "--baseline", str(out), "--out", str(out2),
                      "--report", str(tmp_path / "r.html"))
    assert rc == 0, err
    assert "<h2>Robustness</h2>" in (tmp_path / "r.html").read_text()
    assert json.loads(out2.read_text())["metrics"]["mce"] == pytest.approx(1.0)     # against itself: CE = 1
