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
# Derandomized: every run of the suite tries the same examples, so a run's verdict is the
# code's, not the draw's; exploring new examples is `make fuzz`'s job, or a local run with
# JANUS_HYPOTHESIS=explore (a fresh draw each time; a failure prints how to replay it).
settings.register_profile(
    "janus",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=200,
    derandomize=True,
    database=None,
)
settings.register_profile("explore", settings.get_profile("janus"), derandomize=False)
settings.load_profile("explore" if os.environ.get("JANUS_HYPOTHESIS", "") == "explore" else "janus")

_STATE = Path(tempfile.mkdtemp(prefix="janus-tests-"))


# The PC/SC fixtures (pcsc_readers, pcsc_reader) for every test package, and the
# SoftHSM-in-a-container ones (token_container, container_tokens).
pytest_plugins = ("tests.pcsc", "tests.containers")

# Where the PKCS#11 tests can run: SoftHSM loaded into the test process, and SoftHSM in
# a container reached through p11-kit-client.so. Modules marked `pkcs11_targets` run
# every test that uses the token fixtures below once on each.
PKCS11_TARGETS = ("softhsm", "container")
_TOKEN_FIXTURES = frozenset({"softhsm_token", "pin_test_token", "pkcs11_provider"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        action="store",
        default=None,
        help="serial of a real device for tests marked 'hardware'",
    )


# Every token the suite uses. SoftHSM only sees tokens that existed when the module was
# loaded into the process, so they are all created before any test runs.
TOKEN_LABELS = ("janus-test", "pin-test", "interop", "cli", "hsm-service")
_tokens: dict[str, SoftHSMToken] = {}


def pytest_configure(config: pytest.Config) -> None:
    os.environ.pop("JANUS_PIN", None)
    os.environ.pop("JANUS_PKCS11_MODULE", None)
    for label in TOKEN_LABELS:
        _tokens[label] = ensure_token(_STATE / "softhsm", label)
    _tokens[TOKEN_LABELS[0]].activate()


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE, ignore_errors=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    definition = metafunc.definition
    if (
        definition.get_closest_marker("pkcs11_targets") is None
        or definition.get_closest_marker("local_softhsm") is not None
        or not _TOKEN_FIXTURES & set(metafunc.fixturenames)
    ):
        return
    metafunc.parametrize("pkcs11_target", PKCS11_TARGETS, indirect=True, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Modules holding a slow test first (a stable sort: the order inside stays): `make
    # test` hands whole modules to parallel workers in this order, and a long module
    # started last would leave the other workers idle while it runs.
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)
    if config.getoption("--device"):
        return
    skip = pytest.mark.skip(reason="needs a real device: run with --device SERIAL")
    for item in items:
        if item.get_closest_marker("hardware") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pkcs11_target(request: pytest.FixtureRequest) -> str:
    """Which SoftHSM the token fixtures give: local unless the test is parametrised."""
    return str(getattr(request, "param", "softhsm"))


def _token(request: pytest.FixtureRequest, target: str, label: str) -> SoftHSMToken:
    if target == "container":
        tokens: dict[str, SoftHSMToken] = request.getfixturevalue("container_tokens")
        return tokens[label]
    return _tokens[label]


@pytest.fixture(autouse=True)
def _pkcs11_default_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """On the container target, URIs without module-path reach the container too.

    That is how a deployment selects a remote token for every URI at once, and it lets
    tests that name a token by label alone run unchanged on both targets.
    """
    if "pkcs11_target" not in request.fixturenames:
        yield
        return
    token: SoftHSMToken = request.getfixturevalue("softhsm_token")
    if request.getfixturevalue("pkcs11_target") != "container":
        yield
        return
    _skip_unless_mechanisms(request)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JANUS_PKCS11_MODULE", token.module_path)
        yield


# What generating and using a key of each algorithm asks of the token.
_ALGORITHM_MECHANISMS = {
    "ES256": ("EC_KEY_PAIR_GEN", "ECDSA"),
    "ES384": ("EC_KEY_PAIR_GEN", "ECDSA"),
    "EdDSA": ("EC_EDWARDS_KEY_PAIR_GEN", "EDDSA"),
    "X25519": ("EC_EDWARDS_KEY_PAIR_GEN", "ECDH1_DERIVE"),
}
_offered: dict[str, frozenset[str]] = {}


# Why a token reached over p11-kit's RPC may lack a mechanism SoftHSM itself offers: the
# RPC carries only mechanisms whose parameters it can serialise (p11-kit/rpc-message.c).
_RPC_GAPS = {
    "ECDH1_DERIVE": "p11-kit before 0.25 (Debian bookworm's 0.24.1) cannot carry it",
    "EC_EDWARDS_KEY_PAIR_GEN": "p11-kit's RPC (0.25.5 too) carries no Edwards-curve mechanism",
    "EDDSA": "p11-kit's RPC (0.25.5 too) carries no Edwards-curve mechanism",
    "AES_KEY_WRAP_PAD": "p11-kit's RPC (0.25.5 too) carries no AES key wrap",
}


def _skip_unless_mechanisms(request: pytest.FixtureRequest) -> None:
    """Skip a test whose mechanisms the token does not offer (its `alg` parameter and
    its `pkcs11_mechanisms` marker say which), naming them and why they are missing.

    The container target is built with p11-kit 0.25.5, which carries ECDH; Ed25519,
    X25519 and AES key wrapping still cannot cross p11-kit's RPC at all.
    """
    wanted: list[str] = []
    callspec = getattr(request.node, "callspec", None)
    alg = callspec.params.get("alg") if callspec is not None else None
    if alg is not None:
        wanted += _ALGORITHM_MECHANISMS[getattr(alg, "value", str(alg))]
    marker = request.node.get_closest_marker("pkcs11_mechanisms")
    if marker is not None:
        wanted += marker.args
    if not wanted:
        return
    token: SoftHSMToken = request.getfixturevalue("softhsm_token")
    if token.module_path not in _offered:
        import pkcs11

        slot = pkcs11.lib(token.module_path).get_token(token_label=token.label).slot
        names = (getattr(m, "name", str(m)) for m in slot.get_mechanisms())
        _offered[token.module_path] = frozenset(names)
    missing = sorted(set(wanted) - _offered[token.module_path])
    if missing:
        why = sorted({_RPC_GAPS.get(m, "the token does not offer it") for m in missing})
        pytest.skip(
            f"the token behind {token.module_path} does not offer CKM_{', CKM_'.join(missing)}"
            f" ({'; '.join(why)})"
        )


@pytest.fixture(scope="session")
def softhsm_token(request: pytest.FixtureRequest, pkcs11_target: str) -> SoftHSMToken:
    """The session's SoftHSM token, its PIN in a 0600 file the URI points at."""
    return _token(request, pkcs11_target, "janus-test")


@pytest.fixture(scope="session")
def pin_test_token(request: pytest.FixtureRequest, pkcs11_target: str) -> SoftHSMToken:
    """A token for wrong-PIN tests, so they never disturb the main token."""
    return _token(request, pkcs11_target, "pin-test")


@pytest.fixture(scope="session")
def cli_token() -> SoftHSMToken:
    """A token the CLI tests drive through `janus` subprocesses."""
    return _tokens["cli"]


@pytest.fixture(scope="session")
def interop_token() -> SoftHSMToken:
    """A token that other PKCS#11 tools (pkcs11-tool) write to and read from."""
    return _tokens["interop"]


@pytest.fixture(scope="session")
def hsm_service_token() -> SoftHSMToken:
    """A token of the HSM service's own (tests/agent/hsm_service): its keys are the
    service's, and nothing else on it disturbs what clients list through the service."""
    return _tokens["hsm-service"]


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
