"""Inputs shared by the tests of cliplab.generative: a long caption, tiny images, a tiny generator."""

import numpy as np

#: A long ShapesWorld-style caption (about 90 tokens; shapes-tiny reads 32).
LONG = ("A picture of three shapes on a striped background. There are two circles and one star. "
        "By colour: two red and one blue. The first shape is a large red circle at the top left. "
        "The second shape is a small red circle at the bottom. The third shape is a large blue star "
        "on the right. The red circle at the bottom is below the red circle at the top left. "
        "There are no defects.")


#: A generator small enough for a test (16 px, width 8).
GEN = {"image_size": 16, "width": 8, "mults": (1, 2), "n_tokens": 4}


def blobs(n, size=32, seed=0):
    """n uint8 images (size, size, 3): one coloured square on grey, at a random place."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = np.full((size, size, 3), 128, np.uint8)
        x, y = rng.integers(0, size - 10, 2)
        im[y:y + 10, x:x + 10] = rng.integers(0, 256, 3)
        out.append(im)
    return out
