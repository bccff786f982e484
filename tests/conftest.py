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
from hypothesis import HealthCheck, settings

from hardware.postgres import PostgresUnavailable, start_cluster
from hardware.softhsm import SoftHSMToken, ensure_token

# Shared, noisy machines: no per-example deadline; correctness, not speed, is tested here.
settings.register_profile(
    "janus", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200
)
settings.load_profile("janus")

_STATE = Path(tempfile.mkdtemp(prefix="janus-tests-"))


# The PC/SC fixtures (pcsc_readers, pcsc_reader) for every test package.
pytest_plugins = ("tests.pcsc",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        action="store",
        default=None,
        help="serial of a real device for tests marked 'hardware'",
    )


# Every token the suite uses. SoftHSM only sees tokens that existed when the module was
# loaded into the process, so they are all created before any test runs.
TOKEN_LABELS = ("janus-test", "pin-test", "interop", "cli")
_tokens: dict[str, SoftHSMToken] = {}


def pytest_configure(config: pytest.Config) -> None:
    os.environ.pop("JANUS_PIN", None)
    os.environ.pop("JANUS_PKCS11_MODULE", None)
    for label in TOKEN_LABELS:
        _tokens[label] = ensure_token(_STATE / "softhsm", label)
    _tokens[TOKEN_LABELS[0]].activate()


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--device"):
        return
    skip = pytest.mark.skip(reason="needs a real device: run with --device SERIAL")
    for item in items:
        if item.get_closest_marker("hardware") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def softhsm_token() -> SoftHSMToken:
    """The session's SoftHSM token, its PIN in a 0600 file the URI points at."""
    return _tokens["janus-test"]


@pytest.fixture(scope="session")
def pin_test_token() -> SoftHSMToken:
    """A token for wrong-PIN tests, so they never disturb the main token."""
    return _tokens["pin-test"]


@pytest.fixture(scope="session")
def cli_token() -> SoftHSMToken:
    """A token the CLI tests drive through `janus` subprocesses."""
    return _tokens["cli"]


@pytest.fixture(scope="session")
def interop_token() -> SoftHSMToken:
    """A token that other PKCS#11 tools (pkcs11-tool) write to and read from."""
    return _tokens["interop"]


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


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port, fsync on.

    Missing binaries fail the tests instead of skipping them: CI must run every
    PostgreSQL test, and a skip would hide that the server was never installed.
    """
    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        pytest.fail(f"cannot start PostgreSQL for the ledger tests: {exc}", pytrace=False)
    try:
        yield cluster.dsn()
    finally:
        cluster.stop()
