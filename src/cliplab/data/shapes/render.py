"""Vectorised numpy rendering of ShapesWorld shapes, backgrounds and defects.

Every shape is a signed distance function (SDF) in pixels, negative inside, evaluated
only on the pixel centres of the object's bounding square.  Anti-aliasing is analytic:
the coverage of a pixel is ``clip(0.5 - sdf, 0, 1)``, so one evaluation per pixel gives
smooth edges and the hard mask is ``sdf <= 0`` (coverage >= 0.5).  The SDFs are exact
inside the shapes and close to exact within a pixel outside, which is all the
anti-aliasing needs.

Coordinates: ``x`` grows to the right, ``y`` grows downwards, pixel ``(row, col)`` has its
centre at ``(col + 0.5, row + 0.5)``.
"""

from __future__ import annotations

import numpy as np

#: Object colours (RGB, 0-255): saturated, so they stay apart from the muted backgrounds.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 175, 60),
    "cyan": (30, 205, 215),
    "blue": (40, 75, 225),
    "purple": (140, 45, 195),
    "pink": (250, 120, 195),
}

_SIN36, _COS36 = np.sin(np.pi / 5), np.cos(np.pi / 5)
_SIN30, _COS30 = 0.5, np.sqrt(3.0) / 2.0


def _circle(dx, dy, r):
    return np.hypot(dx, dy) - r


def _square(dx, dy, r):
    return np.maximum(np.abs(dx), np.abs(dy)) - 0.82 * r


def _diamond(dx, dy, r):
    # |x|/0.8 + |y| <= r, divided by the gradient norm sqrt(1/0.64 + 1) to be a distance
    return (np.abs(dx) * 1.25 + np.abs(dy) - r) * 0.6247


def _triangle(dx, dy, r):
    big = 1.12 * r  # circumradius; apothem big/2; shifted down by big/4 to centre the box
    y = dy - 0.25 * big
    ax = np.abs(dx)
    return np.maximum(y, ax * _COS30 - y * _SIN30) - 0.5 * big


def _hexagon(dx, dy, r):
    ax, ay = np.abs(dx), np.abs(dy)
    return np.maximum(ay, ax * _COS30 + ay * _SIN30) - 0.88 * r


def _star(dx, dy, r):
    outer = 1.08 * r
    inner = 0.45 * outer
    y = dy - 0.095 * outer  # centre the bounding box vertically
    rho = np.hypot(dx, y)
    theta = np.arctan2(dx, -y)  # angle from "up", clockwise
    sector = 2 * np.pi / 5
    phi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)  # folded into [0, pi/5]
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    # edge from the tip (outer, 0) to the inner vertex (inner*cos36, inner*sin36)
    ex, ey = inner * _COS36 - outer, inner * _SIN36
    norm = np.hypot(ex, ey)
    nx, ny = ey / norm, -ex / norm  # outward normal
    return (px - outer) * nx + py * ny


def _cross(dx, dy, r):
    ax, ay = np.abs(dx), np.abs(dy)
    arm, half = 0.32 * r, 0.95 * r
    return np.minimum(np.maximum(ax - half, ay - arm), np.maximum(ax - arm, ay - half))


def _ring(dx, dy, r):
    return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r


def _heart(dx, dy, r):
    y = dy + 0.075 * r
    ax = np.abs(dx)
    lobes = np.hypot(ax - 0.47 * r, y + 0.28 * r) - 0.52 * r
    point = np.maximum((ax * 1.23 + y - 0.95 * r) * 0.631, -(y + 0.28 * r))
    return np.minimum(lobes, point)


def _crescent(dx, dy, r):
    bite = np.hypot(dx - 0.5 * r, dy + 0.15 * r) - 0.8 * r
    return np.maximum(np.hypot(dx + 0.1 * r, dy) - 0.95 * r, -bite)


#: shape name -> SDF(dx, dy, r); ``r`` is the half-extent of the shape in pixels.
SDF = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "star": _star,
    "cross": _cross,
    "diamond": _diamond,
    "hexagon": _hexagon,
    "ring": _ring,
    "heart": _heart,
    "crescent": _crescent,
}


def grid(cx: float, cy: float, r: float, size: int, pad: float = 0.0):
    """The pixels around a shape: its bounding square plus 2 px (and ``pad`` px more).

    Returns
    -------
    window : tuple of slice
        ``(rows, cols)`` of the image.
    xs : ndarray of float32, shape (w,)
        Pixel-centre ``x`` minus ``cx``.
    ys : ndarray of float32, shape (h, 1)
        Pixel-centre ``y`` minus ``cy``.
    """
    x0, x1 = max(int(cx - r - pad) - 2, 0), min(int(cx + r + pad) + 3, size)
    y0, y1 = max(int(cy - r - pad) - 2, 0), min(int(cy + r + pad) + 3, size)
    xs = np.arange(x0, x1, dtype=np.float32) + (0.5 - cx)  # (w,)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + (0.5 - cy)  # (h, 1)
    return (slice(y0, y1), slice(x0, x1)), xs, ys


