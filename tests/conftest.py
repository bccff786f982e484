"""Shared fixtures: a real SoftHSM2 token per test session, in a private directory.

SoftHSM reads SOFTHSM2_CONF once, when the module is first loaded into a process, so
the variable is set in pytest_configure, before any test can load the module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware.softhsm import SoftHSMToken, ensure_token

_STATE = Path(tempfile.mkdtemp(prefix="janus-tests-"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        action="store",
        default=None,
        help="serial of a real device for tests marked 'hardware'",
    )


def pytest_configure(config: pytest.Config) -> None:
    os.environ["SOFTHSM2_CONF"] = str(_STATE / "softhsm" / "softhsm2.conf")
    os.environ.pop("JANUS_PIN", None)
    os.environ.pop("JANUS_PKCS11_MODULE", None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--device"):
        return
    skip = pytest.mark.skip(reason="needs a real device: run with --device SERIAL")
    for item in items:
        if "hardware" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def softhsm_token() -> SoftHSMToken:
    """The session's SoftHSM token, its PIN in a 0600 file the URI points at."""
    token = ensure_token(_STATE / "softhsm", "janus-test")
    token.activate()
    return token


@pytest.fixture(scope="session")
def pkcs11_provider(softhsm_token: SoftHSMToken) -> Iterator[object]:
    from janus_hsm.backends.pkcs11 import Pkcs11Provider

    provider = Pkcs11Provider.open(softhsm_token.uri())
    yield provider


@pytest.fixture
def key_name(request: pytest.FixtureRequest) -> str:
    """A label unique to the test, so tests sharing the token never collide."""
    import hashlib

    digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    return f"t-{digest}"
