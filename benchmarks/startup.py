"""Start-up time of the command line, against importing open_clip alone.

Contenders, each a fresh Python process timed from launch to exit (interpreter start,
imports, and for classify the model load, preprocessing and printing of one image):

- ``cliplab --help`` (as ``python -m cliplab.cli.main --help``); target < 0.5 s;
- ``cliplab classify one.png --labels a,b`` on the bundled shapes-tiny model, one 64x64
  PNG; target <= 1.1x ``import open_clip``;
- ``python -c "import open_clip"``: the floor of any command that builds a model;
- ``python -c pass``: the interpreter alone.

The contenders run interleaved, round by round, in an order rotated each round, so that
machine load drifting during the run affects every contender alike; the ratios are taken
within each round and reported as median and min-max over the rounds.  "Cold" means a new
process each time; the operating system's file cache is warm after the first round.

Usage: python benchmarks/startup.py [--rounds 5]
Writes benchmarks/results/startup.json (or --out) and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

RESULTS = Path(__file__).parent / "results"


def contenders(image: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "cliplab --help": [py, "-m", "cliplab.cli.main", "--help"],
        "cliplab classify": [py, "-m", "cliplab.cli.main", "classify", str(image), "--labels", "a,b"],
        "import open_clip": [py, "-c", "import open_clip"],
        "python -c pass": [py, "-c", "pass"],
    }


def wall_time(argv: list[str]) -> float:
    env = {**os.environ, "CLIPLAB_PROGRESS": "0"}
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of all contenders (>= 3)")
    ap.add_argument("--out", type=Path, default=RESULTS / "startup.json")
    args = ap.parse_args()
    if args.rounds < 3:
        ap.error("--rounds must be >= 3")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "one.png"
        Image.new("RGB", (64, 64), "red").save(image)
        runs = contenders(image)
        names = list(runs)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate the order each round
            for name in order:
                times[name].append(wall_time(runs[name]))
    ratio = [c / o for c, o in zip(times["cliplab classify"], times["import open_clip"])]
    result = {
        "what": {"cliplab --help": "process start + parser + help text",
                 "cliplab classify": "process start + imports + bundled model load + one 64x64 PNG + print",
                 "import open_clip": "process start + import open_clip",
                 "python -c pass": "process start"},
        "commands": {name: " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv))
                     for name, argv in contenders(Path("one.png")).items()},
        "rounds": args.rounds,
        "seconds": {name: {**summary(values), "runs": values} for name, values in times.items()},
        "ratio_classify_over_import_open_clip": {**summary(ratio), "runs": ratio},
        "targets": {"cliplab --help < 0.5 s": statistics.median(times["cliplab --help"]) < 0.5,
                    "classify <= 1.1x import open_clip": statistics.median(ratio) <= 1.1},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["seconds"]
    print(f"cliplab --help {s['cliplab --help']['median']:.2f} s; classify one image "
          f"{s['cliplab classify']['median']:.2f} s = {statistics.median(ratio):.2f}x import open_clip "
          f"({s['import open_clip']['median']:.2f} s; per-round {min(ratio):.2f}-{max(ratio):.2f}x, "
          f"{args.rounds} rounds); python alone {s['python -c pass']['median']:.2f} s")


if __name__ == "__main__":
    main()
