"""ShapesWorld domains: controlled distribution shifts that apply to the scenes of any task.

A domain changes how a scene is *drawn*, never what is in it.  The objects, their
attributes, positions and labels, the background kind and the captions' choices come from
the scene's own random stream ``[seed, split, index]`` exactly as in the original domain;
a domain draws only from its own streams ``[seed, split, index, 2, stage]`` (defects use
``[seed, split, index, 1]``).  So scene ``i`` of a split shows the same objects with the
same labels in every domain, and the original domain (``domain=None`` or ``"original"``)
renders the very bytes it rendered before domains existed: the bundled model's training
data.

>>> from cliplab.data.shapes import ShapesWorld
>>> a = ShapesWorld(seed=0).scene("test", 0)
>>> b = ShapesWorld(seed=0, domain="blur-3").scene("test", 0)
>>> [o.name for o in a.objects] == [o.name for o in b.objects]
True

A domain is one of :data:`DOMAINS` (``ShapesWorld(domain=...)``, ``shapes:<task>@<domain>``,
``cliplab shapes export --domain``).  Families:

``style``
    ``outline`` (a stroke inside the shape's edge, background inside), ``textured``
    (stripes, checks or dots of the object's colour and a darker shade of it),
    ``hand-drawn`` (a wobbly, slightly rotated outline with a pencil stroke),
    ``low-contrast`` (the object's colour pulled 75 % of the way to the background under it).
``lighting``
    ``underexposed`` (gain 0.3-0.4 and a gamma of 1.5), ``backlit`` (a bright glow behind
    the scene, the objects in dark, desaturated silhouette), ``color-cast`` (channel gains
    of a warm, cool, green or magenta white-balance cast at 50-80 % strength).
``clutter``
    ``clutter``: 10-16 neutral grey blobs and lines drawn behind the objects.
``occlusion``
    ``occluded``: one or two neutral grey bars or discs in front of each object, hiding
    15-50 % of it.
``background``
    ``new-backgrounds``: background families not in :data:`~.world.BACKGROUNDS`
    (:data:`NEW_BACKGROUNDS`: checker, dots, waves, clouds), in muted colours.
``corruption``
    ``<kind>-<severity>`` for the kinds of :data:`CORRUPTIONS` and severities 1-5, after
    ImageNet-C (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
    Corruptions and Perturbations", ICLR 2019, arXiv:1903.12261): ``noise`` (Gaussian),
    ``blur`` (Gaussian), ``jpeg``, ``pixelate``, ``contrast`` and ``haze`` (in the role of
    ImageNet-C's "fog").  Pixelation and contrast use ImageNet-C's severity constants, blur
    its sigmas scaled from 224 px to the image side.  Noise (sigma 6-20 of 255) and JPEG
    (quality 90-30) are lighter than ImageNet-C's (sigma 20-97, quality 25-7): shapes-tiny,
    trained on clean renders, is at 25 % colour x shape accuracy under ImageNet-C's
    lightest noise and at 31 % under its lightest JPEG (96 % clean), so all five of those
    levels would sit near the floor; these span from almost harmless to the floor.

Masks and boxes
---------------
Styles, lighting, clutter, backgrounds and corruptions keep every object mask as the
object's region: ``outline`` keeps the region its outline encloses (the stroke lies inside
it), ``hand-drawn`` the region of the wobbled, rotated shape it draws.  ``occluded``
removes the hidden pixels from the masks (and boxes), as the original domain does for
objects drawn on top of each other.  Corruptions and lighting move pixels' values, not the
objects; blur and pixelation smear edges by a pixel or two past the mask.

Notes
-----
The corruptions are implemented here in numpy and Pillow rather than taken from the
``imagecorruptions`` package (Michaelis et al., the maintained port of the ImageNet-C
code; version 1.1.2): it does not import in this environment (it imports
``pkg_resources``, absent from current setuptools, and uses ``np.float_``, removed in
NumPy 2), it draws from the global ``np.random`` state rather than a seeded generator (so
a scene would not be a pure function of its seed without reseeding the process-wide
state), it pulls in OpenCV and scikit-image, and its spatial constants (blur radii,
fog's 256 px plasma map) are set for 224 px images.  Deviation from ImageNet-C:
``haze`` is not ImageNet-C's fog formula (``x + c p``, rescaled by ``max x / (max x + c)``,
which on these mostly mid-grey scenes turns thin-fog patches dark); it blends the image
towards a bright airlight through a veil of multi-octave value noise,
``I = J (1 - v) + A v``, the haze model of Koschmieder, with ``A = 215`` and the veil's
peak opacity rising with the severity.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...errors import UsageError
from ...registry import Registry
from . import render

__all__ = ["CORRUPTIONS", "DOMAINS", "NEW_BACKGROUNDS", "Domain", "check_domain", "domain_rng", "get_domain",
           "list_domains"]

DOMAINS: Registry = Registry("ShapesWorld domain")
"""The domains of ShapesWorld: :class:`Domain` objects, each with a one-line ``help`` and
its ``family``."""

NEW_BACKGROUNDS: tuple[str, ...] = ("checker", "dots", "waves", "clouds")
"""Background families of ``new-backgrounds``; none is in :data:`~.world.BACKGROUNDS`."""

DOMAIN_STREAM = 2
"""The ``k`` of a domain's random streams ``[seed, split, index, k, stage]``."""


