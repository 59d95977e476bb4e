"""Safe image decoding: one function turns any image source into an RGB PIL image.

Every image that enters cliplab goes through :func:`load_image` (directly, or through
:func:`decode_many` / :func:`iter_decoded`, which decode many images in a thread pool, or
:func:`iter_filled`, which decodes and preprocesses straight into preallocated batch
tensors, in threads or worker processes).
It guarantees that

- the result is a fully decoded ``"RGB"`` :class:`PIL.Image.Image`, with the EXIF
  orientation applied and every other mode converted by :func:`to_rgb`;
- any problem with the data — missing, empty, truncated or corrupt file, unknown format,
  more pixels than the limit — raises :class:`cliplab.errors.BadImage` naming the source
  and the reason, never a PIL exception and never later, at first pixel access; the
  error holds only those two strings (no chained PIL exception, no frame of the failed
  decode), so a skipped image's memory is freed at once;
- the pixel limit (the decompression-bomb guard) is cliplab's own ``max_pixels``, checked
  from the header before any pixel is decoded, not PIL's process-wide
  ``Image.MAX_IMAGE_PIXELS``.

:func:`find_images` expands files and folders given by the user into a list of image
files.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import mmap
import multiprocessing
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO, Callable, NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps

from .._progress import progress_bar
from ..errors import BadImage, DataError, UsageError
from ..validation import check_choice, check_positive_int
from .records import Skipped, describe_source
from .sources import IMAGE_EXTENSIONS

logger = logging.getLogger("cliplab.data.images")

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_ENV",
    "DecodedBatch",
    "FilledBatch",
    "decode_many",
    "default_max_pixels",
    "describe_source",
    "find_images",
    "iter_decoded",
    "iter_filled",
    "load_image",
    "to_rgb",
]

DEFAULT_MAX_PIXELS = 178_956_970
"""Default pixel limit (width × height) of one image: 178,956,970 pixels.

This is the size at which PIL itself refuses an image by default (twice its
``Image.MAX_IMAGE_PIXELS``), about 13,377 × 13,377 pixels, or 537 MB once decoded to
RGB.  Passing ``max_pixels=DEFAULT_MAX_PIXELS`` (the default of every function here)
means "the value of the ``CLIPLAB_MAX_PIXELS`` environment variable if it is set, else
this number"; see :func:`default_max_pixels`.
"""

MAX_PIXELS_ENV = "CLIPLAB_MAX_PIXELS"
"""Environment variable that overrides :data:`DEFAULT_MAX_PIXELS`."""


ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

_UNLIMITED_WORDS = frozenset({"0", "none", "off", "unlimited", "inf"})
_ON_ERROR = ("raise", "skip")

# PIL reads its decompression-bomb limit from a module global.  Around Image.open we set
# it to our limit, and turn its DecompressionBombWarning into an exception, under this
# lock, so that concurrent decodes in our threads never see each other's setting.
_PIL_GUARD_LOCK = threading.Lock()


# --------------------------------------------------------------------------- limits


def default_max_pixels() -> int | None:
    """Return the pixel limit used when a caller passes the default.

    Returns
    -------
    int or None
        ``CLIPLAB_MAX_PIXELS`` parsed as a positive integer when that variable is set
        (``0``, ``none``, ``off`` or ``unlimited`` mean no limit, returned as ``None``),
        else :data:`DEFAULT_MAX_PIXELS`.

    Raises
    ------
    cliplab.errors.UsageError
        If the variable is set to something else.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    if raw.lower() in _UNLIMITED_WORDS:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(
            f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is not a pixel count; "
            "set it to a positive integer, or to 0 / none for no limit"
        )
    return value


def _resolve_max_pixels(max_pixels: int | None) -> int | None:
    """Validate ``max_pixels``; the default value defers to :func:`default_max_pixels`."""
    max_pixels = check_positive_int("max_pixels", max_pixels, allow_none=True)
    return default_max_pixels() if max_pixels == DEFAULT_MAX_PIXELS else max_pixels


def _too_large(pixels: int | None, max_pixels: int | None, size: tuple[int, int] | None = None) -> str:
    """The reason given for an image over the pixel limit."""
    if pixels is None:
        count = "the image"
    elif size is None:
        count = f"{pixels:,} pixels"
    else:
        count = f"{size[0]}x{size[1]} = {pixels:,} pixels"
    limit = "PIL's limit" if max_pixels is None else f"the limit of {max_pixels:,} pixels"
    allow = "a larger value" if pixels is None else str(pixels)
    return (
        f"{count} exceeds {limit}; pass max_pixels={allow} "
        f"(or --max-pixels / {MAX_PIXELS_ENV}) to allow it"
    )


