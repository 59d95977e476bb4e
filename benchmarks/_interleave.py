"""Interleaved timing shared by the benchmarks: contenders run round by round.

Timing each contender in its own block lets the machine's speed drift between blocks
(other processes, thermal state) and shows up as a gain or loss of one side.  Here every
round runs every contender once, in an order rotated by one each round, and ratios are
taken within a round: the median and the range of the per-round ratios are reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleave(contenders: dict[str, Callable[[], float | None]], rounds: int,
               warmup: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds per round for each contender.

    A contender that returns a ``float`` returns the seconds it measured itself (when
    it has set-up to leave out); for any other return value its wall time is measured
    here.  ``warmup`` callables run once,
    untimed, before the first round (for example the contender on a few items).
    """
    for fn in (warmup or {}).values():
        fn()
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            own = contenders[name]()
            elapsed = time.perf_counter() - t0
            times[name].append(own if isinstance(own, float) else elapsed)
    return times


def ratio(times: dict[str, list[float]], faster: str, than: str) -> dict:
    """Per-round speed of ``faster`` relative to ``than`` (time of ``than`` / time of ``faster``)."""
    per_round = [b / a for a, b in zip(times[faster], times[than])]
    return {"of": faster, "vs": than, "median": statistics.median(per_round),
            "min": min(per_round), "max": max(per_round), "per_round": per_round}


def fmt(r: dict) -> str:
    """``1.23x (1.20-1.25)`` for a :func:`ratio`."""
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def rates(times: dict[str, list[float]], items: int) -> dict[str, float]:
    """Median items per second of each contender."""
    return {name: items / statistics.median(t) for name, t in times.items()}
