"""``cliplab eval`` and ``cliplab report`` on a tiny random model and tiny ShapesWorld tasks."""

import argparse
import csv
import json
import math

import pytest
from clip_benchmark.cli import main_build

from cliplab.cli.main import main
from cliplab.eval import suite
from cliplab.eval.results import read_results


def test_eval_task_writes_results_and_report(tiny_dir, tmp_path, capsys):
    out, report = tmp_path / "r.json", tmp_path / "rep" / "r.html"
    rc = main(["eval", "--model", str(tiny_dir), "--task", "zeroshot_classification",
               "--dataset", "shapes:color-shape", "--n", "12", "--out", str(out),
               "--report", str(report), "--cache", str(tmp_path / "cache"), "--format", "json"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    rec = json.loads(out.read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(rec)
    assert rec["dataset"] == "shapes:color-shape" and rec["task"] == "zeroshot_classification"
    assert set(rec["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert len(rec["cliplab"]["classnames"]) == 64 and rec["cliplab"]["timings"]["image_features"] >= 0
    assert sum(map(sum, rec["cliplab"]["confusion_matrix"])) == 12
    assert json.loads(printed)[0]["metric"] == "acc1"
    page = report.read_text()
    assert "<img" in page and (tmp_path / "rep" / "r.md").exists() and (tmp_path / "rep" / "r.csv").exists()
    assert any((tmp_path / "cache").rglob("chunk_*.npz"))           # features went to the cache


def test_eval_suite_and_report_command(tiny_dir, tmp_path, monkeypatch, capsys):
    small = [dict(task="zeroshot_classification", dataset="shapes:shape", n=8, templates="a {c}."),
             dict(task="zeroshot_retrieval", dataset="shapes:retrieval", n=6),
             dict(task="linear_probe", dataset="shapes:shape", n=16, n_train=32),
             dict(task="fewshot", dataset="shapes:shape", n=16, n_train=32)]
    monkeypatch.setitem(suite.SUITES, "shapes", small)
    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "suite"
    rc = main(["eval", "--suite", "shapes", "--model", str(tiny_dir), "--out", str(out),
               "--seeds", "0,1", "--shots", "1,2"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    files = sorted(out.glob("*.json"))                              # one record per file, as CLIP_benchmark
    assert len(files) == 4 and all(isinstance(json.loads(f.read_text()), dict) for f in files)
    recs = {r["task"]: r for r in read_results(out)}
    assert set(recs) == {"zeroshot_classification", "zeroshot_retrieval", "linear_probe", "fewshot"}
    assert "image_retrieval_recall@10" in recs["zeroshot_retrieval"]["metrics"]
    assert recs["linear_probe"]["cliplab"]["C"] > 0
    fs = recs["fewshot"]["cliplab"]
    assert fs["fewshot"][0]["ks"] == [1, 2] and fs["seeds"] == [0, 1]
    assert any((tmp_path / "cache").iterdir())                     # $CLIPLAB_CACHE is the default
    # CLIP_benchmark's own `clip_benchmark build FOLDER`: every value in its column
    main_build(argparse.Namespace(files=[str(out)], output=str(tmp_path / "benchmark.csv")))
    with open(tmp_path / "benchmark.csv", newline="") as f:
        rows = {r["task"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(recs)
    for task, rec in recs.items():
        for k, v in rec["metrics"].items():
            assert float(rows[task][k]) == v or (math.isnan(v) and rows[task][k] == "nan"), (task, k)
    assert rows["linear_probe"]["acc1"] == "" and float(rows["linear_probe"]["lp_acc1"]) > 0
    assert rows["zeroshot_classification"]["lp_acc1"] == "" and rows["fewshot"]["acc1"] == ""
    rc = main(["report", str(out), "--out", str(tmp_path / "rep")])  # the folder, as build reads it
    printed, err = capsys.readouterr()
    assert rc == 0, err
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("<img") == 3                                  # confusion, few-shot, retrieval
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| shapes:shape | fewshot | acc1@1shot |" in md and "| shapes:shape | linear_probe | lp_acc1 |" in md


@pytest.mark.parametrize("argv, code, message", [
    (["eval", "--task", "fewshot"], 2, "--dataset"),
    (["eval", "--task", "zeroshot_retrieval", "--dataset", "shapes:shape", "--n", "4", "--no-cache"], 2,
     "caption"),
    (["eval", "--task", "fewshot", "--dataset", "shapes:shape", "--shots", "1,x"], 2, "--shots"),
    (["eval", "--suite", "nope", "--no-cache"], 2, "unknown suite"),
    (["eval", "--suite", "shapes", "--out", "r.json"], 2, "must be a folder"),
])
def test_eval_errors(tiny_dir, argv, code, message, capsys):
    rc = main([*argv, "--model", str(tiny_dir)])
    err = capsys.readouterr().err
    assert rc == code and message in err and "Traceback" not in err


def test_report_bad_file(tmp_path, capsys):
    (tmp_path / "x.json").write_text("not json")
    assert main(["report", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 4
    assert "not valid JSON" in capsys.readouterr().err
