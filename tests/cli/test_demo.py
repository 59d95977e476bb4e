import csv

from cliplab.cli.main import main


def test_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--n", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 16 and {"true", "predicted", "prob", "correct"} <= set(rows[0])
    assert len(list((out / "images").glob("*.png"))) == 16
    assert (out / "grid.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "held-out compositions" in report and "grid.png" in report
    # the printed accuracy is the one in the CSV
    acc = sum(r["correct"] == "True" for r in rows) / 16
    assert f"accuracy {100 * acc:.1f}%" in printed


def test_demo_classifies_the_eval_world(tmp_path):
    """The demo's scenes, truths and classes are those of shapes:color-shape (same seed)."""
    import numpy as np
    from PIL import Image

    import cliplab
    from cliplab.demo import run_demo
    from cliplab.data.datasets import load_dataset

    res = run_demo(cliplab.load("shapes-tiny"), tmp_path, n=12, seed=2026, progress=False)
    data = load_dataset("shapes:color-shape", "test", n=12, seed=2026)
    assert res.n_classes == len(data.classnames) == 64
    assert [r["true"] for r in res.rows] == [data.classnames[y] for y in data.labels]
    for row, image in zip(res.rows, data.items):
        with Image.open(tmp_path / row["image"]) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), image)
