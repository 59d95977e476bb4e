"""Subgroup / shortcut ShapesWorld task: controllable correlations, group ground truth, pixels."""

from __future__ import annotations

import numpy as np
import pytest

from cliplab.data.datasets import load_dataset
from cliplab.data.shapes import shapes_tiny_world
from cliplab.data.shapes.subgroups import PROTECTED, SITES, spurious_data, spurious_scene
from cliplab.errors import UsageError


@pytest.fixture(scope="module")
def world():
    return shapes_tiny_world(0)


def test_same_seed_same_bytes(world):
    a = spurious_data(world, "test", 16)
    b = spurious_data(world, "test", 16)
    c = spurious_data(shapes_tiny_world(1), "test", 16)
    assert all(np.array_equal(x, y) for x, y in zip(a.items, b.items))
    assert a.attributes.keys() == b.attributes.keys() and np.array_equal(a.labels, b.labels)
    assert all(np.array_equal(a.attributes[k], b.attributes[k]) for k in a.attributes)
    assert not all(np.array_equal(x, y) for x, y in zip(a.items, c.items))


def _within(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9  # 4 sigma


@pytest.mark.parametrize("site_p, prot_p", [(0.9, 0.7), (0.1, 0.3), (0.5, 0.5)])
def test_correlations_match_the_parameters(world, site_p, prot_p):
    n = 500
    train = spurious_data(world, "train", n, site_correlation_train=site_p, protected_correlation_train=prot_p,
                          site_correlation_test=0.5, protected_correlation_test=0.5)
    per = train.attributes
    assert _within(np.mean(per["site_aligned"]), site_p, n)
    assert _within(np.mean(per["protected_aligned"]), prot_p, n)
    y, s, p = train.labels, np.asarray(per["site"]), np.asarray(per["protected"])
    assert np.array_equal(per["site_aligned"], s == y % 2) and np.array_equal(per["protected_aligned"], p == y % 2)
    assert _within(np.mean(y), 0.5, n)  # balanced classes
    # the test split follows the *_test values
    test = spurious_data(world, "test", n, site_correlation_train=site_p, site_correlation_test=1 - site_p)
    assert _within(np.mean(test.attributes["site_aligned"]), 1 - site_p, n)
    assert test.meta["site_correlation"] == 1 - site_p


def test_group_ids_and_names(world):
    data = load_dataset("shapes:spurious", split="test", n=200)
    per = data.attributes
    y, s, p = data.labels, np.asarray(per["site"]), np.asarray(per["protected"])
    assert np.array_equal(per["group"], (y * len(SITES) + s) * len(PROTECTED) + p)
    assert data.meta["group_names"][per["group"][0]] == f"{data.classnames[y[0]]}/{list(SITES)[s[0]]}/{PROTECTED[p[0]]}"
    assert len(set(per["group"])) == 8  # every (label, site, protected) group occurs
    assert data.classnames == ["circle", "hexagon"]
    assert data.meta["correlations"] == {"site_train": 0.9, "site_test": 0.1, "protected_train": 0.7,
                                         "protected_test": 0.3}
    sub = data.subset([5, 0])
    assert sub.attributes["group"].tolist() == [per["group"][5], per["group"][0]]


def test_changing_a_correlation_changes_only_the_attributes(world):
    for i in range(30):
        a, (ya, sa, pa) = spurious_scene(world, "test", i, site_correlation=0.9, protected_correlation=0.7)
        b, (yb, sb, pb) = spurious_scene(world, "test", i, site_correlation=0.2, protected_correlation=0.4)
        assert ya == yb and [o.box for o in a.objects] == [o.box for o in b.objects]
        if (sa, pa) == (sb, pb):
            assert np.array_equal(a.image, b.image)


def _background_roughness(scene) -> float:
    img = scene.image.astype(np.float32).mean(axis=2)                       # (H, W)
    outside = ~scene.objects[0].mask
    diff = np.abs(np.diff(img, axis=1))
    return float(diff[outside[:, 1:] & outside[:, :-1]].mean())


def test_site_and_texture_are_in_the_pixels(world):
    rough = {0: [], 1: []}
    spread = {0: [], 1: []}
    for i in range(60):
        scene, (y, s, p) = spurious_scene(world, "val", i, site_correlation=0.5, protected_correlation=0.5)
        assert scene.background in SITES[list(SITES)[s]]["backgrounds"]
        rough[s].append(_background_roughness(scene))
        if s == 0:  # no sensor noise: the fill pattern alone
            m = scene.objects[0].mask
            inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
            if inner.sum() >= 20:
                spread[p].append(float(scene.image[1:-1, 1:-1][inner].astype(np.float32).std(axis=0).max()))
    assert max(rough[0]) < 3 < 8 < min(rough[1])  # site-b: noise on every background
    assert spread[0] and spread[1] and max(spread[0]) < 12 < 30 < min(spread[1])  # striped fill


def test_bad_arguments(world):
    with pytest.raises(UsageError, match="site_correlation_train"):
        spurious_data(world, "test", 4, site_correlation_train=1.5)
    with pytest.raises(UsageError, match="classes"):
        spurious_data(world, "test", 4, classes=("circle", "heart"))  # heart is OOD in shapes-tiny
    with pytest.raises(UsageError, match="classes"):
        spurious_data(world, "test", 4, classes=("circle",))