@dataclass(frozen=True)
class Domain:
    """How a domain changes the drawing of a scene; every hook is optional.

    Each hook draws from its own random stream (:func:`domain_rng`), so hooks never shift
    each other's draws.

    Attributes
    ----------
    name, family : str
    background : callable, optional
        ``(size, rng) -> (image float32 (S, S, 3), kind)``: replaces the background.
    behind : callable, optional
        ``(image, specs, rng) -> None``: draws on the background before the objects.
    shape : callable, optional
        ``(spec, size, antialias, rng) -> (window, alpha (h, w), inside (h, w) bool)``:
        what to paint of an object (``alpha``) and its region (``inside``).
    paint : callable, optional
        ``(image, window, alpha, spec, rng) -> None``: paints an object.
    front : callable, optional
        ``(image, masks, rng) -> (S, S) bool``: draws occluders after the objects and
        returns the pixels they hide.
    pixels : callable, optional
        ``(image float32 (S, S, 3), cover (S, S) float32, rng) -> image``: the last
        step (lighting, corruptions); ``cover`` is the objects' coverage.
    """

    name: str
    family: str
    background: Callable | None = None
    behind: Callable | None = None
    shape: Callable | None = None
    paint: Callable | None = None
    front: Callable | None = None
    pixels: Callable | None = None


def _add(domain: Domain, help: str) -> Domain:
    return DOMAINS.register(domain.name, help=help, family=domain.family)(domain)


def list_domains() -> list[str]:
    """Names of the registered domains, ``"original"`` first."""
    return DOMAINS.names()


def check_domain(name: str | None) -> str | None:
    """``None`` for the original domain (``None``, ``""`` or ``"original"``), else ``name``.

    Raises
    ------
    UsageError
        An unknown domain name.
    """
    if name is None or name == "" or name == "original":
        return None
    if not isinstance(name, str) or name not in DOMAINS:
        plain = [d for d in list_domains() if DOMAINS.meta(d)["family"] != "corruption"]
        raise UsageError(f"unknown ShapesWorld domain {name!r}; choose one of {', '.join(plain)}, or a "
                         f"corruption KIND-SEVERITY with KIND one of {', '.join(CORRUPTIONS)} and SEVERITY "
                         f"1-5 (e.g. blur-3)")
    return name


def get_domain(name: str | None) -> Domain | None:
    """The :class:`Domain` of ``name``, ``None`` for the original domain."""
    name = check_domain(name)
    return None if name is None else DOMAINS.get(name)


def domain_rng(seed: int, split_id: int, index: int, stage: int) -> np.random.Generator:
    """The random stream of one stage of a domain: ``[seed, split, index, 2, stage]``."""
    return np.random.default_rng([seed, split_id, index, DOMAIN_STREAM, stage])


# ----------------------------------------------------------------- helpers


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :], c[:, None]  # (1, S), (S, 1)


def _soft(sdf: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - sdf, 0.0, 1.0).astype(np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C) float32 with reflected edges."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for j, w in enumerate(k):
            acc += w * (p[j:j + n] if axis == 0 else p[:, j:j + n])
        out = acc
    return out


def _value_noise(size: int, rng: np.random.Generator, decay: float, base: int = 2) -> np.ndarray:
    """Smooth multi-octave noise in [0, 1], (S, S) float32: octave ``o`` (a ``base * 2**o``
    grid, bilinearly upsampled) has amplitude ``decay ** -o``."""
    from PIL import Image

    total = np.zeros((size, size), np.float32)
    cells, amp = base, 1.0
    while cells <= size:
        grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
        up = Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR)
        total += amp * np.asarray(up, np.float32)
        cells, amp = cells * 2, amp / decay
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _muted(rng: np.random.Generator, sat: float = 0.3) -> np.ndarray:
    """A muted random colour: grey level 70-185 tinted ``sat`` towards a random hue, (3,)."""
    hue = rng.uniform(0, 2 * np.pi)
    lum = rng.uniform(70.0, 185.0)
    tint = np.cos(hue - np.array([0.0, 2.0944, 4.1888]))  # (3,) a hue direction
    return (lum + sat * 90.0 * tint).astype(np.float32)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------- original


