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