def coverage(shape: str, cx: float, cy: float, r: float, size: int, antialias: bool = True):
    """Coverage of one shape on its bounding square.

    Parameters
    ----------
    shape : str
        A key of :data:`SDF`.
    cx, cy : float
        Centre in pixels.
    r : float
        Half-extent in pixels.
    size : int
        Image side in pixels.
    antialias : bool, default=True
        Soft edges (coverage in [0, 1]) or hard ones (coverage in {0, 1}).

    Returns
    -------
    window : tuple of slice
        ``(rows, cols)`` of the image the coverage covers.
    alpha : ndarray of float32, shape (h, w)
        Pixel coverage; the object mask is ``alpha >= 0.5``.
    """
    window, xs, ys = grid(cx, cy, r, size)
    sdf = SDF[shape](xs[None, :], ys, np.float32(r))  # (h, w)
    if antialias:
        alpha = np.clip(0.5 - sdf, 0.0, 1.0)
    else:
        alpha = (sdf <= 0).astype(np.float32)
    return window, alpha


def paint(image: np.ndarray, window, alpha: np.ndarray, color) -> None:
    """Blend ``color`` into ``image[window]`` (float32, (H, W, 3)) with coverage ``alpha``."""
    patch = image[window]  # (h, w, 3) view
    a = alpha[..., None]  # (h, w, 1)
    patch *= 1.0 - a
    patch += a * np.asarray(color, dtype=np.float32)


# ---------------------------------------------------------------- backgrounds


def _grey(rng, lo=70.0, hi=180.0):
    return rng.uniform(lo, hi) + rng.uniform(-8.0, 8.0, 3)  # (3,) muted, slightly tinted


def _two_greys(rng):
    g1 = _grey(rng, 65.0, 185.0)
    delta = rng.uniform(35.0, 60.0) * rng.choice((-1.0, 1.0))
    g2 = np.clip(g1 + delta, 55.0, 195.0)
    return g1, g2


def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a muted background; returns float32 of shape (size, size, 3)."""
    if kind == "plain":
        return np.broadcast_to(_grey(rng).astype(np.float32), (size, size, 3)).copy()
    coords = np.arange(size, dtype=np.float32) + 0.5  # (S,)
    if kind == "gradient":
        g1, g2 = _two_greys(rng)
        angle = rng.uniform(0.0, 2 * np.pi)
        t = coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle)  # (S, S)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return (g1 + (g2 - g1) * t[..., None]).astype(np.float32)  # (S, S, 3)
    if kind == "stripes":
        g1, g2 = _two_greys(rng)
        period = size / rng.uniform(4.0, 8.0)
        angle = rng.choice((0.0, 0.25, 0.5, 0.75)) * np.pi
        u = coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle)  # (S, S)
        on = (np.mod(u + rng.uniform(0, period), period) < period / 2)[..., None]
        return np.where(on, g1, g2).astype(np.float32)  # (S, S, 3)
    if kind == "noise":
        base = _grey(rng, 80.0, 170.0).astype(np.float32)
        lum = rng.standard_normal((size, size, 1), dtype=np.float32) * 18.0  # (S, S, 1)
        return base + lum
    raise ValueError(f"unknown background {kind!r}")


# ---------------------------------------------------------------- defects


def _segment_sdf(xs, ys, p0, p1, width):
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    wx, wy = xs - p0[0], ys - p0[1]
    t = np.clip((wx * vx + wy * vy) / (vx * vx + vy * vy), 0.0, 1.0)
    return np.hypot(wx - t * vx, wy - t * vy) - width


def defect(kind: str, size: int, rng: np.random.Generator):
    """Draw one defect: returns ``(alpha (S, S) float32, color (3,) float32, mask (S, S) bool)``.

    ``scratch`` is a thin light or dark line, ``hole`` a near-black disc, ``stain`` a
    brown translucent blob made of a few discs.
    """
    coords = np.arange(size, dtype=np.float32) + 0.5
    xs, ys = coords[None, :], coords[:, None]
    if kind == "scratch":
        p0 = rng.uniform(0.1, 0.9, 2) * size
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 0.6) * size
        p1 = np.clip(p0 + length * np.array([np.cos(angle), np.sin(angle)]), 0, size)
        width = max(0.6, rng.uniform(0.008, 0.016) * size)
        sdf = _segment_sdf(xs, ys, p0, p1, width)
        color = np.full(3, 235.0 if rng.random() < 0.5 else 20.0, dtype=np.float32)
        return np.clip(0.5 - sdf, 0.0, 1.0), color, sdf <= 0
    if kind == "hole":
        c = rng.uniform(0.15, 0.85, 2) * size
        rad = max(1.5, rng.uniform(0.04, 0.08) * size)
        sdf = np.hypot(xs - c[0], ys - c[1]) - rad
        return np.clip(0.5 - sdf, 0.0, 1.0), np.array([12.0, 10.0, 10.0], np.float32), sdf <= 0
    if kind == "stain":
        c = rng.uniform(0.2, 0.8, 2) * size
        sdf = None
        for _ in range(3):
            off = rng.normal(0.0, 0.05 * size, 2)
            rad = max(1.5, rng.uniform(0.04, 0.08) * size)
            d = np.hypot(xs - c[0] - off[0], ys - c[1] - off[1]) - rad
            sdf = d if sdf is None else np.minimum(sdf, d)
        alpha = np.clip(0.5 - sdf, 0.0, 1.0) * 0.7
        return alpha, np.array([105.0, 70.0, 25.0], np.float32), sdf <= 0
    raise ValueError(f"unknown defect {kind!r}")