_add(Domain("original", "original"), "the training domain of shapes-tiny: filled shapes on muted backgrounds")


# ----------------------------------------------------------------- styles


def _outline_shape(spec, size, antialias, rng):
    window, xs, ys = render.grid(spec.cx, spec.cy, spec.r, size)
    sdf = render.SDF[spec.shape](xs[None, :], ys, np.float32(spec.r))  # (h, w)
    width = max(1.5, 0.16 * spec.r)
    stroke = np.abs(sdf + 0.5 * width) - 0.5 * width  # a band of `width` inside the edge
    alpha = _soft(stroke) if antialias else (stroke <= 0).astype(np.float32)
    return window, alpha, sdf <= 0


_add(Domain("outline", "style", shape=_outline_shape), "outline only: a coloured stroke, the background inside")


def _textured_paint(image, window, alpha, spec, rng):
    h, w = alpha.shape
    period = rng.uniform(3.0, 5.0) * image.shape[0] / 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle
        a = rng.uniform(0, np.pi)
        on = np.mod(xx * np.cos(a) + yy * np.sin(a), period) < period / 2
    elif kind == 1:  # checks
        on = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    else:  # dots
        fx, fy = np.mod(xx, period) - period / 2, np.mod(yy, period) - period / 2
        on = np.hypot(fx, fy) > period * 0.3
    dark = spec.rgb * 0.5
    color = np.where(on[..., None], spec.rgb, dark)  # (h, w, 3)
    a = alpha[..., None]
    patch = image[window]
    patch *= 1.0 - a
    patch += a * color


_add(Domain("textured", "style", paint=_textured_paint),
     "textured fill: stripes, checks or dots of the object's colour and a darker shade")


def _hand_drawn_shape(spec, size, antialias, rng):
    r = spec.r
    window, xs, ys = render.grid(spec.cx, spec.cy, r, size, pad=0.35 * r)
    angle = rng.uniform(-0.35, 0.35)  # radians, about +-20 degrees
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xs[None, :], ys
    rx, ry = c * dx + s * dy, -s * dx + c * dy  # (h, w) rotated frame
    sdf = render.SDF[spec.shape](rx, ry, np.float32(r))
    theta = np.arctan2(ry, rx)
    wobble = np.zeros_like(sdf)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.02, 0.05) * r * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    sdf = (sdf + wobble).astype(np.float32)
    alpha = _soft(sdf) if antialias else (sdf <= 0).astype(np.float32)
    return window, alpha, sdf <= 0


def _hand_drawn_paint(image, window, alpha, spec, rng):
    render.paint(image, window, alpha, spec.rgb)
    # a dark pencil line along the inside of the edge
    edge = np.clip(1.0 - np.abs(alpha - 0.5) * 2.0, 0.0, 1.0) ** 0.5 * (alpha > 0.5)
    render.paint(image, window, 0.8 * edge.astype(np.float32), np.full(3, 35.0, np.float32))


_add(Domain("hand-drawn", "style", shape=_hand_drawn_shape, paint=_hand_drawn_paint),
     "hand-drawn jitter: wobbly, slightly rotated shapes with a pencil edge")


def _low_contrast_paint(image, window, alpha, spec, rng):
    under = image[window].reshape(-1, 3).mean(0)  # (3,) the background under the object
    render.paint(image, window, alpha, under + 0.25 * (spec.rgb - under))


_add(Domain("low-contrast", "style", paint=_low_contrast_paint),
     "low contrast: object colours pulled 75 % of the way to the background under them")


# ----------------------------------------------------------------- lighting


def _underexposed(image, cover, rng):
    gain = rng.uniform(0.3, 0.4)
    return 255.0 * gain * (np.clip(image, 0, 255) / 255.0) ** 1.5


_add(Domain("underexposed", "lighting", pixels=_underexposed), "under-exposed: gain 0.3-0.4 and gamma 1.5")


