"""``cliplab rank``: zero-shot ordering, ``--fit`` then ``--adapter``, one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from cliplab.cli.main import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("rank-images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranker") / "count"
    rc = main(["rank", "--fit", "shapes:count", "--target", "count", "--out", str(out), "--n", "8",
               "--epochs", "1", "--model", str(tiny_dir)])
    assert rc == 0
    return out


def test_zero_shot_orders_by_similarity(folder, tiny_dir, tiny, capsys):
    capsys.readouterr()
    assert main(["rank", str(folder), "--by", "a photo of many shapes.", "--model", str(tiny_dir),
                 "--format", "json", "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    paths = sorted(folder.glob("*.png"))
    sims = tiny.encode_images(paths).features @ tiny.encode_texts(["a photo of many shapes."])[0]
    want = [str(paths[i]) for i in np.argsort(-sims, kind="stable")[:3]]
    assert [r["image"] for r in rows] == want and [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["score"] for r in rows] == pytest.approx(np.sort(sims)[::-1][:3], abs=1e-6)


def test_fit_then_rank_with_adapter(adapter, folder, tiny_dir, tiny, capsys):
    from cliplab.adapt import load_ranker

    meta = json.loads((adapter / "cliplab_adapter.json").read_text())
    assert meta["method"] == "ranking" and meta["target"] == "count" and meta["n_train"] == 8
    assert meta["prompt"] == "Rank the images by count."
    capsys.readouterr()
    assert main(["rank", str(folder), "--adapter", str(adapter), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ranked by: Rank the images by count.") and len(out.strip().splitlines()) == 2 + 1 + 4
    assert main(["rank", str(folder), "--adapter", str(adapter), "--model", str(tiny_dir), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    paths = sorted(folder.glob("*.png"))
    scores = load_ranker(adapter, tiny).predict([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert [r["image"] for r in rows] == [str(paths[i]) for i in np.argsort(-scores, kind="stable")]
    assert [r["score"] for r in rows] == pytest.approx(np.sort(scores)[::-1], abs=1e-5)


@pytest.mark.parametrize("argv,code,msg", [
    (["rank", "X", "--by", "a", "--adapter", "D"], 2, "not both"),
    (["rank", "X"], 2, "--by TEXT"),
    (["rank", "--by", "a"], 2, "images to rank"),
    (["rank", "--fit", "shapes:count", "--out", "D"], 2, "--target"),
    (["rank", "X", "--by", "a", "--target", "count"], 2, "go with --fit"),
    (["rank", "X", "--by", "a", "--top", "0"], 2, "--top"),
])
def test_usage_errors(argv, code, msg, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_fit_unknown_target_and_classifier_adapter(tiny_dir, tmp_path, folder, capsys):
    assert main(["rank", "--fit", "shapes:count", "--target", "weight", "--out", str(tmp_path / "r"),
                 "--n", "4", "--model", str(tiny_dir)]) == 4
    err = capsys.readouterr().err
    assert "no per-example value 'weight'" in err and "count" in err and len(err.strip().splitlines()) == 1
    assert main(["rank", str(folder), "--adapter", str(tmp_path), "--model", str(tiny_dir)]) == 4
    assert "not an adapter folder" in capsys.readouterr().err
