"""ShapesWorld rendering speed: scenes per second on one core, 1 and 3 objects.

Writes ``benchmarks/results/shapes_render.json`` and prints one line.

    python benchmarks/shapes_render.py [--n 2000] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from cliplab.data.shapes import ShapesWorld


def rate(world: ShapesWorld, n: int) -> float:
    """Scenes per second of ``world.render_batch`` over ``n`` train scenes (best of 3)."""
    best = float("inf")
    for rep in range(3):
        start = time.perf_counter()
        world.render_batch("train", range(rep * n, (rep + 1) * n))
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    results = {}
    for label, n_objects in (("1_object", 1), ("3_objects", 3)):
        world = ShapesWorld(seed=0, image_size=args.image_size, n_objects=n_objects)
        results[label] = round(rate(world, args.n), 1)
    world = ShapesWorld(seed=0, image_size=args.image_size, defect_rate=1.0)
    results["1-3_objects_with_defect"] = round(rate(world, args.n), 1)

    out = {
        "benchmark": "shapes_render",
        "unit": "images/s (one process, one thread)",
        "image_size": args.image_size,
        "n": args.n,
        "images_per_s": results,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }
    path = Path(__file__).parent / "results" / "shapes_render.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"shapes_render {args.image_size}px: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in results.items()))


if __name__ == "__main__":
    main()
