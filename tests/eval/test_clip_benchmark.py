"""cliplab results read by CLIP_benchmark's own ``clip_benchmark build`` (``main_build``).

The reference is the installed ``clip-benchmark`` package (test extra), imported, not
copied: its zero-shot classification and retrieval ``evaluate`` functions run on the same
tiny model, the same preprocessed images and the same prompts, their results are dumped
as its ``run`` dumps them, and ``main_build`` reads both files into one CSV.  cliplab's
row must fill the same columns as CLIP_benchmark's row, with equal values.  Its linear
probe needs CUDA (``assert device == 'cuda'``), so for ``linear_probe`` the column names
are checked against its source instead.
"""

from __future__ import annotations

import argparse
import builtins
import csv
import inspect
import json
import math

import numpy as np
import pytest
import torch
from clip_benchmark.cli import main_build
from clip_benchmark.metrics import linear_probe as cb_linear_probe
from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
from PIL import Image

from cliplab.data.datasets import ClassificationData, RetrievalData
from cliplab.eval.results import make_result, read_results, write_results
from cliplab.eval.tasks import linear_probe, zeroshot_classification, zeroshot_retrieval

TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]
ZS = ("acc1", "acc5", "mean_per_class_recall")
LP = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")


def build(tmp_path, *paths) -> list[dict]:
    """Rows of the CSV that ``clip_benchmark build PATHS`` writes."""
    out = tmp_path / "benchmark.csv"
    main_build(argparse.Namespace(files=[str(p) for p in paths], output=str(out)))
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def cb_dump(path, metrics, *, dataset, task, model="cb-reference", pretrained="same-weights"):
    """A results file as CLIP_benchmark's ``run`` writes it (``json.dump(dump, f)``)."""
    dump = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": "en"}
    with open(path, "w") as f:
        json.dump(dump, f)
    return path


def cell(row, key) -> float:
    return float(row[key])          # csv writes repr(float): exact, "nan" for NaN


