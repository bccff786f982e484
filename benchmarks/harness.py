"""What every benchmark here needs: a timing loop, medians, progress, argument types.

Shared so that every script measures the same way (one clock read per batch of calls,
wall time, medians) and a change to the method reaches all of them at once.  The
scripts import it as ``harness`` because they run as ``python benchmarks/NAME.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

Operation = Callable[[], object]


def ops_per_second(operation: Operation, seconds: float, batch: int = 1) -> float:
    """Call ``operation`` for about ``seconds`` of wall time; return calls per second.

    ``batch`` calls run between two clock reads, so the clock costs nothing next to
    fast operations.
    """
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            operation()
        count += batch
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value
