"""Fine-grained and ordinal ShapesWorld tasks: determinism, ground truth from the pixels, pairs."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.data.datasets import load_dataset
from cliplab.data.shapes import SHAPES_TASKS, shapes_task, shapes_tiny_world
from cliplab.data.shapes.finegrained import (
    PAIR_DETAILS,
    RELATIONS,
    SIZE_BINS,
    count_scene,
    pair_scenes,
    relation_scene,
    scene_rng,
)
from cliplab.eval.metrics import pair_accuracy
from cliplab.errors import UsageError

TASKS = ["count", "size", "size-order", "relation", "pairs"]


def test_tasks_are_registered():
    assert set(TASKS) <= set(SHAPES_TASKS.names())


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_bytes(task):
    a, b = shapes_task(task, "test", 12, seed=4), shapes_task(task, "test", 12, seed=4)
    c = shapes_task(task, "test", 12, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a.items, b.items))
    assert a.attributes.keys() == b.attributes.keys()
    assert all(np.array_equal(a.attributes[k], b.attributes[k]) for k in a.attributes)
    assert not all(np.array_equal(x, y) for x, y in zip(a.items, c.items))


@pytest.mark.parametrize("task", ["count", "size", "size-order", "relation"])
def test_attributes_have_one_entry_per_example(task):
    data = load_dataset(f"shapes:{task}", split="val", n=20)
    assert len(data) == 20 and data.meta["templates"] == ["a photo of {c}."]
    assert all(len(v) == 20 for v in data.attributes.values())
    sub = data.subset([3, 1])
    assert sub.attributes["area"].tolist() == [data.attributes["area"][i] for i in (3, 1)]


def test_count_agrees_with_the_pixels_and_is_balanced():
    world = shapes_tiny_world(0)
    data = shapes_task("count", "train", 120)
    assert data.classnames == ["one shape", "two shapes", "three shapes", "four shapes", "five shapes", "six shapes"]
    assert set(data.labels.tolist()) == set(range(6))
    assert np.bincount(data.labels).min() >= 10
    heldout = set(world.heldout)
    for i in range(40):
        scene, k = count_scene(world, "train", i, scene_rng(world, "train", i, "count"))
        assert k == data.labels[i] + 1 == len(scene.objects) == data.attributes["count"][i]
        assert len({(o.color, o.shape) for o in scene.objects}) == 1
        assert (scene.objects[0].color, scene.objects[0].shape) not in heldout
        union = np.any([o.mask for o in scene.objects], axis=0)
        for o in scene.objects:  # objects do not touch, so each can be counted
            others = np.any([q.mask for q in scene.objects if q is not o] + [np.zeros_like(union)], axis=0)
            assert o.mask.any() and not np.any(_grow(o.mask, 1) & others)
        assert int(union.sum()) == data.attributes["area"][i]


def test_size_bins_order_the_areas():
    data = shapes_task("size", "test", 200)
    area, y = np.asarray(data.attributes["area"]), data.labels
    assert data.classnames == [f"a {b} shape" for b in SIZE_BINS]
    medians = [np.median(area[y == b]) for b in range(len(SIZE_BINS))]
    assert medians == sorted(medians) and len(set(medians)) == len(medians)
    # any bin's smallest object is larger than the previous bin's median
    assert all(area[y == b].min() > medians[b - 1] for b in range(1, len(SIZE_BINS)))


def test_size_order_labels_agree_with_the_areas():
    data = shapes_task("size-order", "test", 60)
    left = np.asarray(data.attributes["area_left"])
    right = np.asarray(data.attributes["area_right"])
    assert np.array_equal(data.labels, (right > left).astype(int))
    assert np.all(np.maximum(left, right) >= 1.5 * np.minimum(left, right))


def _centre(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def test_relations_agree_with_the_masks():
    world = shapes_tiny_world(0)
    data = shapes_task("relation", "test", 80)
    assert set(data.labels.tolist()) == set(range(4))
    for i in range(80):
        scene, (label, captions) = relation_scene(world, "test", i, scene_rng(world, "test", i, "relation"))
        red, blue = scene.objects
        assert (red.color, blue.color) == ("red", "blue") and label == data.labels[i]
        (ax, ay), (bx, by) = _centre(red.mask), _centre(blue.mask)
        dx, dy = ax - bx, ay - by
        want = ("left of" if dx < 0 else "right of") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert RELATIONS[label] == want
        assert abs((dx, dy)[want in ("above", "below")]) > 1.5 * abs((dx, dy)[want in ("left of", "right of")])
        assert captions[label] == f"a red {red.shape} {want} a blue {blue.shape}"
        assert not np.any(red.mask & blue.mask)


def _grow(mask, k=2):
    out = mask.copy()
    for _ in range(k):
        g = out.copy()
        g[1:] |= out[:-1]
        g[:-1] |= out[1:]
        g[:, 1:] |= out[:, :-1]
        g[:, :-1] |= out[:, 1:]
        out = g
    return out


@pytest.mark.parametrize("detail", PAIR_DETAILS)
def test_pairs_differ_only_in_their_detail(detail):
    world = shapes_tiny_world(0)
    for p in range(12):
        (a, b), (ca, cb), what = pair_scenes(world, "test", p, detail)
        assert what == detail and ca != cb
        ka = [(o.color, o.shape) for o in a.objects]
        kb = [(o.color, o.shape) for o in b.objects]
        assert len(set(ka + kb)) == 1 and a.background == b.background
        changed = np.any(a.image != b.image, axis=2)
        objects = _grow(np.any([o.mask for o in a.objects + b.objects], axis=0), 4)  # + soft edges
        assert changed.any() and not np.any(changed & ~objects)  # background pixels identical
        if detail == "size":
            assert [o.size for o in a.objects] == ["small"] and [o.size for o in b.objects] == ["large"]
            assert b.objects[0].mask.sum() > 2 * a.objects[0].mask.sum()
            box_a, box_b = np.asarray(a.objects[0].box), np.asarray(b.objects[0].box)
            assert np.allclose(box_a[:2] + box_a[2:], box_b[:2] + box_b[2:], atol=2.0)  # same box centre
        elif detail == "position":
            assert abs(a.objects[0].mask.sum() - b.objects[0].mask.sum()) <= 0.1 * a.objects[0].mask.sum()
            (xa, ya), (xb, yb) = _centre(a.objects[0].mask), _centre(b.objects[0].mask)
            side = {"on the left": xa < xb, "on the right": xa > xb, "at the top": ya < yb, "at the bottom": ya > yb}
            assert side[next(k for k in side if ca.endswith(k))]
        else:
            assert len(b.objects) == len(a.objects) + 1
            assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))


def test_pair_dataset_layout():
    data = shapes_task("pairs", "val", 9)
    per = data.attributes
    assert len(data) == 18 and per["pair"].tolist() == [p for p in range(9) for _ in (0, 1)]
    assert per["side"].tolist() == [0, 1] * 9 and set(per["detail"]) == set(PAIR_DETAILS)
    assert all(len(c) == 1 for c in data.captions)


def test_pair_accuracy_needs_both_images_right():
    t = np.eye(4)
    x = np.eye(4)
    assert pair_accuracy(x, t, [0, 0, 1, 1]) == 1.0
    x2 = x.copy()
    x2[1] = t[0]  # image 1 picks caption 0: its pair fails, the other pair is solved
    assert pair_accuracy(x2, t, [0, 0, 1, 1]) == 0.5
    with pytest.raises(UsageError, match="exactly twice"):
        pair_accuracy(x, t, [0, 0, 0, 1])


def test_pair_detail_must_be_known():
    with pytest.raises(UsageError, match="pair detail"):
        pair_scenes(shapes_tiny_world(0), "test", 0, "colour")


def test_every_registered_task_exports_from_the_cli(tmp_path, capsys):
    from cliplab.cli.main import main
    from cliplab.data.datasets import load_dataset

    assert main(["shapes", "export", str(tmp_path / "c"), "--task", "count", "--n", "6", "--format", "csv",
                 "--no-progress"]) == 0
    back = load_dataset(str(tmp_path / "c" / "labels.csv"))
    ours = shapes_task("count", "test", 6)
    assert [back.classnames[y] for y in back.labels] == [ours.classnames[y] for y in ours.labels]
    assert back.attributes["count"].astype(int).tolist() == ours.attributes["count"].tolist()
    assert main(["shapes", "export", str(tmp_path / "f"), "--task", "spurious", "--n", "4", "--format", "folder",
                 "--no-progress"]) == 0
    assert sum(1 for _ in (tmp_path / "f").rglob("*.png")) == 4
    assert main(["shapes", "export", str(tmp_path / "p"), "--task", "pairs", "--n", "2", "--format", "jsonl",
                 "--no-progress"]) == 0
    assert len((tmp_path / "p" / "records.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(["shapes", "export", str(tmp_path / "x"), "--task", "pairs", "--n", "2", "--format", "folder"]) == 2
    assert main(["shapes", "export", str(tmp_path / "x"), "--task", "nope", "--n", "2"]) == 2
    assert main(["shapes", "list"]) == 0
    assert "spurious" in capsys.readouterr().out
