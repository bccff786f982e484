"""The long fuzz run (``make fuzz``): every target, FUZZ_CASES cases in all (100,000).

    python -m tests.fuzz.driver [--cases N] [--target NAME ...]

Cases are shared between targets by weight; each target's count and time are printed,
then the total.  A failing target prints Hypothesis's shrunk input and the
``@reproduce_failure`` line that replays it, and the run exits 1 after the others ran.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tests.fuzz.http_target import close_http
from tests.fuzz.runner import ALL_TARGETS, run_target, share
from tests.fuzz.seeds import make_seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=int(os.environ.get("FUZZ_CASES", "100000")))
    parser.add_argument("--target", action="append", choices=[t.name for t in ALL_TARGETS])
    args = parser.parse_args(argv)
    targets = [t for t in ALL_TARGETS if not args.target or t.name in args.target]
    failed: list[str] = []
    total = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="janus-fuzz-") as directory:
        seeds = make_seeds(Path(directory))
        try:
            for target in targets:
                cases = share(args.cases, target) if not args.target else args.cases // len(targets)
                t0 = time.monotonic()
                try:
                    ran = run_target(target, seeds, cases)
                    outcome = "ok"
                except Exception as exc:  # report it, run the other targets, fail at the end
                    traceback.print_exc()
                    ran, outcome = getattr(exc, "fuzz_cases", 0), "FAILED"
                    failed.append(target.name)
                total += ran
                print(
                    f"{target.name:<12} {ran:>8} cases  {time.monotonic() - t0:7.1f} s  {outcome}",
                    flush=True,
                )
        finally:
            close_http(seeds)
    print(f"{'total':<12} {total:>8} cases  {time.monotonic() - started:7.1f} s", flush=True)
    if failed:
        print(f"fuzz: failed targets: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
