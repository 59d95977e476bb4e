"""SearchIndex: exact search is brute force, the budget rule, recall, updates, the item table."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest

from cliplab.errors import DataError, UsageError
from cliplab.index import SearchIndex, choose_index_type
from cliplab.index.types import EXACT_MAX_MACS

FP = "a" * 64


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, *, clusters=20, spread=0.35, seed=0, centers=None):
    """Points around ``clusters`` random centres (the centres are returned for fresh queries)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)) if centers is None else centers
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, d))
    return _unit(x), centers


def _truth(x, q, k):
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def _recall(idx, x, q, k=10):
    got = [[h.id for h in hits] for hits in idx.search(q, k=k)]
    truth = _truth(x, _unit(q), k)
    return float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth.tolist())]))


def _build(x, out, **kw):
    return SearchIndex.build(x, [f"img/{i:05d}.png" for i in range(len(x))], out, model="tiny",
                             fingerprint=FP, **kw)


def test_exact_search_equals_brute_force(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 16)).astype(np.float32) * 3    # not normalised: build does it
    q = rng.standard_normal((25, 16)).astype(np.float32)
    idx = _build(x, tmp_path / "idx")
    assert idx.index_type == "flat" and len(idx) == 400 and idx.dim == 16
    hits = idx.search(q, k=10)
    xs, qs = _unit(x), _unit(q)
    scores = qs @ xs.T
    truth = np.argsort(-scores, axis=1)[:, :10]
    assert [[h.id for h in row] for row in hits] == truth.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits],
                               np.take_along_axis(scores, truth, 1), atol=1e-5)
    assert hits[3][0].path == f"img/{truth[3, 0]:05d}.png"
    one = idx.search(q[0], k=500)                   # a 1-D query; k beyond N gives N hits
    assert len(one) == 1 and len(one[0]) == 400


