"""Pictures of class maps: a fixed palette, coloured overlays, a legend, and files on disk.

:func:`save_segmentation` writes what ``cliplab segment --out`` writes: per image a
class-index PNG (pixel value = class index; 8-bit up to 256 classes, 16-bit beyond) and a
coloured overlay, plus one ``legend.png`` and ``classes.txt`` (one class name per line, in
index order) for the whole run.  :func:`draw_detections` draws labelled boxes (``cliplab
detect --out``) in the same palette (class ``k`` in colour ``k + 1``: colour 0 is the black
of the background).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["palette", "colorize", "overlay", "legend", "save_segmentation", "draw_detections"]


def palette(n: int) -> np.ndarray:
    """``n`` distinct colours, uint8 (n, 3): the PASCAL VOC colour map (bit-interleaved index)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def colorize(mask: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Class map (H, W) -> RGB uint8 (H, W, 3) with ``colors`` (C, 3)."""
    return colors[np.clip(mask, 0, len(colors) - 1)]


def overlay(image, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The image with its class map blended on top (``alpha`` of the class colour)."""
    base = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    if base.shape[:2] != mask.shape:
        base = np.asarray(Image.fromarray(base.astype(np.uint8)).resize(mask.shape[::-1], Image.BILINEAR), np.float32)
    mixed = (1 - alpha) * base + alpha * colorize(mask, colors).astype(np.float32)
    return Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))


def legend(names: Sequence[str], colors: np.ndarray, *, row: int = 18) -> Image.Image:
    """A picture listing each class name beside its colour swatch."""
    width = 40 + 7 * max(len(n) for n in names)
    img = Image.new("RGB", (width, row * len(names) + 6), "white")
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(names):
        y = 3 + i * row
        draw.rectangle([4, y, 4 + row - 4, y + row - 4], fill=tuple(int(v) for v in colors[i]), outline="black")
        draw.text((row + 8, y + 2), f"{i} {name}", fill="black")
    return img


def save_segmentation(result, images: Sequence, out, *, names: Sequence[str] | None = None) -> list[dict]:
    """Write class-index PNGs, overlays, ``legend.png`` and ``classes.txt`` of a :class:`SegmentationResult`.

    Parameters
    ----------
    result : SegmentationResult
    images : sequence of path, PIL image or uint8 array
        The images segmented, in the same order (for the overlays and file names).
    out : path
        Folder, created if needed.
    names : sequence of str, optional
        File stems (default: each path's stem, else ``image-<i>``; repeated stems get ``-<i>``).

    Returns
    -------
    list of dict
        Per image: ``mask`` and ``overlay`` paths and ``classes`` (the class names present).
    """
    from ..data.images import load_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colors = palette(len(result.classes))
    legend(result.classes, colors).save(out / "legend.png")
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in result.classes), encoding="utf-8")
    stems = list(names) if names is not None else [
        Path(x).stem if isinstance(x, (str, Path)) else f"image-{i}" for i, x in enumerate(images)]
    seen: dict = {}
    rows = []
    for i, (img, mask, stem) in enumerate(zip(images, result.masks, stems)):
        if stem in seen:
            stem = f"{stem}-{i}"
        seen[stem] = i
        mode = "L" if len(result.classes) <= 256 else "I;16"
        Image.fromarray(mask.astype(np.uint8 if mode == "L" else np.uint16), mode=mode).save(out / f"{stem}.png")
        pil = Image.fromarray(img) if isinstance(img, np.ndarray) else load_image(img)
        overlay(pil, mask, colors).save(out / f"{stem}_overlay.png")
        present = [result.classes[c] for c in np.unique(mask)]
        rows.append({"mask": out / f"{stem}.png", "overlay": out / f"{stem}_overlay.png", "classes": present})
    return rows


def draw_detections(image, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    classes: Sequence[str], *, width: int = 2) -> Image.Image:
    """The image with each box drawn in its class's colour and labelled ``name score``.

    Parameters
    ----------
    image : PIL image or uint8 array (H, W, 3)
    boxes : ndarray (K, 4)
        ``x0, y0, x1, y1`` in pixels, ``x1``/``y1`` exclusive.
    labels : ndarray (K,) int
        Index into ``classes``.
    scores : ndarray (K,)
    classes : sequence of str
    width : int, default=2
        Line width in pixels.

    Returns
    -------
    PIL.Image.Image
        RGB, the image's size; boxes drawn lowest score first, so the best are on top.
    """
    img = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB")
    colors = palette(len(classes) + 1)[1:]
    draw = ImageDraw.Draw(img)
    for k in np.argsort(np.asarray(scores), kind="stable"):
        x0, y0, x1, y1 = (float(v) for v in boxes[k])
        color = tuple(int(v) for v in colors[int(labels[k])])
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=width)
        text = f"{classes[int(labels[k])]} {float(scores[k]):.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), text)
        ty = y0 - (ty1 - ty0) - 2 if y0 >= ty1 - ty0 + 2 else y0
        draw.rectangle([x0, ty, x0 + tx1 - tx0 + 2, ty + ty1 - ty0 + 2], fill=color)
        draw.text((x0 + 1, ty), text, fill="white" if sum(color) < 384 else "black")
    return img