def same(a: float, b: float) -> bool:
    """Equal, NaN equal to NaN; 1e-6 absorbs CLIP_benchmark's float32 recall means (one hit is >= 1/24)."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6)


@pytest.fixture
def cb_numpy_shim(monkeypatch):
    """Let CLIP_benchmark 1.6.2's ``accuracy`` run under NumPy >= 2.4.

    It calls ``float()`` on a 1-element array, which NumPy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"; LAION-AI/CLIP_benchmark issue #147).  A
    module-level ``float`` that takes the array's one element is the squeeze that issue
    proposes; the function itself runs unchanged.
    """
    def float_(v=0.0):
        return builtins.float(v.reshape(-1)[0]) if isinstance(v, np.ndarray) else builtins.float(v)

    monkeypatch.setattr(cb_zeroshot, "float", float_, raising=False)


def _tensors(bb, n, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8) for _ in range(n)]
    return [bb.preprocess(Image.fromarray(a)) for a in arrays]        # (3, H, W) each


@pytest.mark.parametrize("n_classes", [3, 6])
def test_zeroshot_classification_fills_clip_benchmarks_columns(tiny, tmp_path, n_classes, cb_numpy_shim):
    classnames = ["red star", "blue circle", "green square", "purple heart", "black cross", "white moon"]
    classnames = classnames[:n_classes]
    x = _tensors(tiny, 4 * n_classes, seed=n_classes)
    y = np.tile(np.arange(n_classes), 4)                                # every class present
    data = ClassificationData(x, y, classnames, "toy")
    rec = make_result(zeroshot_classification(tiny, data, templates=TEMPLATES), model_spec="shapes-tiny")
    ours = write_results(tmp_path / "ours.json", rec)

    ds = torch.utils.data.TensorDataset(torch.stack(x), torch.as_tensor(y))
    ds.classes = classnames
    ref = cb_zeroshot.evaluate(tiny.model, torch.utils.data.DataLoader(ds, batch_size=5), tiny.tokenize,
                               classnames, TEMPLATES, device="cpu", amp=False)
    theirs = cb_dump(tmp_path / "theirs.json", ref, dataset="toy", task="zeroshot_classification")

    assert set(rec["metrics"]) == set(ref) == set(ZS)
    rows = {r["model"]: r for r in build(tmp_path, ours, theirs)}
    mine, cb = rows["shapes-tiny"], rows["cb-reference"]
    for k in ZS:
        assert same(cell(mine, k), cell(cb, k)), (k, mine[k], cb[k])
        assert same(cell(mine, k), rec["metrics"][k])
    assert all(not mine.get(k) for k in LP)                             # nothing in the probe columns
    if n_classes < 5:                                                   # NaN, written as CLIP_benchmark writes it
        assert math.isnan(ref["acc5"]) and math.isnan(rec["metrics"]["acc5"])
        assert '"acc5": NaN' in ours.read_text() and '"acc5": NaN' in theirs.read_text()
        assert mine["acc5"] == cb["acc5"] == "nan"
    else:
        assert 0 < rec["metrics"]["acc5"] <= 1
    assert mine["task"] == "zeroshot_classification" and mine["model_fullname"] == "shapes-tiny bundled"
    assert "confusion_matrix" in mine["cliplab"] and "confusion_matrix" not in rows["shapes-tiny"].keys()


def test_zeroshot_retrieval_fills_clip_benchmarks_columns(tiny, tmp_path):
    x = _tensors(tiny, 12, seed=7)
    words = ["red", "blue", "star", "circle", "big", "small", "two", "striped"]
    rng = np.random.default_rng(0)
    captions = [[" ".join(rng.choice(words, 3)) for _ in range(1 + i % 3)] for i in range(12)]
    rec = make_result(zeroshot_retrieval(tiny, RetrievalData(x, captions, "toy-captions")),
                      model_spec="shapes-tiny")
    ours = write_results(tmp_path / "ours.json", rec)

    ds = list(zip(x, captions))
    loader = torch.utils.data.DataLoader(ds, batch_size=5,
                                         collate_fn=lambda b: (torch.stack([i for i, _ in b]), [c for _, c in b]))
    ref = cb_retrieval.evaluate(tiny.model, loader, tiny.tokenize, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    theirs = cb_dump(tmp_path / "theirs.json", ref, dataset="toy-captions", task="zeroshot_retrieval")

    assert set(rec["metrics"]) == set(ref)                              # image_/text_retrieval_recall@1,5,10
    rows = {r["model"]: r for r in build(tmp_path, ours, theirs)}
    for k in ref:
        assert same(cell(rows["shapes-tiny"], k), cell(rows["cb-reference"], k)), k
        assert cell(rows["shapes-tiny"], k) == rec["metrics"][k]
    assert rec["metrics"]["image_retrieval_recall@1"] < 1               # not a trivial case


def _blobs(n_per_class, n_classes, seed):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = 2 * np.eye(n_classes, 8)[y] + rng.normal(size=(len(y), 8))
    return x.astype(np.float32), y


@pytest.mark.parametrize("n_classes", [3, 6])
def test_linear_probe_fills_clip_benchmarks_probe_columns(tmp_path, n_classes):
    parts = [_blobs(6, n_classes, seed) for seed in (0, 1, 2)]
    res = linear_probe(*parts[0], *parts[1], *parts[2], refine=1)
    rec = make_result(res, model_spec="ViT-B-32:openai")
    # CLIP_benchmark's linear probe returns {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", ...}
    reference_source = inspect.getsource(cb_linear_probe.evaluate)
    assert set(rec["metrics"]) == set(LP) and all(f'"{k}"' in reference_source for k in LP)
    (row,) = build(tmp_path, write_results(tmp_path / "lp.json", rec))
    for k in LP:
        assert same(cell(row, k), rec["metrics"][k])
    assert all(not row.get(k) for k in ZS)                              # zero-shot columns stay empty
    assert row["model_fullname"] == "ViT-B-32 openai" and row["task"] == "linear_probe"
    assert math.isnan(rec["metrics"]["lp_acc5"]) == (n_classes < 5)


def test_a_folder_of_results_is_what_build_and_report_read(tiny, tmp_path):
    data = ClassificationData(_tensors(tiny, 6, seed=1), np.array([0, 1, 2, 0, 1, 2]), ["a", "b", "c"], "toy")
    zs = make_result(zeroshot_classification(tiny, data, templates=TEMPLATES), model_spec="shapes-tiny")
    lp = make_result(linear_probe(*_blobs(5, 6, 0), *_blobs(5, 6, 1), *_blobs(5, 6, 2), refine=1),
                     model_spec="shapes-tiny")
    twice = [zs, lp, zs]                                                # same dataset, model and task twice
    folder = write_results(tmp_path / "suite", twice)
    assert sorted(p.name for p in folder.iterdir()) == [      # CLIP_benchmark's default --output names
        "features_bundled_shapes-tiny_en_linear_probe.json",
        "toy_bundled_shapes-tiny_en_zeroshot_classification.json",
        "toy_bundled_shapes-tiny_en_zeroshot_classification_2.json"]
    rows = build(tmp_path, folder)
    assert sorted(r["task"] for r in rows) == ["linear_probe", "zeroshot_classification", "zeroshot_classification"]
    by_task = {r["task"]: r for r in rows}
    assert cell(by_task["linear_probe"], "lp_acc1") == lp["metrics"]["lp_acc1"]
    assert cell(by_task["zeroshot_classification"], "acc1") == zs["metrics"]["acc1"]
    back = read_results(folder)
    assert sorted(r["task"] for r in back) == sorted(r["task"] for r in twice)
