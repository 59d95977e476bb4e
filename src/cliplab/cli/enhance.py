"""``cliplab enhance``: enhance backlit images with a trained RAVE enhancer (PNG out).

The enhancer folder is what :func:`cliplab.generative.rave.save_enhancer` writes.  Each
image is enhanced at its own size and written as ``OUT/<name>.png`` (``<name>_1.png`` ... for
inputs sharing a name; ``OUT/enhanced.csv`` maps each enhanced input to its output, keeping
the rows of earlier runs into the folder; a file of the same name already in ``OUT`` is
replaced; an ``OUT`` that is an input folder, or inside one, or an output that would
overwrite an input is refused, exit code 2); unreadable images are
counted, listed and skipped (``--strict`` stops at the first one, exit code 4); when no
image could be enhanced the command fails with exit code 4.

Exit codes: 0 ok, 2 usage, 3 the enhancer could not be loaded, 4 no image found or none
readable (or a bad image with ``--strict``) or ``--out`` is a file, 130 interrupted (enhanced images already
written are kept).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import DataError, UsageError
from ._common import report_skipped

HELP = "enhance backlit images with a trained RAVE enhancer (writes PNGs)"


def add_parser(sub) -> None:
    p = sub.add_parser("enhance", help=HELP,
                       description="Enhance images (files or folders) with a RAVE enhancement net "
                                   "(docs/generative.md#rave); writes OUT/<name>.png per image.",
                       epilog="exit codes: 0 ok, 2 usage, 3 the enhancer could not be loaded, 4 no image found or "
                              "none readable (or a bad image with --strict) or --out is a file, 130 interrupted "
                              "(images already written are kept)")
    p.add_argument("paths", nargs="+", metavar="IMAGES", help="image files or folders")
    p.add_argument("--enhancer", required=True, help="folder written by cliplab.generative.rave.save_enhancer")
    p.add_argument("--out", required=True, help="output folder of the enhanced PNGs")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels than this; 0 = no limit "
                        "(default: CLIPLAB_MAX_PIXELS or about 179 million)")
    p.add_argument("--max-side", type=int, default=1024,
                   help="compute the illumination map on a copy at most this many pixels on the longer side "
                        "and upsample it; the output keeps the input's size (default: 1024; 0 = always at "
                        "full size, which needs several GB for a large photo)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad image instead of skipping it")
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np
    from PIL import Image

    from .._progress import progress_bar
    from ..data.images import DEFAULT_MAX_PIXELS, find_images, load_image
    from ..data.records import Skipped
    from ..errors import BadImage
    from ..generative.rave import enhance, load_enhancer

    if args.max_side < 0 or 0 < args.max_side < 8:
        raise UsageError(f"--max-side must be 0 (full size) or >= 8 pixels, got {args.max_side}")
    items = find_images(args.paths)
    if not items:
        raise DataError(f"no image files found under {', '.join(args.paths)}")
    out = Path(args.out)
    targets, names = [], set()
    for path in items:  # two inputs with one stem (a.jpg, a.png) keep both outputs: a.png, a_1.png
        name = stem = Path(path).stem
        k = 1
        while name in names:
            name, k = f"{stem}_{k}", k + 1
        names.add(name)
        targets.append(out / f"{name}.png")
    inputs = {Path(p).resolve() for p in items}
    folders = [Path(p).resolve() for p in args.paths if Path(p).is_dir()]
    out_abs = out.resolve()
    inside = next((f for f in folders if out_abs == f or f in out_abs.parents), None)
    if inside is not None:
        raise UsageError(f"--out {out}: is an input folder or inside one ({inside}); a rerun would read the "
                         "enhanced images as inputs: choose another folder")
    clash = next((t for t in targets if t.resolve() in inputs), None)
    if clash is not None:
        raise UsageError(f"--out {out}: writing {clash.name} would overwrite an input image; choose another folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a folder")
    net = load_enhancer(args.enhancer)
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    skipped, written = [], []
    for i, (path, target) in enumerate(zip(items, progress_bar(targets, desc="enhance", unit="image"))):
        try:
            image = np.asarray(load_image(path, max_pixels=max_pixels))      # (H, W, 3) uint8
        except BadImage as err:
            if args.strict:
                raise
            skipped.append(Skipped(i, str(path), err.reason))
            continue
        enhanced = enhance(net, image, max_side=args.max_side or None)[0]   # (H, W, 3) in [0, 1]
        out.mkdir(parents=True, exist_ok=True)                                # only once there is output
        Image.fromarray((enhanced * 255.0).round().astype(np.uint8)).save(target)
        written.append((str(path), target.name))
        _write_manifest(out, written)
    report_skipped(skipped)
    if not written:
        raise DataError(f"none of the {len(items)} image(s) could be read; nothing was enhanced")
    print(f"wrote {len(written)} enhanced image(s) to {out} (input -> output in {out / MANIFEST})", file=sys.stderr)
    return 0


MANIFEST = "enhanced.csv"


def _write_manifest(out: Path, rows) -> None:
    """``OUT/enhanced.csv``: which input each PNG came from (rewritten after every image).

    Rows of an earlier run into the same folder are kept, except for the outputs this run
    rewrote."""
    import csv
    import os

    path = out / MANIFEST
    new_outputs = {o for _, o in rows}
    old = []
    if path.is_file():
        try:
            with open(path, newline="", encoding="utf-8") as f:
                old = [r for r in list(csv.reader(f))[1:] if len(r) == 2 and r[1] not in new_outputs]
        except (OSError, UnicodeDecodeError, csv.Error):
            old = []
    tmp = out / f".{MANIFEST}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input", "output"])
        w.writerows(old + [list(r) for r in rows])
    os.replace(tmp, path)
