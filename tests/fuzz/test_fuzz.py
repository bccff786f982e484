"""The short fuzz run: every parser of outside input, a few hundred cases each.

``make fuzz`` (tests/fuzz/driver.py) runs the same targets for 100,000 cases; this
keeps them in the test suite so a regression shows up in ``make test``.  The case count
per target is ``FUZZ_SHORT_CASES`` (default 300).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.http_target import close_http
from tests.fuzz.runner import ALL_TARGETS, SHORT_CASES, run_target
from tests.fuzz.seeds import Seeds, make_seeds
from tests.fuzz.targets import Target


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeds]:
    directory: Path = tmp_path_factory.mktemp("fuzz-keys")
    made = make_seeds(directory)
    yield made
    close_http(made)


@pytest.mark.parametrize("target", ALL_TARGETS, ids=[t.name for t in ALL_TARGETS])
def test_parser_accepts_or_refuses_typed(target: Target, seeds: Seeds) -> None:
    assert run_target(target, seeds, SHORT_CASES) > 0
