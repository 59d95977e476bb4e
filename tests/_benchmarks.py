"""Load a script of benchmarks/ as a module, and run its ``main`` with the caller's threads kept."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(filename: str):
    """The module of ``benchmarks/<filename>`` (executed once per call)."""
    path = ROOT / "benchmarks" / filename
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_benchmark(module, argv):
    """``module.main(argv)``; the torch thread count (benchmarks set one thread) is restored after."""
    import torch

    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)
