"""Results files (CLIP_benchmark fields) and reports (Markdown, CSV, HTML with plots)."""

import csv
import json

import numpy as np
import pytest

from cliplab.errors import DataError, UsageError
from cliplab.eval.report import build_report, comparison_rows
from cliplab.eval.results import (BENCHMARK_KEYS, make_result, read_results, result_filename, results_folder,
                                  split_model_spec, write_results)
from cliplab.eval.tasks import TaskResult


def _records(model="shapes-tiny"):
    zs = TaskResult("zeroshot_classification", "shapes:color", {"acc1": 0.5, "acc5": 1.0,
                    "mean_per_class_recall": np.float64(0.5)},
                    {"confusion_matrix": np.array([[2, 0], [2, 0]]), "classnames": ["red", "blue"]},
                    {"image_features": 1.25}, [{"index": 3, "source": "x.png", "reason": "truncated"}])
    ret = TaskResult("zeroshot_retrieval", "shapes:retrieval",
                     {f"{d}_retrieval_recall@{k}": 0.1 * k for d in ("image", "text") for k in (1, 5, 10)})
    fs = TaskResult("fewshot", "shapes:color", {"acc1@1shot": 0.4, "acc1@2shot": 0.6},
                    {"fewshot": [{"method": "linear probe", "ks": [1, 2], "seeds": [0, 1],
                                  "mean": [0.4, 0.6], "std": [0.05, 0.02],
                                  "per_seed": [[0.35, 0.45], [0.58, 0.62]], "params": [[{}, {}], [{}, {}]]}]})
    return [make_result(r, model_spec=model, fingerprint="abc", seeds=[0, 1] if r.task == "fewshot" else None)
            for r in (zs, ret, fs)]


def test_results_have_clip_benchmark_fields(tmp_path):
    recs = _records()
    for r in recs:
        assert set(BENCHMARK_KEYS) <= set(r) and r["language"] == "en"
        assert r["model"] == "shapes-tiny" and r["pretrained"] == "bundled"
        assert isinstance(r["cliplab"]["version"], str) and r["cliplab"]["fingerprint"] == "abc"
    assert recs[0]["cliplab"]["skipped"][0]["reason"] == "truncated"
    assert recs[0]["cliplab"]["confusion_matrix"] == [[2, 0], [2, 0]]
    assert recs[2]["cliplab"]["seeds"] == [0, 1] and recs[2]["cliplab"]["fewshot"][0]["mean"] == [0.4, 0.6]
    single = write_results(tmp_path / "one.json", recs[0])
    collection = write_results(tmp_path / "suite.json", recs)         # a list in one file (benchmarks)
    folder = write_results(tmp_path / "suite", recs)                   # one record per file
    raw = json.loads(single.read_text())
    assert isinstance(raw, dict) and raw["task"] == "zeroshot_classification"
    assert isinstance(raw["metrics"]["mean_per_class_recall"], float)
    assert read_results([single, collection]) == [recs[0], *recs]
    files = sorted(folder.glob("*.json"))
    assert [f.name for f in files] == sorted(result_filename(r) for r in recs) and len(files) == 3
    assert all(isinstance(json.loads(f.read_text()), dict) for f in files)
    assert sorted(read_results(folder), key=lambda r: r["task"]) == sorted(recs, key=lambda r: r["task"])
    assert write_results(folder, recs[0]) == folder / result_filename(recs[0])   # a folder takes one record too
    (tmp_path / "bad.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match="missing"):
        read_results(tmp_path / "bad.json")


def test_non_finite_values_are_written_as_clip_benchmark_writes_them(tmp_path):
    rec = make_result(TaskResult("zeroshot_classification", "d", {"acc1": 0.5, "acc5": np.float32("nan")},
                                 {"x": [np.inf]}), model_spec="m", fingerprint="f")
    text = write_results(tmp_path / "r.json", rec).read_text()
    assert '"acc5": NaN' in text and "Infinity" in text and "null" not in text     # Python json, as its run()
    back = read_results(tmp_path / "r.json")[0]
    assert np.isnan(back["metrics"]["acc5"]) and back["cliplab"]["x"] == [np.inf]


def test_old_files_still_read(tmp_path):
    """A list file and linear-probe metrics named acc1... (written before) are read, renamed lp_."""
    old_names = {"acc1": 0.7, "acc5": None, "mean_per_class_recall": 0.6}
    lp = make_result(TaskResult("linear_probe", "shapes:shape", old_names), model_spec="m")
    zs = make_result(TaskResult("zeroshot_classification", "shapes:shape", {"acc1": 0.5}), model_spec="m")
    (tmp_path / "old.json").write_text(json.dumps([zs, lp]))
    old_zs, old_lp = read_results(tmp_path / "old.json")
    assert old_lp["metrics"] == {"lp_acc1": 0.7, "lp_acc5": None, "lp_mean_per_class_recall": 0.6}
    assert old_zs["metrics"] == {"acc1": 0.5}
    md = build_report([old_zs, old_lp], tmp_path / "rep")["md"].read_text()
    assert "| shapes:shape | linear_probe | lp_acc1 | 70.0 |" in md
    with pytest.raises(DataError, match="no results files"):
        read_results(tmp_path / "rep")


def test_a_suite_cannot_go_to_one_file(tmp_path):
    with pytest.raises(UsageError, match="must be a folder"):
        results_folder(tmp_path / "r.json")
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="must be a folder"):
        results_folder(tmp_path / "f")
    assert results_folder(tmp_path / "new") == tmp_path / "new"


def test_split_model_spec():
    assert split_model_spec("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert split_model_spec("hf-hub:org/m") == ("hf-hub:org/m", "hf-hub")
    assert split_model_spec("/tmp/models/tiny") == ("tiny", "/tmp/models/tiny")


def test_report_files(tmp_path):
    recs = _records() + _records("ViT-B-32:openai")
    paths = build_report(recs, tmp_path / "out")
    for key in ("html", "md", "csv"):
        assert paths[key].exists()
    page = paths["html"].read_text()
    assert page.count("<img") == 2 + 1 + 1          # 2 confusion matrices, 1 few-shot, 1 retrieval
    assert "data:image/png;base64," in page and "shapes-tiny" in page and "ViT-B-32:openai" in page
    assert "x.png" in page                           # skipped files are listed
    md = paths["md"].read_text()
    assert "| dataset | task | metric | shapes-tiny | ViT-B-32:openai |" in md
    assert "| shapes:color | zeroshot_classification | acc1 | 50.0 | 50.0 |" in md
    pngs = sorted(p.name for p in paths["figures"].glob("*.png"))
    assert len(pngs) == 4 and all(f"]({paths['figures'].name}/{n})" in md for n in pngs)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert rows[0].keys() >= {"dataset", "task", "metric", "shapes-tiny", "ViT-B-32:openai"}
    assert len(rows) == len(comparison_rows(recs)[1]) == 3 + 4 + 2


def test_report_to_html_path(tmp_path):
    paths = build_report(_records(), tmp_path / "r.html")
    assert paths["html"] == tmp_path / "r.html" and (tmp_path / "r.md").exists()
    assert (tmp_path / "r_figures").is_dir()


def test_report_keeps_two_runs_of_one_model_apart(tmp_path):
    first, second = _records(), _records()
    second[0]["metrics"]["acc1"] = 0.75
    paths = build_report(first + second, tmp_path)
    md = paths["md"].read_text()
    assert "| shapes-tiny | shapes-tiny (2) |" in md
    assert "| shapes:color | zeroshot_classification | acc1 | 50.0 | **75.0** |" in md
