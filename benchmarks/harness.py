"""What every benchmark here needs: a timing loop, medians, progress, arguments, output.

Shared so that every script measures the same way (one clock read per batch of calls,
wall time, medians) and a change to the method reaches all of them at once.  The
scripts import it as ``harness`` because they run as ``python benchmarks/NAME.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

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


def version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """Where and when a run happened: every results file starts with this."""
    os_release: dict[str, str] = {}
    with contextlib.suppress(OSError):
        os_release = platform.freedesktop_os_release()
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "os": os_release.get("PRETTY_NAME", platform.platform()),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }


def add_run_arguments(
    parser: argparse.ArgumentParser, *, seconds: float, repeat: int
) -> argparse.ArgumentParser:
    """--seconds, --repeat and --json, the same in every benchmark."""
    parser.add_argument(
        "--seconds",
        type=positive_float,
        default=seconds,
        help=f"duration of one measurement (default {seconds:g})",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=repeat,
        help=f"repetitions of each measurement; medians are reported (default {repeat})",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON")
    return parser


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
