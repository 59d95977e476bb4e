"""Chinese captions of ShapesWorld scenes: their own templates and word order.

A second caption language for multilingual training and zero-shot (DC-CLIP).  The
captions are written from the scene's ground truth, not translated from the English
ones: Chinese puts the place first and the noun last (``"左边有一个大的红色圆形"``, "on
the left there is a large red circle"), attaches the colour before the shape with or
without 的 (``"红色圆形"``, ``"红色的圆形"``), and states relations as ``"红色圆形在蓝色方形的左边"``
("the red circle is to the left of the blue square"), read from the objects' boxes.

Every scene gets the canonical caption first (size, colour, shape and place of every
object), then ``n - 1`` rewrites taken in turn from the template pool starting at the
scene's index: no random numbers, so the world's random streams, images and English
captions are untouched.  :func:`parse_caption` reads the colour-shape pairs, sizes,
places and the relation back, which is how the tests check them.

The CLIP BPE tokenizer encodes the UTF-8 bytes of these characters: a three-object
caption takes up to 76 tokens with start and end (``MAX_TOKENS_ZH``), so a model reading
them needs a context of 77 (CLIP's) rather than shapes-tiny's 32.
"""

from __future__ import annotations

import re

COLOR_ZH = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "cyan": "青色", "blue": "蓝色",
            "purple": "紫色", "pink": "粉色"}
SHAPE_ZH = {"circle": "圆形", "square": "方形", "triangle": "三角形", "star": "星形", "cross": "十字形",
            "diamond": "菱形", "hexagon": "六边形", "ring": "圆环", "heart": "心形", "crescent": "月牙形"}
SIZE_ZH = {"small": "小", "large": "大"}
POSITION_ZH = {"top left": "左上角", "top": "上方", "top right": "右上角", "left": "左边", "center": "中间",
               "right": "右边", "bottom left": "左下角", "bottom": "下方", "bottom right": "右下角"}
BACKGROUND_ZH = {"plain": "纯色", "gradient": "渐变", "stripes": "条纹", "noise": "噪点", "checker": "棋盘格",
                 "dots": "圆点", "waves": "波浪", "clouds": "云朵"}
RELATION_ZH = {"left": "左边", "right": "右边", "above": "上面", "below": "下面"}
_COUNT_ZH = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五", 6: "六"}

MAX_TOKENS_ZH = 77
"""Context length that holds every Chinese caption of 1-3 object scenes (CLIP's 77)."""

ZH_TEMPLATE = "一张{}{}的照片。"
"""Zero-shot prompt in Chinese ("a photo of a {colour}{shape}."), filled with (colour, shape) words."""


def object_zh(color: str, shape: str, *, de: bool = False) -> str:
    """``"红色圆形"``, or ``"红色的圆形"`` with ``de``."""
    return f"{COLOR_ZH[color]}{'的' if de else ''}{SHAPE_ZH[shape]}"


def relation(a, b) -> str:
    """Where object ``a`` lies relative to ``b`` from their boxes: left, right, above or below.

    The larger of the horizontal and vertical distances between the box centres
    decides (ties go to left/right).
    """
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def _single(o, bg: str) -> list[str]:
    c, s, z, p = COLOR_ZH[o.color], SHAPE_ZH[o.shape], SIZE_ZH[o.size], POSITION_ZH[o.position]
    return [
        f"{p}有一个{z}的{c}{s}",
        f"一个{c}的{s}",
        f"一张{z}{c}{s}的照片。",
        f"{bg}背景上的一个{c}{s}",
        f"一个{c}{s}位于{p}",
        f"{p}是一个{c}的{s}",
        f"一幅{c}{s}的图画",
        f"一个{z}{c}{s}",
    ]


def _multi(objects, bg: str) -> list[str]:
    count = _COUNT_ZH.get(len(objects), str(len(objects)))
    short = [object_zh(o.color, o.shape) for o in objects]
    full = [f"{POSITION_ZH[o.position]}有{SIZE_ZH[o.size]}{object_zh(o.color, o.shape)}" for o in objects]
    rel = f"{short[0]}在{short[1]}的{RELATION_ZH[relation(objects[0], objects[1])]}"
    if len(objects) > 2:
        rel += "，还有" + "和".join(f"一个{s}" for s in short[2:])
    return [
        "，".join(full),
        rel,
        f"{count}个图形：" + "、".join(short),
        f"{bg}背景上有" + "、".join(short),
        f"一张{count}个图形的照片：" + "、".join(short) + "。",
        "、".join(f"{SIZE_ZH[o.size]}的{object_zh(o.color, o.shape, de=True)}" for o in objects),
    ]


def chinese_captions(objects, background: str, n: int = 5, offset: int = 0) -> list[str]:
    """Chinese captions of one scene: the canonical one, then ``n - 1`` rewrites.

    Parameters
    ----------
    objects : list of ObjectGT
        The visible objects, in drawing order (the relation is between the first two).
    background : str
        The background kind.
    n : int, default 5
        Number of captions (at most the pool's size).
    offset : int, default 0
        Where the rewrites start in the pool (the scene index spreads them).

    Returns
    -------
    list of str
    """
    bg = BACKGROUND_ZH[background]
    pool = _single(objects[0], bg) if len(objects) == 1 else _multi(objects, bg)
    rest = pool[1:]
    k = min(n - 1, len(rest))
    return [pool[0]] + [rest[(offset + j) % len(rest)] for j in range(k)]


_COLOR_BY_ZH = {v: k for k, v in COLOR_ZH.items()}
_SHAPE_BY_ZH = {v: k for k, v in SHAPE_ZH.items()}
_SIZE_BY_ZH = {v: k for k, v in SIZE_ZH.items()}
_POSITION_BY_ZH = {v: k for k, v in POSITION_ZH.items()}
_RELATION_BY_ZH = {v: k for k, v in RELATION_ZH.items()}
_OBJECT_RE = re.compile(f"({'|'.join(_COLOR_BY_ZH)})的?({'|'.join(sorted(_SHAPE_BY_ZH, key=len, reverse=True))})")
_PLACED_RE = re.compile(f"({'|'.join(_POSITION_BY_ZH)})有(?:一个)?({'|'.join(_SIZE_BY_ZH)})的?{_OBJECT_RE.pattern}")
_RELATION_RE = re.compile(f"^{_OBJECT_RE.pattern}在{_OBJECT_RE.pattern}的({'|'.join(_RELATION_BY_ZH)})")


def parse_caption(caption: str) -> dict:
    """Read a Chinese caption back into attribute words (English).

    Returns
    -------
    dict
        ``objects``: list of (colour, shape) in caption order; ``placed``: list of
        (position, size, colour, shape) of the ``"{place}有(一个){size}(的){colour}{shape}"``
        clauses; ``relation``: ``(colour_a, shape_a, rel, colour_b, shape_b)`` or None.
    """
    objects = [(_COLOR_BY_ZH[c], _SHAPE_BY_ZH[s]) for c, s in _OBJECT_RE.findall(caption)]
    placed = [(_POSITION_BY_ZH[p], _SIZE_BY_ZH[z], _COLOR_BY_ZH[c], _SHAPE_BY_ZH[s])
              for p, z, c, s in _PLACED_RE.findall(caption)]
    m = _RELATION_RE.search(caption)
    rel = None if m is None else (_COLOR_BY_ZH[m.group(1)], _SHAPE_BY_ZH[m.group(2)], _RELATION_BY_ZH[m.group(5)],
                                  _COLOR_BY_ZH[m.group(3)], _SHAPE_BY_ZH[m.group(4)])
    return {"objects": objects, "placed": placed, "relation": rel}