def test_rule_chooses_the_type_from_the_budget():
    assert choose_index_type(10_000, 512).kind == "flat"
    assert choose_index_type(EXACT_MAX_MACS // 512 + 1, 512).kind == "hnsw"      # exact too slow
    assert choose_index_type(1_000_000, 512).kind == "hnsw"                       # default 4 GiB
    plan = choose_index_type(1_000_000, 512, budget_mb=1024)
    assert plan.kind == "ivfpq" and plan.memory_bytes <= 1024 * 2 ** 20
    assert plan.params["m"] == 64 and plan.params["nlist"] == 1024 and plan.params["n_train"] <= 200_000
    small = choose_index_type(1_000_000, 512, budget_mb=20)
    assert small.kind == "ivfpq" and small.params["m"] < 64 and small.memory_bytes <= 20 * 2 ** 20
    assert choose_index_type(10_000, 512, budget_mb=10).kind == "ivfpq"            # flat needs 19.6 MB
    with pytest.raises(UsageError, match="raise --budget-mb"):
        choose_index_type(1_000_000, 512, budget_mb=1)


def test_small_budget_builds_ivfpq_with_high_recall_on_clustered_data(tmp_path):
    x, centers = _clustered(4000, 32)
    flat_mb = 4000 * (4 * 32 + 8) / 2 ** 20
    idx = _build(x, tmp_path / "idx", budget_mb=flat_mb / 2)
    assert idx.index_type == "ivfpq" and idx.manifest["memory_bytes"] <= flat_mb / 2 * 2 ** 20
    assert idx.manifest["recall_at_10"] >= 0.95
    fresh, _ = _clustered(100, 32, centers=centers, seed=7)
    assert _recall(idx, x, fresh) >= 0.9


def test_hnsw_reaches_high_recall_on_clustered_data(tmp_path):
    x, centers = _clustered(3000, 32)
    idx = _build(x, tmp_path / "idx", index_type="hnsw")
    assert idx.index_type == "hnsw" and idx.manifest["recall_at_10"] >= 0.95
    fresh, _ = _clustered(100, 32, centers=centers, seed=7)
    assert _recall(idx, x, fresh) >= 0.9


def test_refuses_another_models_queries(tmp_path):
    x, _ = _clustered(200, 16)
    idx = _build(x, tmp_path / "idx")
    idx.check_model(SimpleNamespace(name="tiny", fingerprint=FP))
    other = SimpleNamespace(name="other-model", fingerprint="b" * 64)
    with pytest.raises(UsageError, match=r"index built with model tiny \(fingerprint aaaaaaaaaaaa\), not "
                                         r"other-model"):
        idx.check_model(other)
    with pytest.raises(UsageError, match="32 dims, the index 16"):
        idx.search(np.ones((2, 32), np.float32))
    with pytest.raises(DataError, match="all zeros"):
        idx.search(np.zeros((1, 16), np.float32))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_add_remove_rebuild(tmp_path, kind):
    x, centers = _clustered(1200, 16, seed=3)
    idx = _build(x, tmp_path / "idx", index_type=kind)
    new, _ = _clustered(5, 16, centers=centers, seed=4)
    ids = idx.add(new, [f"new/{i}.png" for i in range(5)], metadata=[{"n": i} for i in range(5)])
    assert ids.tolist() == list(range(1200, 1205)) and len(idx) == 1205
    top = idx.search(new, k=1)
    assert [row[0].path for row in top] == [f"new/{i}.png" for i in range(5)]
    assert top[2][0].metadata == {"n": 2}

    assert idx.remove(["new/0.png", 1201, 7]) == 3
    with pytest.raises(UsageError, match="not in the index: new/0.png"):
        idx.remove("new/0.png")
    assert len(idx) == 1202
    gone = {"new/0.png", "new/1.png", "img/00007.png"}
    found = {h.path for row in idx.search(np.vstack([new[:2], x[7:8]]), k=20) for h in row}
    assert not found & gone

    again = SearchIndex.load(tmp_path / "idx")                  # every update is on disk
    assert len(again) == 1202 and again.search(new[2:3], k=1)[0][0].path == "new/2.png"
    assert not {h.path for h in again.search(x[7:8], k=20)[0]} & gone

    idx.rebuild()
    assert len(idx) == 1202 and idx.manifest["ntotal"] == 1202 and idx.manifest["next_id"] == 1202
    assert idx.search(new[4:5], k=1)[0][0] == SearchIndex.load(tmp_path / "idx").search(new[4:5], k=1)[0][0]
    hit = idx.search(new[4:5], k=1)[0][0]
    assert hit.path == "new/4.png" and hit.id == 1201 and hit.metadata == {"n": 4}   # renumbered, 3 removed
    assert not {h.path for h in idx.search(x[7:8], k=20)[0]} & gone


def test_metadata_round_trips_through_sqlite(tmp_path):
    x, _ = _clustered(50, 8)
    meta = [{"label": f"cls{i % 3}", "caption": "un cœur rouge ❤", "box": [1, 2.5, None], "i": i}
            for i in range(50)]
    _build(x, tmp_path / "idx", metadata=meta)
    idx = SearchIndex.load(tmp_path / "idx")
    hits = idx.search(x[[4, 31]], k=1)
    assert [h[0].metadata for h in hits] == [meta[4], meta[31]]
    with sqlite3.connect(tmp_path / "idx" / "items.sqlite") as db:
        rows = db.execute("SELECT id, path, metadata FROM items ORDER BY id").fetchall()
    assert [(i, p, json.loads(m)) for i, p, m in rows] == [(i, f"img/{i:05d}.png", meta[i])
                                                           for i in range(50)]
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["model"] == "tiny" and manifest["fingerprint"] == FP and manifest["dim"] == 8
    assert manifest["index_type"] == "flat" and manifest["count"] == 50


def test_bad_inputs_and_damaged_folders(tmp_path):
    x, _ = _clustered(30, 8)
    with pytest.raises(UsageError, match="30 feature rows but 2 paths"):
        SearchIndex.build(x, ["a", "b"], tmp_path / "i", model="m", fingerprint=FP)
    with pytest.raises(DataError, match="nothing to index"):
        SearchIndex.build(np.zeros((0, 8)), [], tmp_path / "i", model="m", fingerprint=FP)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a cliplab index"):
        _build(x, tmp_path / "photos")
    assert (tmp_path / "photos" / "keep.jpg").exists()

    idx_dir = tmp_path / "idx"
    _build(x, idx_dir)
    _build(x[:10], idx_dir)                                     # an index is replaced
    assert len(SearchIndex.load(idx_dir)) == 10
    (idx_dir / "index.faiss").write_bytes(b"not faiss")
    with pytest.raises(DataError, match="unreadable FAISS index"):
        SearchIndex.load(idx_dir)
    with pytest.raises(DataError, match="no such index folder"):
        SearchIndex.load(tmp_path / "nowhere")
