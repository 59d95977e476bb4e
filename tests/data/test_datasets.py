"""Datasets: folders, CSV, caption tables, shards, ShapesWorld tasks, splits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplab.data.images import load_image
from cliplab.errors import DataError, UsageError
from cliplab.data.datasets import (
    ClassificationData,
    RetrievalData,
    classification_from_csv,
    classification_from_folder,
    fewshot_subset,
    load_dataset,
    retrieval_from_file,
    split_train_val,
)


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ folders


def test_folder_classes_and_names(tmp_path):
    for cls, n in (("n02_dog", 2), ("n01_cat", 3), ("n03_empty_bird", 0)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png")
    (tmp_path / "n01_cat" / "notes.txt").write_text("not an image")
    data = classification_from_folder(tmp_path)
    assert data.kind == "classification" and isinstance(data, ClassificationData)
    assert data.classnames == ["n01 cat", "n02 dog", "n03 empty bird"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1] and len(data.items) == 5
    assert all(Path(p).suffix == ".png" for p in data.items)

    mapping = tmp_path.parent / "names.json"
    mapping.write_text(json.dumps({"n01_cat": "cat", "n02_dog": "dog", "n03_empty_bird": "bird"}))
    assert classification_from_folder(tmp_path, classnames_json=mapping).classnames == ["cat", "dog", "bird"]
    assert classification_from_folder(tmp_path, classnames_json=["c", "d", "b"]).classnames == ["c", "d", "b"]
    with pytest.raises(DataError, match="no entry for"):
        classification_from_folder(tmp_path, classnames_json={"n01_cat": "cat"})
    with pytest.raises(DataError, match="3 classes"):
        classification_from_folder(tmp_path, classnames_json=["cat"])
    with pytest.raises(DataError, match="not a folder"):
        classification_from_folder(tmp_path / "nope")


def test_load_dataset_folder_with_split_folders(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png")
    _png(tmp_path / "test" / "a" / "0.png")
    _png(tmp_path / "test" / "b" / "0.png")
    data = load_dataset(tmp_path)  # default split "test"
    assert data.classnames == ["a", "b"] and len(data) == 2
    assert len(load_dataset(tmp_path, "train")) == 1
    with pytest.raises(DataError, match="no 'val' split"):
        load_dataset(tmp_path, "val")


# ------------------------------------------------------------------ CSV


def test_csv_string_labels_and_bad_rows(tmp_path):
    (tmp_path / "t.csv").write_text(
        "filepath,label\n"
        "img/a.png,dog\n"
        "img/b.png,cat\n"
        "img/c.png\n"            # line 4: too few fields
        ",cat\n"                 # line 5: empty path
        "img/d.png,\n"           # line 6: empty label
        "/abs/e.png,dog\n"
    )
    data = classification_from_csv(tmp_path / "t.csv")
    assert data.classnames == ["cat", "dog"] and data.labels.tolist() == [1, 0, 1]
    assert data.items[0] == tmp_path / "img/a.png" and data.items[2] == Path("/abs/e.png")
    assert [s.source for s in data.skipped] == [f"{tmp_path / 't.csv'}:{n}" for n in (4, 5, 6)]
    assert "malformed row" in data.skipped[0].reason and data.skipped[2].reason == "empty label"

    named = classification_from_csv(tmp_path / "t.csv", classnames_json={"cat": "a cat", "dog": "a dog"})
    assert named.classnames == ["a cat", "a dog"] and named.labels.tolist() == [1, 0, 1]
    # a class list orders the classes; labels outside it are skipped and counted
    ordered = classification_from_csv(tmp_path / "t.csv", classnames_json=["dog"])
    assert ordered.classnames == ["dog"] and ordered.labels.tolist() == [0, 0]
    assert "unknown label 'cat'" in ordered.skipped[-1].reason


def test_csv_integer_labels_and_header_errors(tmp_path):
    (tmp_path / "t.csv").write_text("image,class\na.png,2\nb.png,0\n")
    data = classification_from_csv(tmp_path / "t.csv")  # aliases for both columns
    assert data.classnames == ["0", "1", "2"] and data.labels.tolist() == [2, 0]
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["zero", "one", "two"]))
    assert classification_from_csv(tmp_path / "t.csv", classnames_json=names).classnames == ["zero", "one", "two"]
    (tmp_path / "bad.csv").write_text("filepath,caption\na.png,x\n")
    with pytest.raises(DataError, match=r"bad\.csv:1: no column 'label'.*label_key"):
        classification_from_csv(tmp_path / "bad.csv")
    (tmp_path / "none.csv").write_text("filepath,label\n,\n")
    with pytest.raises(DataError, match="no usable row"):
        classification_from_csv(tmp_path / "none.csv")
    names.write_text("{not json")
    with pytest.raises(DataError, match="not a JSON class-name file"):
        classification_from_csv(tmp_path / "t.csv", classnames_json=names)


def test_csv_integer_label_cannot_size_the_class_table(tmp_path, monkeypatch):
    """One integer label fixes the class count (0..max): 99999999999 would build 10^11
    names (22 GB before the kernel killed it).  It is refused before anything is built,
    as bad input data (exit 4), naming the line; with class names the label is only
    an unknown label; the limit itself is allowed."""
    import resource

    from cliplab.data import datasets

    (tmp_path / "t.csv").write_text("filepath,label\na.png,0\nb.png,99999999999\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"t\.csv:3: label 99999999999 would make 100,000,000,000 classes") as caught:
        load_dataset(tmp_path / "t.csv")
    assert caught.value.exit_code == 4
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: < 100 MB
    named = classification_from_csv(tmp_path / "t.csv", classnames_json=["cat", "dog"])
    assert named.classnames == ["cat", "dog"] and named.labels.tolist() == [0]
    assert "unknown label '99999999999'" in named.skipped[0].reason
    monkeypatch.setattr(datasets, "MAX_CLASSES", 4)
    (tmp_path / "edge.csv").write_text("filepath,label\na.png,3\nb.png,-1\n")
    edge = classification_from_csv(tmp_path / "edge.csv")
    assert edge.classnames == ["0", "1", "2", "3"] and edge.labels.tolist() == [3]
    assert "unknown label '-1'" in edge.skipped[0].reason
    (tmp_path / "edge.csv").write_text("filepath,label\na.png,4\n")
    with pytest.raises(DataError, match="at most 4"):
        classification_from_csv(tmp_path / "edge.csv")


def test_load_dataset_csv_kind(tmp_path):
    (tmp_path / "cls.csv").write_text("filepath,label\na.png,x\nb.png,y\nc.png,x\n")
    (tmp_path / "ret.csv").write_text("filepath,caption\na.png,one\na.png,two\nb.png,three\n")
    assert load_dataset(tmp_path / "cls.csv").kind == "classification"
    ret = load_dataset(tmp_path / "ret.csv")
    assert ret.kind == "retrieval" and ret.captions == [["one", "two"], ["three"]]
    assert len(load_dataset(tmp_path / "cls.csv", n=2, seed=1)) == 2
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.csv")
    with pytest.raises(UsageError, match="unknown dataset type"):
        (tmp_path / "x.txt").write_text("hi")
        load_dataset(tmp_path / "x.txt")


# ------------------------------------------------------------------ retrieval


def test_retrieval_from_jsonl_and_shards(tmp_path):
    (tmp_path / "r.jsonl").write_text(
        json.dumps({"image": "a.png", "captions": ["one", "uno"]}) + "\n"
        + json.dumps({"image": "b.png", "caption": "two"}) + "\n"
        + "{broken\n")
    data = retrieval_from_file(tmp_path / "r.jsonl")
    assert isinstance(data, RetrievalData) and data.kind == "retrieval"
    assert data.captions == [["one", "uno"], ["two"]] and data.items[1] == tmp_path / "b.png"
    assert len(data.skipped) == 1 and "malformed row" in data.skipped[0].reason

    shard = tmp_path / "shards" / "shard-0000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for key, value, text in (("s0", 10, "red\nrouge"), ("s1", 200, "blue"), ("s2", 50, None)):
            members = [(f"{key}.png", _png_bytes(value))]
            if text is not None:
                members.append((f"{key}.txt", text.encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for spec in (shard, shard.parent, str(shard.parent / "shard-{0000..0000}.tar")):
        data = load_dataset(spec)
        assert data.kind == "retrieval" and data.captions == [["red", "rouge"], ["blue"]]
        assert [np.asarray(load_image(b))[0, 0, 0] for b in data.items] == [10, 200]
        assert len(data.skipped) == 1 and "no text" in data.skipped[0].reason


# ------------------------------------------------------------------ ShapesWorld


@pytest.mark.parametrize("task, n_classes", [("color-shape", 64), ("shape", 8), ("color", 8)])
def test_shapes_classification_tasks(task, n_classes):
    data = load_dataset(f"shapes:{task}", "val", n=40)
    assert data.kind == "classification" and data.name == f"shapes:{task}"
    assert len(data) == 40 and len(data.classnames) == n_classes
    assert data.labels.min() >= 0 and data.labels.max() < n_classes
    assert all(isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape == (64, 64, 3)
               for x in data.items)
    again = load_dataset(f"shapes:{task}", "val", n=40)
    assert np.array_equal(again.labels, data.labels) and np.array_equal(again.items[7], data.items[7])
    assert "heart" not in " ".join(data.classnames)  # the OOD shapes are not classes


def test_shapes_labels_match_the_scenes():
    from cliplab.data.shapes import shapes_tiny_world

    data = load_dataset("shapes:color-shape", "test", n=20)
    world = shapes_tiny_world(0)
    for i in (0, 5, 19):
        obj = world.scene("test", i).objects[0]
        assert data.classnames[data.labels[i]] == f"{obj.color} {obj.shape}"
        assert np.array_equal(data.items[i], world.scene("test", i).image)
    assert len(load_dataset("shapes:shape")) == 1000  # the documented default n for test


def test_shapes_heldout_task_only_has_heldout_compositions():
    from cliplab.data.shapes import shapes_tiny_world

    heldout = {f"{c} {s}" for c, s in shapes_tiny_world(0).heldout}
    data = load_dataset("shapes:color-shape-heldout", n=30)
    assert len(data) == 30 and len(data.classnames) == 64
    names = {data.classnames[k] for k in data.labels}
    assert names <= heldout and len(names) > 1
    seen = load_dataset("shapes:color-shape", "train", n=300)
    assert not {seen.classnames[k] for k in seen.labels} & heldout
    with pytest.raises(UsageError, match="only for split 'test'"):
        load_dataset("shapes:color-shape-heldout", "train")


def test_shapes_retrieval_and_errors():
    data = load_dataset("shapes:retrieval", n=25)
    assert data.kind == "retrieval" and len(data) == 25
    assert all(len(c) >= 3 for c in data.captions)
    assert any("and" in c[0] or "," in c[0] for c in data.captions)  # some multi-object scenes
    with pytest.raises(UsageError, match="unknown ShapesWorld task"):
        load_dataset("shapes:nope")
    with pytest.raises(UsageError, match="unknown split"):
        load_dataset("shapes:shape", "dev")


# ------------------------------------------------------------------ splits


def _toy(counts=(10, 6, 1, 3)):
    labels = np.concatenate([[c] * n for c, n in enumerate(counts)])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    return ClassificationData([f"img{i}.png" for i in range(len(labels))], labels,
                              [f"c{c}" for c in range(len(counts))], "toy")


def test_split_train_val_is_stratified_and_deterministic():
    data = _toy()
    train, val = split_train_val(data, val_fraction=0.2, seed=0)
    assert sorted(train.items + val.items) == sorted(data.items)
    assert not set(train.items) & set(val.items)
    assert np.bincount(val.labels, minlength=4).tolist() == [2, 1, 0, 1]
    assert np.bincount(train.labels, minlength=4).tolist() == [8, 5, 1, 2]
    again_train, again_val = split_train_val(data, val_fraction=0.2, seed=0)
    assert again_val.items == val.items and again_train.items == train.items
    _, other = split_train_val(data, val_fraction=0.2, seed=1)
    assert other.items != val.items
    assert val.meta["split"] == "val" and train.classnames == data.classnames
    # original order is kept inside each part
    order = {x: i for i, x in enumerate(data.items)}
    assert [order[x] for x in val.items] == sorted(order[x] for x in val.items)
    with pytest.raises(UsageError):
        split_train_val(data, val_fraction=1.0)
    ret_train, ret_val = split_train_val(RetrievalData(list(range(10)), [["c"]] * 10, "r"))
    assert len(ret_val) == 2 and len(ret_train) == 8


def test_fewshot_subset_k_per_class():
    data = _toy()
    two = fewshot_subset(data, 2, seed=0)
    assert np.bincount(two.labels, minlength=4).tolist() == [2, 2, 1, 2]
    assert fewshot_subset(data, 2, seed=0).items == two.items
    assert fewshot_subset(data, 2, seed=1).items != two.items
    four = fewshot_subset(data, 4, seed=0)
    assert set(two.items) <= set(four.items)  # nested in k for one seed
    assert np.bincount(fewshot_subset(data, 100, seed=0).labels).tolist() == [10, 6, 1, 3]
    with pytest.raises(UsageError):
        fewshot_subset(data, 0, seed=0)


# ------------------------------------------------------------------ one file, one image


def _scenes_as_files(folder: Path, n: int = 3):
    """The first ``n`` test scenes of the shapes-tiny world (distinct colour-shapes) as PNGs."""
    from cliplab.data.shapes import shapes_tiny_world

    world = shapes_tiny_world(0)
    scenes = [world.scene("test", i) for i in range(n)]
    for i, s in enumerate(scenes):
        Image.fromarray(s.image).save(folder / f"img{i}.png")
    return scenes


def _table(path: Path, rows) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows(rows)
    return path


def test_retrieval_counts_an_image_once_whatever_its_path_spelling(tmp_path):
    import cliplab
    from cliplab.eval.tasks import zeroshot_retrieval
    from cliplab.features import FeatureStore

    scenes = _scenes_as_files(tmp_path)
    rows = [(f"img{i}.png", c) for i, s in enumerate(scenes) for c in s.captions[:2]]
    bb = cliplab.load("shapes-tiny")
    perfect = {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}

    # The right value: with each image spelled one way, shapes-tiny retrieves all 3 perfectly.
    clean = load_dataset(_table(tmp_path / "clean.csv", rows))
    assert len(clean) == 3
    assert {k: v for k, v in zeroshot_retrieval(bb, clean, ks=(1,)).metrics.items()} == perfect

    # The table: one row says ./img0.png, the other img0.png.  It counted 4 images,
    # two of them the same file, and R@1 fell to 0.833 (text -> image) / 0.75 (image -> text).
    respelled = load_dataset(_table(tmp_path / "issue.csv", [("./img0.png", rows[0][1])] + rows[1:]))
    assert len(respelled) == 3 and respelled.items == clean.items
    assert respelled.captions == clean.captions
    assert zeroshot_retrieval(bb, respelled, ks=(1,)).metrics == perfect

    # Every other spelling, through the feature cache too.
    (tmp_path / "sub").mkdir()
    (tmp_path / "link2.png").symlink_to(tmp_path / "img2.png")
    spelled = [str(tmp_path / "img0.png"), ".//img0.png", "sub/../img1.png", "./sub/../img1.png",
               "link2.png", "img2.png"]
    many = load_dataset(_table(tmp_path / "many.csv", [(p, r[1]) for p, r in zip(spelled, rows)]))
    assert many.items == clean.items and many.captions == clean.captions
    store = FeatureStore(tmp_path / "cache", bb, progress=False)
    assert zeroshot_retrieval(bb, many, store=store, ks=(1,)).metrics == perfect
    assert store.n_features == 3 + 6                     # 3 images, 6 captions: one key each


def test_classification_csv_counts_an_image_once(tmp_path):
    for i in range(3):
        _png(tmp_path / f"img{i}.png", i)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link0.png").symlink_to(tmp_path / "img0.png")
    (tmp_path / "t.csv").write_text(
        "filepath,label\n"
        "img0.png,cat\n"
        "./img0.png,cat\n"          # 3: the same file again
        "img1.png,dog\n"
        "sub/../img1.png,cat\n"     # 5: the same file with another label
        "link0.png,cat\n"           # 6: a symbolic link to img0.png
        "img2.png,dog\n"
    )
    data = classification_from_csv(tmp_path / "t.csv")
    assert data.items == [tmp_path / f"img{i}.png" for i in range(3)]
    assert data.labels.tolist() == [0, 1, 1] and data.classnames == ["cat", "dog"]
    src = f"{tmp_path / 't.csv'}"
    assert [(s.source, s.reason.split(":")[0]) for s in data.skipped] == [
        (f"{src}:3", "duplicate image"), (f"{src}:5", "conflicting label 'cat'"),
        (f"{src}:6", "duplicate image")]
    assert "same file as line 4 (label 'dog'), which is kept" in data.skipped[1].reason


def test_folder_counts_an_image_once_and_reports_images_outside_class_folders(tmp_path):
    _png(tmp_path / "cat" / "a.png", 1)
    _png(tmp_path / "cat" / "b.png", 2)
    _png(tmp_path / "dog" / "c.png", 3)
    (tmp_path / "dog" / "a_too.png").symlink_to(tmp_path / "cat" / "a.png")   # one file, two classes
    _png(tmp_path / "stray.png", 4)                                           # in no class folder
    (tmp_path / "notes.txt").write_text("not an image")
    data = classification_from_folder(tmp_path)
    assert data.items == [tmp_path / "cat" / "a.png", tmp_path / "cat" / "b.png", tmp_path / "dog" / "c.png"]
    assert data.labels.tolist() == [0, 0, 1]
    assert [(Path(s.source).name, s.reason.split(":")[0]) for s in data.skipped] == [
        ("stray.png", "not in a class folder"), ("a_too.png", "duplicate image")]
    assert "class 'cat'" in data.skipped[1].reason


def test_unclosed_quote_in_a_table_is_counted_not_swallowed(tmp_path):
    (tmp_path / "t.csv").write_text('filepath,label\na.png,cat\nb.png,"dog\nc.png,cat\nd.png,dog\n')
    data = classification_from_csv(tmp_path / "t.csv")
    assert [Path(p).name for p in data.items] == ["a.png"]
    assert [s.source.rsplit(":", 1)[1] for s in data.skipped] == ["3", "4", "5"]
    assert all("never closed" in s.reason for s in data.skipped)
    (tmp_path / "ok.csv").write_text('filepath,caption\na.png,"two\nlines"\nb.png,one\n')
    ret = retrieval_from_file(tmp_path / "ok.csv")      # a closed multi-line field is fine
    assert ret.captions == [["two\nlines"], ["one"]] and ret.skipped == []
