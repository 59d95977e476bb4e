"""ShapesWorld rendering speed: scenes per second on one core, 1 and 3 objects, every domain.

The per-domain rates are 64 px single-object scenes (the shapes-tiny world) in each
domain of ``cliplab.data.shapes.DOMAINS``; ``original`` is the target's number (at least
2,000 img/s per thread).  Writes ``benchmarks/results/shapes_render.json`` and prints one line.

    python benchmarks/shapes_render.py [--n 2000] [--n-domain 500] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from cliplab.data.shapes import ShapesWorld, list_domains, shapes_tiny_world  # noqa: E402


def rate(world: ShapesWorld, n: int) -> float:
    """Scenes per CPU second of ``world.render_batch`` over ``n`` train scenes (best of 3).

    CPU time of this process, which renders on one thread: on a shared machine, time the
    other processes take does not count against it.
    """
    best = float("inf")
    for rep in range(3):
        start = time.process_time()
        world.render_batch("train", range(rep * n, (rep + 1) * n))
        best = min(best, time.process_time() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--n-domain", type=int, default=500, help="scenes per domain (best of 3 runs)")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    results = {}
    for label, n_objects in (("1_object", 1), ("3_objects", 3)):
        world = ShapesWorld(seed=0, image_size=args.image_size, n_objects=n_objects)
        results[label] = round(rate(world, args.n), 1)
    world = ShapesWorld(seed=0, image_size=args.image_size, defect_rate=1.0)
    results["1-3_objects_with_defect"] = round(rate(world, args.n), 1)
    domains = {}
    for domain in list_domains():
        world = shapes_tiny_world(0, image_size=args.image_size, domain=domain)
        domains[domain] = round(rate(world, args.n_domain), 1)

    out = {
        "benchmark": "shapes_render",
        "unit": "images per CPU second (one process, one thread)",
        "image_size": args.image_size,
        "n": args.n,
        "images_per_s": results,
        "n_domain": args.n_domain,
        "domains_1_object_images_per_s": domains,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }
    path = Path(__file__).parent / "results" / "shapes_render.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    slowest = min(domains, key=domains.get)
    print(f"shapes_render {args.image_size}px: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in results.items())
          + f"; domains (1 object): original {domains['original']:.0f}, slowest {slowest} {domains[slowest]:.0f} img/s")


if __name__ == "__main__":
    main()