def _refused_by_pil(max_pixels: int | None, exc: Exception) -> str:
    """Reason for PIL's own DecompressionBombError / Warning raised under :func:`_pil_limit`."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_large(int(match.group(1)) if match else None, max_pixels)


@contextlib.contextmanager
def _pil_limit(max_pixels: int | None) -> Iterator[None]:
    """Make PIL's own bomb check enforce ``max_pixels``, for the ``with`` block only.

    PIL warns above ``MAX_IMAGE_PIXELS`` and raises above twice that; with the global set
    to ``max_pixels`` and the warning turned into an error, PIL raises exactly when
    ``width * height > max_pixels``.  The previous value is restored on exit.
    """
    with _PIL_GUARD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


# --------------------------------------------------------------------------- conversion


def _white_composite(rgba: Image.Image) -> Image.Image:
    """Composite an ``"RGBA"`` image over opaque white; returns ``"RGB"``."""
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _to_uint8(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map one channel of integer or float samples to ``uint8``.

    With ``full_scale`` the samples are divided by it (``0..full_scale`` → ``0..255``);
    without, the finite range ``[min, max]`` is stretched to ``0..255``.
    """
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    if full_scale is None:
        lo = float(values[finite].min()) if finite.any() else 0.0
        hi = float(values[finite].max()) if finite.any() else 0.0
        values = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    else:
        values = values * (255.0 / full_scale)
    values = np.where(finite, values, 0.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale an ``"I;16*"``, ``"I"`` or ``"F"`` image to an 8-bit ``"L"`` image."""
    values = np.asarray(image)  # (H, W)
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        finite = values[np.isfinite(values)] if image.mode == "F" else values
        lo = finite.min() if finite.size else 0
        hi = finite.max() if finite.size else 0
        if image.mode == "F" and lo >= 0 and hi <= 1:
            full_scale = 1.0  # float images in [0, 1]
        elif image.mode == "I" and lo >= 0 and hi <= 65535:
            full_scale = 65535.0  # 16-bit data held in a 32-bit image
        else:
            full_scale = None  # anything else: stretch [min, max]
    return Image.fromarray(_to_uint8(values, full_scale), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit ``"RGB"``.

    An ``"RGB"`` image without a transparency key is returned as is (the same object);
    every other image gives a new one.

    Parameters
    ----------
    image : PIL.Image.Image
        Image in any PIL mode.

    Returns
    -------
    PIL.Image.Image
        ``"RGB"`` image of the same size.

    Raises
    ------
    cliplab.errors.BadImage
        If PIL cannot convert the mode.

    Notes
    -----
    - Transparency (``"RGBA"``, ``"LA"``, ``"PA"``, ``"RGBa"``, ``"La"``, and ``"P"``,
      ``"L"`` or ``"RGB"`` images with a ``transparency`` key) is composited over an
      opaque **white** background: transparent pixels become white, as a viewer shows
      them, instead of the arbitrary colour stored under alpha 0.
    - 16-bit images (``"I;16"``, ``"I;16B"``, ``"I;16L"``, ``"I;16N"``) are scaled, not
      clipped: ``v`` → ``round(v * 255 / 65535)``.  A 32-bit ``"I"`` image whose values
      lie in ``0..65535`` is read as 16-bit data the same way; one with values outside
      that range is stretched from its ``[min, max]`` to ``0..255``.
    - Float ``"F"`` images with values in ``[0, 1]`` are multiplied by 255; others are
      stretched from ``[min, max]``; NaN and infinities become 0.
    - ``"CMYK"`` goes through PIL's conversion (PIL's JPEG reader has already undone the
      inverted CMYK that Adobe applications write).  ``"1"``, ``"L"``, ``"P"``,
      ``"YCbCr"``, ``"HSV"``, ``"LAB"`` and other modes use PIL's ``convert("RGB")``.
    - Only the current frame of a multi-frame image is converted.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    try:
        if mode.startswith("I;16") or mode in ("I", "F"):
            return _high_depth_to_l(image).convert("RGB")
        if mode == "La":
            # premultiplied: over white, out = L·a + 255·(1 − a) = L_premul + 255 − A
            lum, alpha = (np.asarray(band, dtype=np.int16) for band in image.split())
            grey = np.clip(lum + 255 - alpha, 0, 255).astype(np.uint8)  # (H, W)
            return Image.fromarray(grey, mode="L").convert("RGB")
        has_alpha = mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info
        if has_alpha:
            return _white_composite(image.convert("RGBA"))
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        source = image.filename if isinstance(getattr(image, "filename", None), str) else "<image>"
        raise BadImage(source, f"cannot convert mode {mode!r} to RGB ({exc})") from exc


# --------------------------------------------------------------------------- decoding


def _open_source(source: Any, label: str) -> BinaryIO:
    """Return a new readable binary stream over ``source``; the caller closes it."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fsdecode(source))
        try:
            stream = path.open("rb")
        except FileNotFoundError:
            raise BadImage(label, "file not found") from None
        except IsADirectoryError:
            raise BadImage(label, "is a directory, not an image file") from None
        except OSError as exc:
            raise BadImage(label, f"cannot open file ({exc.strerror or exc})") from None
        try:
            size = os.fstat(stream.fileno()).st_size
        except OSError:
            size = None
        if size == 0:
            stream.close()
            raise BadImage(label, "empty file (0 bytes)")
        return stream
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImage(label, "empty data (0 bytes)")
        return io.BytesIO(bytes(source))
    if callable(getattr(source, "read", None)):
        # read it all: PIL's Image.close() would close the caller's file object
        try:
            data = source.read()
        except OSError as exc:
            raise BadImage(label, f"cannot read file object ({exc})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise BadImage(label, "file object is not opened in binary mode ('rb')")
        if len(data) == 0:
            raise BadImage(label, "empty data (0 bytes)")
        return io.BytesIO(data)
    raise BadImage(
        label,
        f"unsupported source type {type(source).__name__}; expected a path, bytes, "
        "a binary file object or a PIL image",
    )


def _apply_draft(image: Image.Image, draft_size: int, label: str) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale, keeping both sides
    at least ``draft_size``."""
    if image.format != "JPEG" or min(image.size) < 2 * draft_size:
        return
    original = image.size
    # JpegImageFile.draft picks the largest scale 1/s (s in 8, 4, 2) with
    # s <= min(W // draft_size, H // draft_size), so both sides stay >= draft_size.
    image.draft("RGB", (draft_size, draft_size))
    if image.size != original:
        logger.debug("%s: draft decode %s -> %s", label, original, image.size)


def _decode(stream: BinaryIO, label: str, max_pixels: int | None, draft_size: int | None):
    """Open, check, decode and orient one image; the caller converts and closes."""
    try:
        with _pil_limit(max_pixels):
            image = Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(label, _refused_by_pil(max_pixels, exc)) from None
    except Image.UnidentifiedImageError:
        raise BadImage(label, "not an image, or a format PIL cannot read") from None
    except Exception as exc:  # corrupt headers raise an assortment of types
        raise BadImage(label, f"cannot read image header ({type(exc).__name__}: {exc})") from None

    try:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadImage(label, _too_large(width * height, max_pixels, (width, height)))
        if draft_size is not None:
            _apply_draft(image, draft_size, label)
        with _PIL_GUARD_LOCK:
            pil_limit = Image.MAX_IMAGE_PIXELS
        try:
            if pil_limit is not None and width * height > pil_limit:
                # some decoders (TIFF, GIF) re-check PIL's global limit while loading:
                # keep ours in force for this (rare, very large) image
                with _pil_limit(max_pixels):
                    image.load()
            else:
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImage(label, _refused_by_pil(max_pixels, exc)) from None
        except MemoryError:
            raise BadImage(label, f"out of memory decoding a {width}x{height} image") from None
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if "truncated" in reason:
                reason = f"truncated file ({reason})"
            else:
                reason = f"corrupt image data ({type(exc).__name__}: {reason})"
            raise BadImage(label, reason) from None
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception as exc:  # a broken EXIF block must not cost a good image
            logger.warning("%s: ignoring unreadable EXIF orientation (%s)", label, exc)
        return image
    except BaseException:
        image.close()
        raise


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode one image safely into an ``"RGB"`` PIL image.

    Parameters
    ----------
    source : str, os.PathLike, bytes, binary file object or PIL.Image.Image
        A path, the encoded bytes, an open binary file (read to its end from its
        current position, not closed), or an image already in memory.  A PIL image is only
        passed through :func:`to_rgb`: no EXIF orientation, no pixel limit.
    max_pixels : int or None, default DEFAULT_MAX_PIXELS
        Largest ``width * height`` accepted, checked from the header before any pixel
        is decoded.  The default means ``CLIPLAB_MAX_PIXELS`` if set, else
        178,956,970 (see :func:`default_max_pixels`); ``None`` means no limit.
    draft_size : int or None, default None
        Size the caller will resize to (the model's input size).  A JPEG whose short
        side is at least twice this is decoded by libjpeg at 1/2, 1/4 or 1/8 scale,
        choosing the smallest result whose both sides are still ``>= draft_size``:
        several times faster, and the later resize and centre crop start from an image
        larger than the model input.  Other formats ignore it.

    Returns
    -------
    PIL.Image.Image
        Fully decoded ``"RGB"`` image, EXIF orientation applied (the first frame of an
        animated or multi-page file).

    Raises
    ------
    cliplab.errors.BadImage
        If the file is missing, empty, not an image, truncated or corrupt, or has more
        than ``max_pixels`` pixels.  Its ``source`` and ``reason`` attributes say which
        and why.
    cliplab.errors.UsageError
        If ``max_pixels`` or ``draft_size`` is not a valid value.

    Notes
    -----
    PIL's process-wide ``Image.MAX_IMAGE_PIXELS`` is set to ``max_pixels``, and its
    ``DecompressionBombWarning`` made an error, only while this function parses the
    header (and, for an image larger than PIL's own limit, decodes it), under a lock
    shared by all cliplab decoding threads; both are restored afterwards.  So cliplab's
    limit governs, and PIL's ``DecompressionBombWarning`` / ``DecompressionBombError``
    come out as :class:`~cliplab.errors.BadImage`.  Threads outside cliplab that open
    images at that very moment see the same temporary setting.  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
    honoured: if the application sets it, truncated files decode with grey filling.
    Colour conversion follows :func:`to_rgb` (transparency over white).

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("LA", (4, 3), (0, 0)).save(buffer, format="PNG")
    >>> image = load_image(buffer.getvalue())
    >>> image.mode, image.size, image.getpixel((0, 0))
    ('RGB', (4, 3), (255, 255, 255))
    """
    max_pixels = _resolve_max_pixels(max_pixels)
    draft_size = _resolve_draft_size(draft_size)
    return _load(source, max_pixels, draft_size)


def _resolve_draft_size(draft_size: int | None) -> int | None:
    return check_positive_int("draft_size", draft_size, allow_none=True)


def _bare(error: BadImage) -> BadImage:
    """A copy of ``error`` that holds only its two strings.

    A :class:`BadImage` raised inside an ``except`` block keeps the exception it
    replaced (``__context__``, even after ``from None``) and its traceback keeps the
    frames of the failed decode, with their locals: the half-decoded image, the PIL
    decoder, the encoded bytes.  The copy, never raised, has no traceback and no
    context, so skipping an image frees its memory at once.
    """
    return BadImage(error.source, error.reason)


def _load(source: Any, max_pixels: int | None, draft_size: int | None) -> Image.Image:
    """:func:`load_image` with arguments already validated.

    Failures are re-raised as a bare :class:`BadImage` (see :func:`_bare`), outside
    any ``except`` block, so the exception the caller sees holds no decoding state.
    """
    try:
        return _load_checked(source, max_pixels, draft_size)
    except BadImage as exc:
        failure = _bare(exc)
    except MemoryError:
        failure = BadImage(describe_source(source), "out of memory decoding the image")
    try:
        raise failure
    finally:
        failure = None  # this frame, kept by the traceback, must not keep the error: a cycle


def _load_checked(source: Any, max_pixels: int | None, draft_size: int | None) -> Image.Image:
    if isinstance(source, Image.Image):
        return to_rgb(source)
    label = describe_source(source)
    stream = _open_source(source, label)
    try:
        image = _decode(stream, label, max_pixels, draft_size)
        try:
            result = to_rgb(image)
        except BadImage as exc:
            image.close()
            raise BadImage(label, exc.reason) from None
        if result is image:
            if getattr(image, "n_frames", 1) > 1:
                result = image.copy()  # detach from the file that later frames need
                image.close()
        else:
            image.close()
        return result
    finally:
        stream.close()


# --------------------------------------------------------------------------- many images


class DecodedBatch(NamedTuple):
    """One batch from :func:`iter_decoded`.

    Attributes
    ----------
    indices : list of int
        Positions in the input of the images decoded, ascending; ``len(images)``.
    images : list of PIL.Image.Image
        The ``"RGB"`` images, in input order.
    skipped : list of Skipped
        One record per image of this batch that failed (only with ``on_error="skip"``).
    """

    indices: list[int]
    images: list[Image.Image]
    skipped: list[Skipped]


def _check_many_args(on_error: str, workers: int, batch_size: int | None = None) -> None:
    check_choice("on_error", on_error, _ON_ERROR)
    check_positive_int("workers", workers, minimum=0, hint="0: decode in this thread")
    check_positive_int("batch_size", batch_size, allow_none=True)


def _safe_call(load: Callable[[Any], Any], source: Any) -> Any:
    """Run ``load(source)``, returning (not raising) a :class:`BadImage`.

    The error returned is bare (:func:`_bare`): no traceback, no context, so a skipped
    image's decoding state is freed here, in the worker, not when its batch is
    collected.  A ``MemoryError`` of one image becomes that image's :class:`BadImage`
    instead of ending the whole run.
    """
    try:
        return load(source)
    except BadImage as exc:
        return _bare(exc)
    except MemoryError:
        return BadImage(describe_source(source), "out of memory decoding or preprocessing the image")


def iter_decoded(
    sources: Iterable[ImageSource],
    batch_size: int,
    *,
    on_error: str = "raise",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    workers: int = 4,
    prefetch: int = 2,
    load: Callable[[Any], Any] | None = None,
) -> Iterator[DecodedBatch]:
    """Decode images in batches, in a thread pool, while the caller uses earlier batches.

    While the caller works on one batch (for example runs the model on it), the
    following ``prefetch`` batches are being decoded: PIL releases the GIL while it
    decodes, so decoding overlaps with the caller's compute.

    Parameters
    ----------
    sources : iterable of image sources
        Anything :func:`load_image` accepts; read lazily, at most
        ``(1 + prefetch) * batch_size`` ahead of the caller.
    batch_size : int
        Number of sources per batch (the last one may be shorter).
    on_error : {"raise", "skip"}, default "raise"
        ``"raise"``: the first bad image, in input order, raises its
        :class:`~cliplab.errors.BadImage` when its batch is reached.  ``"skip"``: bad
        images are left out, reported in the batch's ``skipped`` and logged.
    max_pixels, draft_size
        As in :func:`load_image`.
    workers : int, default 4
        Decoding threads; 0 decodes in the calling thread, without read-ahead.
    prefetch : int, default 2
        Number of batches decoded ahead of the one being returned.
    load : callable, optional
        Replaces the per-source work done in the threads (default: :func:`load_image`
        with ``max_pixels`` and ``draft_size``); it may raise
        :class:`~cliplab.errors.BadImage`.  The Backbone passes decode + preprocess
        here so that both overlap with the model.

    Yields
    ------
    DecodedBatch
        ``(indices, images, skipped)`` for each ``batch_size`` consecutive sources, in
        order; a batch whose images all failed still comes, with empty ``images``.

    Notes
    -----
    Closing the generator early (``break`` in a ``for`` loop) cancels the decodes not
    yet started and waits for the running ones.
    """
    _check_many_args(on_error, workers, batch_size)
    check_positive_int("prefetch", prefetch, minimum=0)
    max_pixels = _resolve_max_pixels(max_pixels)  # once, in the caller's thread
    draft_size = _resolve_draft_size(draft_size)
    # not a generator itself, so that bad arguments raise here, not at the first next()
    if load is None:
        def load(source):
            return _load(source, max_pixels, draft_size)
    return _iter_decoded(sources, batch_size, on_error, load, workers, prefetch)


def _take(numbered: Iterator[tuple[int, Any]], n: int) -> list[tuple[int, Any]]:
    """The next ``n`` (index, source) pairs of ``numbered`` (fewer at its end)."""
    chunk = []
    for item in numbered:
        chunk.append(item)
        if len(chunk) == n:
            break
    return chunk


def _iter_decoded(
    sources: Iterable[Any],
    batch_size: int,
    on_error: str,
    load: Callable[[Any], Any],
    workers: int,
    prefetch: int,
) -> Iterator[DecodedBatch]:
    """The generator behind :func:`iter_decoded`, arguments already validated."""
    numbered = enumerate(sources)

    def next_chunk() -> list[tuple[int, Any]]:
        return _take(numbered, batch_size)

    def collect(chunk: list[tuple[int, Any]], results: list) -> DecodedBatch:
        batch = DecodedBatch([], [], [])
        for (index, source), result in zip(chunk, results):
            if isinstance(result, Future):
                result = result.result()
            if isinstance(result, BadImage):
                if on_error == "raise":
                    raise result
                logger.warning("skipping image %d: %s", index, result)
                batch.skipped.append(Skipped.of(index, source, result.reason))
            else:
                batch.indices.append(index)
                batch.images.append(result)
        return batch

    if workers == 0:
        while chunk := next_chunk():
            yield collect(chunk, [_safe_call(load, s) for _, s in chunk])
        return

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cliplab-decode")
    pending: collections.deque = collections.deque()
    try:

        def submit_next() -> bool:
            chunk = next_chunk()
            if chunk:
                futures = [pool.submit(_safe_call, load, s) for _, s in chunk]
                pending.append((chunk, futures))
            return bool(chunk)

        for _ in range(1 + prefetch):
            if not submit_next():
                break
        while pending:
            chunk, futures = pending.popleft()
            submit_next()
            yield collect(chunk, futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- batches filled in place


class FilledBatch(NamedTuple):
    """One batch from :func:`iter_filled`.

    Attributes
    ----------
    indices : list of int
        Positions in the input of the items kept, ascending.
    tensor : torch.Tensor of shape (len(indices), *item_shape)
        The kept items, in input order: a view of a preallocated buffer that is
        reused, so it is valid only until the next batch is requested.
    skipped : list of Skipped
        One record per item of this batch that failed (only with ``on_error="skip"``).
    """

    indices: list[int]
    tensor: Any
    skipped: list[Skipped]


_WORKER: tuple | None = None  # (fill, ring) of a decoding process, set by _process_init


def _fill_one(fill: Callable[[Any, Any], None], source: Any, out: Any) -> tuple[str, str] | None:
    """Run ``fill(source, out)``; a failure of this item comes back as ``(source, reason)``.

    A tuple, not the :class:`BadImage`: it crosses the process boundary by pickle, and
    holds no decoding state (see :func:`_bare`).
    """
    try:
        fill(source, out)
        return None
    except BadImage as exc:
        return exc.source, exc.reason
    except MemoryError:
        return describe_source(source), "out of memory decoding or preprocessing the image"


def _process_init(fill: Callable, ring: Any, nice: int) -> None:
    """Set up a decoding process (forked: ``fill`` and the shared ``ring`` are inherited)."""
    global _WORKER, _PIL_GUARD_LOCK
    import torch

    torch.set_num_threads(1)  # one process per core; no intra-op threads of its own
    if nice:
        os.nice(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _PIL_GUARD_LOCK = threading.Lock()  # another thread of the parent may have held it at fork
    _WORKER = (fill, ring)


def _process_fill(buffer: int, start: int, sources: list) -> list[tuple[str, str] | None]:
    """Fill rows ``start, start + 1, ...`` of buffer ``buffer`` (in a decoding process)."""
    fill, ring = _WORKER
    return [_fill_one(fill, source, ring[buffer, start + k]) for k, source in enumerate(sources)]


class _Part(NamedTuple):
    """Item ``offset`` of the list that a process task's future returns."""

    future: Future
    offset: int


def can_fork() -> bool:
    """Whether decoding processes are forked here: on Linux only (macOS system libraries
    are not safe to use after a fork; Windows has none)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def iter_filled(
    sources: Iterable[Any],
    batch_size: int,
    *,
    fill: Callable[[Any, Any], None],
    item_shape: tuple[int, ...],
    on_error: str = "raise",
    workers: int = 2,
    processes: bool = False,
    prefetch: int = 2,
    pin_memory: bool = False,
    nice: int = 0,
) -> Iterator[FilledBatch]:
    """Decode and preprocess items straight into preallocated batch tensors.

    ``fill(source, out)`` writes one item into ``out``, a ``float32`` view of shape
    ``item_shape`` inside a batch buffer; a batch is therefore assembled without a
    ``torch.stack`` or any copy beyond that write.  ``prefetch`` batches are filled
    ahead of the one being returned, so the caller (the model) does not wait for data
    while decoding keeps up.

    Parameters
    ----------
    sources : iterable
        Read lazily, at most ``(1 + prefetch) * batch_size`` ahead of the caller.
    batch_size : int
        Items per batch (the last one may be shorter).
    fill : callable
        ``fill(source, out) -> None``; it may raise :class:`~cliplab.errors.BadImage`.
    item_shape : tuple of int
        Shape of one item, e.g. ``(3, H, W)``.
    on_error : {"raise", "skip"}, default "raise"
        As in :func:`iter_decoded`.
    workers : int, default 2
        Threads or processes; 0 fills in the calling thread, without read-ahead.
    processes : bool, default False
        Fill in forked worker processes instead of threads (where :func:`can_fork`):
        Python code of the decode and transform runs outside this process's GIL, and
        the buffers live in an anonymous shared mapping, so nothing is pickled but the
        sources (paths or bytes) and the failures.  Without fork, threads are used.
    prefetch : int, default 2
        Batches filled ahead of the one returned; ``prefetch + 2`` buffers are allocated.
    pin_memory : bool, default False
        Allocate the buffers in page-locked memory (for copies to a GPU); threads only.
    nice : int, default 0
        Added to the worker processes' niceness: with a positive value they use the
        CPU time the caller leaves idle first, instead of taking it from the caller.

    Yields
    ------
    FilledBatch
        ``(indices, tensor, skipped)`` per ``batch_size`` consecutive sources, in order.
        Items that failed are left out (the kept ones are moved up within the buffer).
        The tensor is overwritten once the next batch is requested.

    Raises
    ------
    cliplab.errors.BadImage
        With ``on_error="raise"``, the first failed item in input order, when its
        batch is reached.
    cliplab.errors.DataError
        If a decoding process died (killed, or crashed in a decoder).

    Notes
    -----
    Each worker process runs ``torch.set_num_threads(1)`` and ignores SIGINT (the
    caller's ``KeyboardInterrupt`` closes the generator, which cancels what has not
    started and stops the processes).  Closing the generator early waits for the
    items being filled.
    """
    import torch

    _check_many_args(on_error, workers, batch_size)
    check_positive_int("prefetch", prefetch, minimum=0)
    processes = processes and workers > 0 and can_fork()
    n_buffers = prefetch + 2 if workers else 1
    shape = (n_buffers, batch_size, *item_shape)
    with torch.inference_mode(False):  # written by worker threads, which are not in that mode
        if processes:
            # an anonymous shared mapping: inherited by the forked workers, and not
            # limited by the size of /dev/shm (64 MB in a default container)
            ring = torch.frombuffer(mmap.mmap(-1, 4 * math.prod(shape)), dtype=torch.float32).view(shape)
        else:
            ring = torch.empty(shape, dtype=torch.float32, pin_memory=pin_memory)
    return _iter_filled(sources, batch_size, fill, ring, on_error, workers, processes, prefetch, nice)


def _iter_filled(sources, batch_size, fill, ring, on_error, workers, processes, prefetch, nice):
    """The generator behind :func:`iter_filled`, arguments already validated."""
    numbered = enumerate(sources)
    n_buffers = ring.shape[0]

    def next_chunk() -> list[tuple[int, Any]]:
        return _take(numbered, batch_size)

    def collect(buffer: int, chunk: list[tuple[int, Any]], results: list) -> FilledBatch:
        batch = FilledBatch([], None, [])
        kept: list[int] = []
        for position, ((index, source), result) in enumerate(zip(chunk, results)):
            try:
                if isinstance(result, _Part):
                    result = result.future.result()[result.offset]
                elif isinstance(result, Future):
                    result = result.result()
            except BrokenProcessPool:
                raise DataError(f"a decoding process died while decoding item {index} "
                                f"({describe_source(source)}); pass workers=0 to decode in this "
                                "process") from None
            if result is None:
                kept.append(position)
                batch.indices.append(index)
                continue
            error = BadImage(*result)
            if on_error == "raise":
                raise error
            logger.warning("skipping image %d: %s", index, error)
            batch.skipped.append(Skipped.of(index, source, error.reason))
        buf = ring[buffer]
        for row, position in enumerate(kept):  # close the gaps left by failed items
            if row != position:
                buf[row].copy_(buf[position])
        return batch._replace(tensor=buf[:len(kept)])

    if workers == 0:
        while chunk := next_chunk():
            yield collect(0, chunk, [_fill_one(fill, s, ring[0, j]) for j, (_, s) in enumerate(chunk)])
        return

    if processes:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_process_init, initargs=(fill, ring, nice))

        def submit(buffer: int, chunk: list[tuple[int, Any]]) -> list[_Part]:
            # one task per worker and batch: contiguous rows, few messages
            parts = min(workers, len(chunk))
            bounds = [len(chunk) * k // parts for k in range(parts + 1)]
            out = []
            for lo, hi in zip(bounds, bounds[1:]):
                future = pool.submit(_process_fill, buffer, lo, [s for _, s in chunk[lo:hi]])
                out.extend(_Part(future, k) for k in range(hi - lo))
            return out
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cliplab-decode")

        def submit(buffer: int, chunk: list[tuple[int, Any]]) -> list[Future]:
            return [pool.submit(_fill_one, fill, s, ring[buffer, j]) for j, (_, s) in enumerate(chunk)]

    pending: collections.deque = collections.deque()
    counter = 0
    try:

        def submit_next() -> bool:
            nonlocal counter
            chunk = next_chunk()
            if chunk:
                buffer = counter % n_buffers
                counter += 1
                pending.append((buffer, chunk, submit(buffer, chunk)))
            return bool(chunk)

        for _ in range(1 + prefetch):
            if not submit_next():
                break
        while pending:
            buffer, chunk, futures = pending.popleft()
            # n_buffers = prefetch + 2: this fills the buffer the caller has just
            # finished with, never the one about to be yielded
            submit_next()
            yield collect(buffer, chunk, futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decode_many(
    sources: Iterable[ImageSource],
    *,
    on_error: str = "raise",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    workers: int = 4,
    progress: bool | None = None,
) -> tuple[list[Image.Image], list[Skipped]]:
    """Decode many images in a thread pool, keeping their order.

    Parameters
    ----------
    sources : iterable of image sources
        Anything :func:`load_image` accepts.
    on_error : {"raise", "skip"}, default "raise"
        ``"raise"``: the first bad image (in input order) raises its
        :class:`~cliplab.errors.BadImage`.  ``"skip"``: bad images are left out of
        ``images`` and listed in ``skipped``.
    max_pixels, draft_size
        As in :func:`load_image`.
    workers : int, default 4
        Decoding threads; 0 decodes in the calling thread.
    progress : bool or None, default None
        Show a progress bar; ``None`` follows ``CLIPLAB_PROGRESS``.

    Returns
    -------
    images : list of PIL.Image.Image
        The ``"RGB"`` images that decoded, in input order.
    skipped : list of Skipped
        One record per image left out, by ascending index.

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    >>> images, skipped = decode_many([buffer.getvalue(), b"not an image"], on_error="skip")
    >>> len(images), skipped[0].index, skipped[0].reason
    (1, 1, 'not an image, or a format PIL cannot read')
    """
    _check_many_args(on_error, workers)
    sources = list(sources)
    images: list[Image.Image] = []
    skipped: list[Skipped] = []
    batch_size = max(1, 4 * workers)
    with progress_bar(total=len(sources), progress=progress, desc="decode", unit="img") as bar:
        for batch in iter_decoded(
            sources,
            batch_size,
            on_error=on_error,
            max_pixels=max_pixels,
            draft_size=draft_size,
            workers=workers,
        ):
            images.extend(batch.images)
            skipped.extend(batch.skipped)
            bar.update(len(batch.images) + len(batch.skipped))
    return images, skipped


# --------------------------------------------------------------------------- files


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(
    paths: str | os.PathLike | Iterable[str | os.PathLike], *, recursive: bool = True
) -> list[Path]:
    """Expand files and folders into a list of image files.

    Parameters
    ----------
    paths : path or iterable of paths
        Files are kept as given, whatever their extension (a bad one then fails
        with a :class:`~cliplab.errors.BadImage` when decoded, rather than being
        dropped silently).  Folders are searched for files whose suffix, in any case,
        is in :data:`IMAGE_EXTENSIONS`; hidden files and folders (name starting with
        ``.``) are not searched.
    recursive : bool, default True
        Search sub-folders too.

    Returns
    -------
    list of pathlib.Path
        The given paths in the given order, each folder replaced by its images sorted
        by path; a file reached twice is listed once, where first reached.

    Raises
    ------
    cliplab.errors.UsageError
        If a path does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.realpath(path)  # not Path.resolve(): a symbolic-link loop must not raise
        if key not in seen:
            seen.add(key)
            found.append(path)

    for given in paths:
        path = Path(given)
        if path.is_dir():
            files = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [] if not recursive else [d for d in dirs if not _is_hidden(d)]
                files.extend(
                    Path(root, name)
                    for name in names
                    if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                )
            for file in sorted(files, key=lambda p: p.parts):
                add(file)
            if not files:
                logger.warning("%s: no image files (%s) found", path, ", ".join(sorted(IMAGE_EXTENSIONS)))
        elif path.exists():
            add(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    return found
