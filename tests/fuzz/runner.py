"""Run one fuzz target for a number of cases with Hypothesis; count the cases run."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.fuzz.http_target import HTTP_TARGET
from tests.fuzz.seeds import Seeds
from tests.fuzz.targets import TARGETS, Target

ALL_TARGETS: tuple[Target, ...] = (*TARGETS, HTTP_TARGET)

#: Cases per target in the test suite's short run (``make test``).
SHORT_CASES = int(os.environ.get("FUZZ_SHORT_CASES", "300"))


def share(total: int, target: Target) -> int:
    """The target's share of ``total`` cases, by weight (at least 1)."""
    weights = sum(t.weight for t in ALL_TARGETS)
    return max(1, total * target.weight // weights)


def run_target(target: Target, seeds: Seeds, cases: int) -> int:
    """Run ``cases`` generated cases (more if Hypothesis shrinks a failure); return the count.

    No example database: a fuzz run explores afresh each time, and a failure is reported
    with the seed and the shrunk input that reproduce it.
    """
    strategy = target.inputs(seeds)
    count = 0

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def case(value: Any) -> None:
        nonlocal count
        count += 1
        target.check(seeds, value)

    try:
        case()
    except Exception as exc:
        exc.add_note(f"fuzz target {target.name}: failed after {count} cases")
        exc.fuzz_cases = count  # type: ignore[attr-defined]
        raise
    return count
