"""The image pipeline: every way of running it gives the single-threaded features exactly."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data.images import can_fork, iter_filled, load_image
from cliplab.errors import BadImage, DataError
from cliplab.models.backbone import _fused_tail, _to_tensor_into

PATHS = [("threads", 2), ("processes", 2), ("processes", 1), ("auto", 3)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """14 noisy JPEGs of two sizes, one PNG with alpha, one truncated JPEG (index 5)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(14):
        w, h = (160, 120) if i % 2 else (97, 131)
        path = folder / f"p{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)).save(folder / "alpha.png")
    paths.append(folder / "alpha.png")
    cut = folder / "cut.jpg"
    cut.write_bytes(paths[0].read_bytes()[:300])
    paths.insert(5, cut)
    return paths


def test_fused_to_tensor_equals_torchvision(tiny):
    head, mean, std = _fused_tail(tiny.preprocess)
    img = head(_smooth(131, 97))
    out = torch.empty(3, *img.size[::-1])
    _to_tensor_into(img, out, mean, std)
    assert torch.equal(out, tiny.preprocess(_smooth(131, 97)))


@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("parallel,workers", PATHS)
def test_parallel_paths_equal_single_thread(tiny, photos, parallel, workers, draft):
    """Threads, forked processes (one and two) and the automatic choice give the features,
    kept indices and skip records of workers=0, exactly; batches of 3 over 16 images
    reuse every buffer of the ring and end on a short batch."""
    if parallel == "processes" and not can_fork():
        pytest.skip("no fork on this platform")
    kw = dict(batch_size=3, on_error="skip", draft=draft)
    ref = tiny.encode_images(photos, workers=0, **kw)
    res = tiny.encode_images(photos, workers=workers, parallel=parallel, **kw)
    assert np.array_equal(res.features, ref.features)
    assert res.kept.tolist() == ref.kept.tolist() == [i for i in range(16) if i != 5]
    assert res.skipped == ref.skipped and [s.index for s in res.skipped] == [5]
    tokens = tiny.image_tokens(photos[:5], batch_size=2, workers=workers, parallel=parallel, draft=draft)
    assert np.array_equal(tokens, tiny.image_tokens(photos[:5], batch_size=2, workers=0, draft=draft))


def test_single_thread_equals_open_clip_transform(tiny, photos):
    """workers=0 (fused ToTensor/Normalize written into the batch) equals the model run on
    torchvision's transform of each decoded image."""
    good = [p for p in photos if p.name != "cut.jpg"][:6]
    ours = tiny.encode_images(good, batch_size=6, workers=0).features
    with torch.inference_mode():
        batch = torch.stack([tiny.preprocess(load_image(p)) for p in good])
        ref = torch.nn.functional.normalize(tiny.model.encode_image(batch), dim=-1).numpy()
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_first_bad_image_raises_in_order(tiny, photos, parallel, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImage, match="cut.jpg: cannot read image header"):
        tiny.encode_images([empty, *photos][1:] + [empty], batch_size=4, workers=2, parallel=parallel)
    with pytest.raises(BadImage, match="empty.jpg: empty file"):
        tiny.encode_images([*photos[:4], empty, *photos], batch_size=4, workers=2, parallel=parallel)


@pytest.mark.parametrize("processes", [False, True])
def test_iter_filled_bytes_and_early_close(processes):
    """Encoded bytes as sources; a generator closed after its first batch stops its workers."""
    images = [_smooth(8 + i, 9) for i in range(7)]
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())

    def fill(source, out):
        out.copy_(torch.from_numpy(np.array(load_image(source))[:8]).permute(2, 0, 1))

    batches = list(iter_filled(blobs, 3, fill=fill, item_shape=(3, 8, 9), workers=2, processes=processes))
    got = torch.cat([b.tensor.clone() for b in batches])
    expected = torch.stack([torch.from_numpy(np.array(i)[:8]).permute(2, 0, 1).float() for i in images])
    assert torch.equal(got, expected) and [b.indices for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    gen = iter_filled(blobs * 10, 2, fill=fill, item_shape=(3, 8, 9), workers=2, processes=processes)
    first = next(gen)
    assert first.indices == [0, 1]
    gen.close()


@pytest.mark.skipif(not can_fork(), reason="no fork on this platform")
def test_a_dead_decoding_process_is_a_data_error():
    import os

    def fill(source, out):
        if source == 3:
            os._exit(1)  # as a decoder crash or the OOM killer would end it
        out.fill_(source)

    with pytest.raises(DataError, match="decoding process died"):
        list(iter_filled(range(8), 2, fill=fill, item_shape=(1,), workers=2, processes=True))


def _smooth(h, w):
    y, x = np.mgrid[0:h, 0:w]
    rgb = [127 + 120 * np.sin(x / 7.0 + c) * np.cos(y / 5.0 - c) for c in (0, 1, 2)]
    return Image.fromarray(np.stack(rgb, -1).round().astype(np.uint8))
