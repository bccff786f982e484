"""Fixtures that run SoftHSM in a container and reach it over p11-kit's RPC (pytest-docker).

A pytest plugin loaded by the root conftest.  pytest-docker's fixtures are overridden
to drive podman-compose (or Docker's compose where a daemon runs) with
``hardware/container/compose.yaml``; see ``hardware/token_container.py`` for the
engine choice, the image and the socket.

The container starts once per session, on first use, and is removed at its end by
pytest-docker's ``down`` even when tests failed; containers left by a session that was
killed are removed at the start of the next.  Without a usable engine every test
that needs the container is skipped with the reason naming what is missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hardware.token_container import (
    COMPOSE_FILE,
    ContainerError,
    ContainerUnavailable,
    RemoteToken,
    TokenContainer,
    ensure_image,
    find_engine,
    remove_leftovers,
)

# The tokens the container serves: the same labels as the local tests' tokens, so the
# PKCS#11 suite runs unchanged on either.
CONTAINER_TOKENS = ("janus-test", "pin-test")

_STATE = Path(tempfile.mkdtemp(prefix="janus-container-"))
_state: dict[str, Any] = {}


def _container() -> TokenContainer:
    """The session's container description; raises ContainerUnavailable when no engine."""
    if "container" not in _state:
        try:
            engine = find_engine()
        except ContainerUnavailable as exc:
            _state["container"] = exc
        else:
            _state["container"] = TokenContainer.for_state_dir(
                engine, _STATE, CONTAINER_TOKENS, owned=True
            )
    found = _state["container"]
    if isinstance(found, ContainerUnavailable):
        raise found
    assert isinstance(found, TokenContainer)
    return found


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return _container().compose_shell()


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    return _container().project


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # No --wait: podman 4.3's healthchecks need systemd; readiness is checked from the
    # host instead (the tokens visible through p11-kit-client).
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v -t 5"]


@pytest.fixture(scope="session")
def token_container(request: pytest.FixtureRequest) -> Iterator[TokenContainer]:
    """The running container, its tokens visible on the host; skipped without an engine."""
    try:
        container = _container()
        ensure_image(container.engine)
    except ContainerUnavailable as exc:
        pytest.skip(f"no SoftHSM container: {exc}")
    remove_leftovers(container.engine)
    container.prepare()
    request.getfixturevalue("docker_services")  # compose up now, down at session end
    try:
        container.wait_ready(timeout=60)
    except ContainerError as exc:
        pytest.fail(str(exc), pytrace=False)
    # p11-kit-client reads the address when it is initialised, in this process and in
    # every `janus` subprocess a test starts.
    os.environ["P11_KIT_SERVER_ADDRESS"] = container.address
    yield container


@pytest.fixture(scope="session")
def container_tokens(token_container: TokenContainer) -> dict[str, RemoteToken]:
    """The container's tokens by label, as the host reaches them (p11-kit-client.so)."""
    return {label: token_container.token(label) for label in CONTAINER_TOKENS}
