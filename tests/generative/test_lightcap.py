"""LightCap: concept retrieval with the bundled model, the cross-modal modulator, size."""

import numpy as np
import pytest
import torch

import cliplab
from cliplab.data.shapes import COLORS, SHAPES, ShapesWorld, shapes_tiny_world
from cliplab.data.shapes.world import ObjectSpec, jitter_color
from cliplab.generative.captioner import Captioner, head_size
from cliplab.generative.lightcap import LightCap, Modulator, region_crops
from cliplab.models.transforms import uint8_to_tensor


@pytest.fixture(scope="module")
def bb():
    return cliplab.load("shapes-tiny")


def _scene(color, shape, seed):
    rng = np.random.default_rng(seed)
    world = ShapesWorld(seed=0, image_size=64)
    spec = ObjectSpec(shape, color, "large", 32.0, 32.0, 18.0, jitter_color(color, rng))
    return world.compose([spec], "plain", rng).image


def test_concepts_of_rendered_scenes(bb):
    """The bundled model retrieves each one-object test scene's colour first and its shape in the top 3."""
    head = LightCap.build(bb, width=32, layers=1, heads=2)
    images, scenes = shapes_tiny_world(seed=0).render_batch("test", list(range(12)))
    words = head.concepts_of(uint8_to_tensor(list(images), bb.preprocess_cfg))
    assert all(len(w) == head.extractor.k == 10 for w in words)
    truth = [s.objects[0] for s in scenes]
    colors = [w[0] == o.color for w, o in zip(words, truth)]           # kind after kind, best first
    shapes3 = [o.shape in w[3:6] for w, o in zip(words, truth)]
    shapes1 = [w[3] == o.shape for w, o in zip(words, truth)]
    sizes = [w[6] == o.size for w, o in zip(words, truth)]
    assert sum(colors) == 12 and sum(shapes3) == 12                    # measured: 12 / 12 each
    assert sum(shapes1) >= 8 and sum(sizes) >= 9                       # measured: 9 / 12 and 10 / 12
    assert all(set(w[:3]) <= set(COLORS) and set(w[3:6]) <= set(SHAPES) for w in words)


def test_modulator_is_fc_relu_fc_sigmoid_channel_weights():
    torch.manual_seed(0)
    mod = Modulator(8, 5)
    concepts, grid = torch.randn(2, 3, 8), torch.randn(2, 4, 5)
    m = torch.sigmoid(mod.fc2(torch.relu(mod.fc1(concepts.mean(1)))))
    torch.testing.assert_close(mod(concepts, grid), grid * m[:, None, :])


def test_region_crops_are_the_image_and_its_resized_quarters():
    x = torch.zeros(2, 3, 8, 8)
    for v, (y, x0) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):          # quadrant q holds the value q + 1
        x[:, :, y:y + 4, x0:x0 + 4] = v + 1
    crops = region_crops(x)
    assert crops.shape == (2, 6, 3, 8, 8)                                   # whole + 4 quadrants + centre
    torch.testing.assert_close(crops[:, 0], x)
    for q in range(4):
        torch.testing.assert_close(crops[:, 1 + q], torch.full((2, 3, 8, 8), float(q + 1)))
    assert set(crops[0, 5, 0, [0, 0, 7, 7], [0, 7, 0, 7]].tolist()) == {1.0, 2.0, 3.0, 4.0}   # the centre


def test_lightcap_is_smaller_than_the_captioner_and_saves(bb, tmp_path):
    light, plain = LightCap.build(bb), Captioner.build(bb)
    assert head_size(light)["params"] < head_size(plain)["params"]
    x = uint8_to_tensor([_scene("red", "star", 2)], bb.preprocess_cfg)
    light.save(tmp_path / "lc")
    from cliplab.generative.captioner import load_captioner

    again = load_captioner(tmp_path / "lc", bb)
    assert isinstance(again, LightCap) and again.generate(x) == light.generate(x)