def _backlit(image, cover, rng):
    size = image.shape[0]
    xs, ys = _coords(size)
    lx, ly = rng.uniform(0.2, 0.8) * size, rng.uniform(-0.1, 0.5) * size
    glow = np.exp(-((xs - lx) ** 2 + (ys - ly) ** 2) / (2 * (0.5 * size) ** 2))[..., None]  # (S, S, 1)
    bright = image + (255.0 - image) * (0.45 + 0.45 * glow)
    lum = _luminance(image)[..., None]
    dark = 0.5 * (0.5 * image + 0.5 * lum)  # silhouette: dark and desaturated
    c = cover[..., None]
    return (1.0 - c) * bright + c * dark


_add(Domain("backlit", "lighting", pixels=_backlit),
     "backlit: a bright glow behind the scene, objects in dark, desaturated silhouette")


_CASTS = np.array([[1.0, 0.72, 0.42], [0.5, 0.75, 1.0], [0.62, 1.0, 0.55], [1.0, 0.55, 0.95]], np.float32)


def _color_cast(image, cover, rng):
    cast = _CASTS[rng.integers(len(_CASTS))]
    strength = rng.uniform(0.5, 0.8)
    return image * (1.0 - strength * (1.0 - cast))  # (3,) channel gains, the largest 1


_add(Domain("color-cast", "lighting", pixels=_color_cast),
     "colour cast: a strong warm, cool, green or magenta white-balance tint")


# ----------------------------------------------------------------- clutter and occlusion


def _clutter(image, specs, rng):
    size = image.shape[0]
    xs, ys = _coords(size)
    for _ in range(int(rng.integers(10, 17))):
        grey = np.full(3, rng.uniform(20.0, 235.0), np.float32)
        cx, cy = rng.uniform(0, size, 2)
        if rng.random() < 0.5:  # an ellipse blob
            a, b = rng.uniform(0.05, 0.16, 2) * size
            t = rng.uniform(0, np.pi)
            u = ((xs - cx) * np.cos(t) + (ys - cy) * np.sin(t)) / a
            v = (-(xs - cx) * np.sin(t) + (ys - cy) * np.cos(t)) / b
            sdf = (np.sqrt(u * u + v * v) - 1.0) * min(a, b)
        else:  # a line
            t = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.2, 0.5) * size
            p1 = (cx + length * np.cos(t), cy + length * np.sin(t))
            sdf = render._segment_sdf(xs, ys, (cx, cy), p1, max(0.6, 0.02 * size))
        render.paint(image, (slice(0, size), slice(0, size)), _soft(sdf), grey)


_add(Domain("clutter", "clutter", behind=_clutter),
     "clutter: 10-16 neutral grey blobs and lines behind the objects")


def _occluder(size, mask, rng):
    """One grey bar or disc near the object ``mask``: (alpha (S, S), sdf <= 0)."""
    xs, ys = _coords(size)
    yy, xx = np.nonzero(mask)
    cx, cy = xx.mean() + 0.5, yy.mean() + 0.5
    r = max(2.0, 0.5 * max(xx.max() - xx.min(), yy.max() - yy.min()) + 0.5)
    t = rng.uniform(0, 2 * np.pi)
    d = rng.uniform(0.5, 1.1) * r
    ox, oy = cx + d * np.cos(t), cy + d * np.sin(t)
    if rng.random() < 0.5:  # a disc
        sdf = np.hypot(xs - ox, ys - oy) - rng.uniform(0.5, 0.9) * r
    else:  # a bar across the object's edge
        a = rng.uniform(0, np.pi)
        u = (xs - ox) * np.cos(a) + (ys - oy) * np.sin(a)
        v = -(xs - ox) * np.sin(a) + (ys - oy) * np.cos(a)
        sdf = np.maximum(np.abs(u) - rng.uniform(0.25, 0.45) * r, np.abs(v) - 2.0 * r)
    return _soft(sdf), sdf <= 0


def _occlude(image, masks, rng):
    size = image.shape[0]
    hidden = np.zeros((size, size), bool)
    areas = [max(int(m.sum()), 1) for m in masks]
    for m, area in zip(masks, areas):
        for _ in range(int(rng.integers(1, 3))):
            for _try in range(12):
                if not (m & ~hidden).any():
                    break
                alpha, occ = _occluder(size, m & ~hidden, rng)
                now = hidden | occ
                kept = min((mm & ~now).sum() / a for mm, a in zip(masks, areas))
                if kept >= 0.5 and (m & occ & ~hidden).sum() / area >= 0.15:
                    lum = float(_luminance(image[occ].mean(0)))
                    grey = (200.0 if lum < 128 else 55.0) + rng.uniform(-15.0, 15.0)
                    render.paint(image, (slice(0, size), slice(0, size)), alpha, np.full(3, grey, np.float32))
                    hidden = now
                    break
    return hidden


