"""Tests of cliplab.data.images: safe decoding, conversion to RGB, batches, file discovery."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from cliplab.data import images as images_module
from cliplab.data.images import (
    DEFAULT_MAX_PIXELS,
    decode_many,
    find_images,
    iter_decoded,
    load_image,
    to_rgb,
)
from cliplab.errors import BadImage, DataError, UsageError


def _noise(size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _solid(colour, size=(8, 8), mode="RGB"):
    return Image.new(mode, size, colour)


@pytest.fixture
def good_jpeg(tmp_path):
    path = tmp_path / "good.jpg"
    _noise().save(path, quality=90)
    return path


# ----------------------------------------------------------------------------- bad files


def test_truncated_jpeg_is_bad_image(tmp_path, good_jpeg):
    data = good_jpeg.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated") as info:
        load_image(path)
    assert info.value.source == str(path)
    assert isinstance(info.value, DataError) and info.value.exit_code == 4


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImage, match="empty file"):
        load_image(path)
    with pytest.raises(BadImage, match="empty data"):
        load_image(b"")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(BadImage, match="not an image"):
        load_image(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadImage, match="file not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(BadImage, match="directory"):
        load_image(tmp_path)


def test_unsupported_source_type():
    with pytest.raises(BadImage, match="unsupported source type"):
        load_image(12345)


# ----------------------------------------------------------------------------- modes


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    _solid((0, 255, 255, 0), mode="CMYK").save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    np.testing.assert_allclose(image.getpixel((4, 4)), (255, 0, 0), atol=8)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = load_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_32bit_and_float_images():
    as_16bit = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I")
    assert [to_rgb(as_16bit).getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]
    wide = Image.fromarray(np.array([[-50, 0, 150]], dtype=np.int32), mode="I")
    assert [to_rgb(wide).getpixel((x, 0))[0] for x in range(3)] == [0, 64, 255]  # stretched
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32), mode="F")
    assert [to_rgb(unit).getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 0]


def test_rgba_transparent_becomes_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under everything
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # transparent
    rgba[0, 2, 3] = 128  # half
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = load_image(path)
    assert image.getpixel((0, 0)) == (200, 0, 0)
    assert image.getpixel((1, 0)) == (255, 255, 255)
    half = image.getpixel((2, 0))
    assert abs(half[0] - 227) <= 2 and abs(half[1] - 127) <= 2


def test_palette_png_with_transparency(tmp_path):
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # 0 black, 1 blue
    palette_image.putpixel((1, 1), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=0)
    assert "transparency" in Image.open(path).info
    image = load_image(path)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # black, but transparent
    assert image.getpixel((1, 1)) == (0, 0, 255)


def test_grayscale_and_la(tmp_path):
    path = tmp_path / "grey.png"
    _solid(77, mode="L").save(path)
    assert load_image(path).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(_solid((10, 0), mode="LA")).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(_solid(1, mode="1")).getpixel((0, 0)) == (255, 255, 255)


def test_rgb_passthrough_and_sources(good_jpeg):
    reference = np.asarray(load_image(good_jpeg))
    from_bytes = load_image(good_jpeg.read_bytes())
    with open(good_jpeg, "rb") as handle:
        from_file = load_image(handle)
        assert not handle.closed
    np.testing.assert_array_equal(np.asarray(from_bytes), reference)
    np.testing.assert_array_equal(np.asarray(from_file), reference)
    rgb = Image.new("RGB", (3, 3))
    assert load_image(rgb) is rgb


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # (H, W, 3): 40 wide, 20 high
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# ----------------------------------------------------------------------------- pixel limit


def test_over_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    _solid((1, 2, 3), size=(20, 20)).save(path)
    with pytest.raises(BadImage, match=r"400 pixels exceeds the limit of 100 pixels; pass max_pixels=400"):
        load_image(path, max_pixels=100)
    # within PIL's own warning band (limit < pixels <= 2 * limit): same refusal
    with pytest.raises(BadImage, match=r"400 pixels exceeds the limit of 300 pixels"):
        load_image(path, max_pixels=300)
    assert load_image(path, max_pixels=400).size == (20, 20)
    assert load_image(path, max_pixels=None).size == (20, 20)


def test_our_limit_governs_not_pils_global(tmp_path, monkeypatch):
    path = tmp_path / "img.png"
    _solid((1, 2, 3), size=(20, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL alone would warn, then refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_pixels=1000).size == (20, 20)
    with pytest.raises(BadImage, match="limit of 100"):
        load_image(path, max_pixels=100)
    assert Image.MAX_IMAGE_PIXELS == 50  # restored


def test_limit_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "img.png"
    _solid((1, 2, 3), size=(20, 20)).save(path)
    monkeypatch.setenv("CLIPLAB_MAX_PIXELS", "100")
    with pytest.raises(BadImage, match="limit of 100"):
        load_image(path)
    assert load_image(path, max_pixels=1000).size == (20, 20)  # explicit value wins
    monkeypatch.setenv("CLIPLAB_MAX_PIXELS", "none")
    assert load_image(path).size == (20, 20)
    monkeypatch.setenv("CLIPLAB_MAX_PIXELS", "lots")
    with pytest.raises(UsageError, match="CLIPLAB_MAX_PIXELS"):
        load_image(path)
    monkeypatch.delenv("CLIPLAB_MAX_PIXELS")
    assert images_module.default_max_pixels() == DEFAULT_MAX_PIXELS
    with pytest.raises(UsageError, match="max_pixels"):
        load_image(path, max_pixels=0)


# ----------------------------------------------------------------------------- draft


def test_draft_decodes_large_jpeg_smaller(tmp_path):
    y, x = np.mgrid[0:768, 0:1024]
    pixels = np.stack([x * 255 // 1023, y * 255 // 767, (x + y) * 255 // 1790], axis=-1)
    path = tmp_path / "large.jpg"
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
    exact = load_image(path)
    drafted = load_image(path, draft_size=224)
    assert exact.size == (1024, 768)
    assert drafted.size[0] < 1024 and min(drafted.size) >= 224
    reference = exact.resize(drafted.size, Image.Resampling.BOX)
    difference = np.abs(np.asarray(drafted, np.int16) - np.asarray(reference, np.int16))
    assert difference.mean() < 3.0
    png = tmp_path / "large.png"
    Image.fromarray(pixels[:500, :500].astype(np.uint8)).save(png)
    assert load_image(png, draft_size=64).size == (500, 500)  # not a JPEG: ignored


# ----------------------------------------------------------------------------- many images


@pytest.fixture
def mixed_sources(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    paths = []
    for i, colour in enumerate(colours):
        paths.append(tmp_path / f"good{i}.png")
        _solid(colour).save(paths[-1])
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    # index: 0 good0, 1 bad, 2 good1, 3 missing, 4 good2
    return [paths[0], bad, paths[1], tmp_path / "missing.png", paths[2]], colours


@pytest.mark.parametrize("workers", [0, 3])
def test_decode_many_skip_keeps_order(mixed_sources, workers):
    sources, colours = mixed_sources
    decoded, skipped = decode_many(sources, on_error="skip", workers=workers, progress=False)
    assert [image.getpixel((0, 0)) for image in decoded] == colours
    assert [(s.index, s.source) for s in skipped] == [(1, str(sources[1])), (3, str(sources[3]))]
    assert "not an image" in skipped[0].reason and "not found" in skipped[1].reason


def test_decode_many_raise(mixed_sources):
    sources, _ = mixed_sources
    with pytest.raises(BadImage, match="bad.jpg: not an image"):
        decode_many(sources, workers=2, progress=False)
    with pytest.raises(UsageError, match="on_error"):
        decode_many(sources, on_error="ignore")


def test_iter_decoded_batches(mixed_sources):
    sources, colours = mixed_sources
    batches = list(iter_decoded(iter(sources), 2, on_error="skip", workers=2, prefetch=1))
    assert [batch.indices for batch in batches] == [[0], [2], [4]]
    assert [[s.index for s in batch.skipped] for batch in batches] == [[1], [3], []]
    assert [batch.images[0].getpixel((0, 0)) for batch in batches] == colours
    stream = iter_decoded(sources, 1, on_error="skip", workers=2)
    assert next(stream).indices == [0]
    stream.close()  # stopping early shuts the pool down without error
    with pytest.raises(UsageError, match="batch_size"):
        iter_decoded(sources, 0)  # raised at the call, not at the first next()


# ----------------------------------------------------------------------------- find_images


def test_find_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for name in ["a/x.jpg", "a/b/y.PNG", "a/b/w.webp", "a/.hidden/z.jpg", "a/.dot.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "c.txt").write_text("x")
    root = tmp_path / "a"
    assert find_images(root) == [root / "b" / "w.webp", root / "b" / "y.PNG", root / "x.jpg"]
    assert find_images(str(root), recursive=False) == [root / "x.jpg"]
    given = [tmp_path / "c.txt", root / "x.jpg", root]  # a file given explicitly is kept
    assert find_images(given) == [tmp_path / "c.txt", root / "x.jpg", root / "b" / "w.webp", root / "b" / "y.PNG"]
    with pytest.raises(UsageError, match="missing.jpg"):
        find_images([root, tmp_path / "missing.jpg"])


def test_bad_file_from_find_images_is_reported(tmp_path):
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(BadImage, match="c.txt"):
        load_image(find_images(tmp_path / "c.txt")[0])


def test_draft_size_validation(good_jpeg):
    with pytest.raises(UsageError, match="draft_size"):
        load_image(good_jpeg, draft_size=0)


def test_buffer_source_round_trip():
    buffer = io.BytesIO()
    _solid((9, 8, 7), mode="RGB").save(buffer, format="BMP")
    assert load_image(buffer.getvalue()).getpixel((0, 0)) == (9, 8, 7)


# ----------------------------------------------------------------------------- memory of failures


def _truncated_png(side=4000) -> bytes:
    """A solid PNG cut 200 bytes short: tiny on disk, PIL fills most of a side x side
    image (64 MB at 4000) before it finds the end."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()[:-200]


