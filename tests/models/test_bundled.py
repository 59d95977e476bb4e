"""The bundled shapes-tiny model: loads offline, matches plain open_clip, passes a quality guard."""

import numpy as np
import pytest
import torch

import cliplab
from cliplab.models.loading import BUNDLED_DIR, bundled_models


@pytest.fixture(scope="module")
def shapes_tiny():
    return cliplab.load("shapes-tiny")


def test_bundled_files():
    assert "shapes-tiny" in bundled_models()
    d = BUNDLED_DIR / "shapes-tiny"
    assert (d / "MODEL_CARD.md").is_file()
    assert (d / "open_clip_model.safetensors").stat().st_size < 25 * 2**20


def test_plain_open_clip_loads_the_same_model(shapes_tiny):
    import open_clip

    ref = open_clip.create_model("local-dir:" + str(BUNDLED_DIR / "shapes-tiny")).eval()
    texts = ["a photo of a red star.", "a small blue ring at the top left"]
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.encode_text(shapes_tiny.tokenize(texts)), dim=-1)
    np.testing.assert_allclose(shapes_tiny.encode_texts(texts), want.numpy(), atol=1e-5)


def test_quality_guard_8way_shape(shapes_tiny):
    """>= 90% on 200 single-object test scenes, 8 shapes, prompt "a photo of a {shape}."."""
    from cliplab.data.shapes import shapes_tiny_world

    world = shapes_tiny_world(seed=123)
    shapes = list(world.shapes_of("train"))
    images, scenes = world.render_batch("test", range(200))
    clf = cliplab.ZeroShotClassifier(shapes_tiny, shapes)
    acc = np.mean(clf.predict(images) == np.array([s.objects[0].shape for s in scenes]))
    assert acc >= 0.90, f"8-way shape accuracy {acc:.3f}"
