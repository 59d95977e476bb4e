"""Results files (CLIP_benchmark fields) and reports (Markdown, CSV, HTML with plots)."""

import csv
import json

import numpy as np
import pytest

from cliplab.errors import DataError
from cliplab.eval.report import build_report, comparison_rows
from cliplab.eval.results import BENCHMARK_KEYS, make_result, read_results, split_model_spec, write_results
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
    suite = write_results(tmp_path / "suite.json", recs)
    raw = json.loads(single.read_text())
    assert isinstance(raw, dict) and raw["task"] == "zeroshot_classification"
    assert isinstance(raw["metrics"]["mean_per_class_recall"], float)
    assert read_results([single, suite]) == [recs[0], *recs]
    (tmp_path / "bad.json").write_text('{"foo": 1}')
    with pytest.raises(DataError, match="missing"):
        read_results(tmp_path / "bad.json")


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