def test_bad_image_keeps_no_decoding_state():
    """The BadImage a caller receives holds only its strings: no replaced PIL exception
    (``__context__``), and no frame of the failed decode (which held the half-decoded
    image) in its traceback, whether raised by load_image or by the thread pool."""
    import traceback

    bad = _truncated_png(1000)
    for call in (lambda: load_image(bad), lambda: decode_many([bad], workers=2, progress=False)):
        with pytest.raises(BadImage, match="truncated") as caught:
            call()
        error = caught.value
        assert error.__context__ is None and error.__cause__ is None
        frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
        assert not [f.f_code.co_name for f in frames if f.f_code.co_name in ("_decode", "_load_checked")]
        assert not [f for f in frames if "PIL" in f.f_code.co_filename]
        assert not [f for f in frames for v in f.f_locals.values() if isinstance(v, Image.Image)]


_SKIP_PEAK_SCRIPT = r"""
import io, json, resource, sys
from PIL import Image
from cliplab.data.images import iter_decoded, load_image
from cliplab.errors import BadImage

buffer = io.BytesIO()
Image.new("RGB", (4000, 4000), (1, 2, 3)).save(buffer, format="PNG")
bad = buffer.getvalue()[:-200]
try:
    load_image(bad)  # one decode: the baseline includes one 64 MB image
except BadImage:
    pass
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
skipped = sum(len(batch.skipped) for batch in iter_decoded([bad] * 16, 8, on_error="skip", workers=2))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"skipped": skipped, "rise_mb": (peak - base) / 1024}))
"""


def test_skipped_images_free_their_memory():
    """16 truncated 4000x4000 PNGs (56 KB each, 64 MB decoded) skipped in batches of 8 by
    2 threads: the peak RSS rises by far less than the 900 MB it took when each skipped
    BadImage kept its half-decoded image until its batch was collected."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", _SKIP_PEAK_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["skipped"] == 16
    assert result["rise_mb"] < 300, result