_add(Domain("occluded", "occlusion", front=_occlude),
     "occlusion: grey bars or discs in front of each object, hiding 15-50 % of it (masks exclude them)")


# ----------------------------------------------------------------- unseen backgrounds


def _new_background(size, rng):
    kind = NEW_BACKGROUNDS[rng.integers(len(NEW_BACKGROUNDS))]
    c1 = _muted(rng)
    c2 = np.clip(c1 + rng.choice((-1.0, 1.0)) * rng.uniform(40.0, 70.0) + rng.uniform(-20, 20, 3), 30, 225)
    xs, ys = _coords(size)
    if kind == "checker":
        cell = size / rng.uniform(4.0, 8.0)
        on = (np.floor(xs / cell) + np.floor(ys / cell)) % 2 == 0
    elif kind == "dots":
        period = size / rng.uniform(5.0, 9.0)
        fx, fy = np.mod(xs, period) - period / 2, np.mod(ys, period) - period / 2
        on = np.hypot(fx, fy) < period * rng.uniform(0.2, 0.35)
    elif kind == "waves":
        period = size / rng.uniform(3.0, 6.0)
        amp = rng.uniform(0.05, 0.12) * size
        on = np.mod(ys + amp * np.sin(2 * np.pi * xs / (size / rng.uniform(1.0, 2.5))), period) < period / 2
    else:  # clouds
        t = _value_noise(size, rng, decay=1.8)[..., None]
        return (c1 + (c2 - c1) * t).astype(np.float32), kind
    on = np.broadcast_to(on, (size, size))[..., None]
    return np.where(on, c1, c2).astype(np.float32), kind


_add(Domain("new-backgrounds", "background", background=_new_background),
     "unseen backgrounds: checker, dots, waves or clouds in muted colours")


# ----------------------------------------------------------------- corruptions


def _noise(image, s, rng):
    sigma = (6.0, 9.0, 12.0, 15.0, 20.0)[s - 1]  # of 255
    return image + rng.standard_normal(image.shape, dtype=np.float32) * sigma


def _gaussian_blur(image, s, rng):
    return _blur(image, (1.0, 2.0, 3.0, 4.0, 6.0)[s - 1] * image.shape[0] / 224.0)


def _jpeg(image, s, rng):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(image)).save(buf, format="JPEG", quality=(90, 75, 60, 45, 30)[s - 1])
    return np.asarray(Image.open(buf).convert("RGB"), np.float32)


def _pixelate(image, s, rng):
    from PIL import Image

    size = image.shape[0]
    small = max(2, int(size * (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]))
    img = Image.fromarray(_to_uint8(image)).resize((small, small), Image.BOX).resize((size, size), Image.BOX)
    return np.asarray(img, np.float32)


def _contrast(image, s, rng):
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    mean = image.mean(axis=(0, 1), keepdims=True)  # (1, 1, 3)
    return (image - mean) * c + mean


def _haze(image, s, rng):
    # a bright veil of uneven thickness: I = J (1 - v) + A v (the scattering model of haze)
    strength = (0.35, 0.5, 0.6, 0.7, 0.8)[s - 1]
    veil = strength * (0.55 + 0.45 * _value_noise(image.shape[0], rng, decay=1.7))[..., None]  # (S, S, 1)
    return image * (1.0 - veil) + 215.0 * veil


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


CORRUPTIONS: dict[str, tuple[Callable, str]] = {
    "noise": (_noise, "Gaussian noise, sigma 6-20 of 255"),
    "blur": (_gaussian_blur, "Gaussian blur, sigma 1-6 px at 224 px, scaled to the image"),
    "jpeg": (_jpeg, "JPEG compression, quality 90-30"),
    "pixelate": (_pixelate, "pixelation, down to 0.6-0.25 of the side and back up"),
    "contrast": (_contrast, "contrast scaled to 0.4-0.05 around the image mean"),
    "haze": (_haze, "fog-like haze: a bright veil of uneven thickness, 35-80 % at its thickest"),
}
"""Corruption kinds: ``fn(image float32 (S, S, 3), severity 1-5, rng) -> image`` and a help line."""


def _corruption(fn: Callable, severity: int) -> Callable:
    def pixels(image, cover, rng):
        return fn(image, severity, rng)

    return pixels


for _kind, (_fn, _help) in CORRUPTIONS.items():
    for _s in range(1, 6):
        _add(Domain(f"{_kind}-{_s}", "corruption", pixels=_corruption(_fn, _s)),
             f"{_help}; severity {_s} of 5")
