"""The directory serves with the agent's shared HTTP scaffolding, not the cloud agent's code."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from hardware.softhsm import SoftHSMToken
from tests.agent.directory.dirprocess import DirectoryProcess, directory_key

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def directory(
    softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DirectoryProcess]:
    tmp = tmp_path_factory.mktemp("dir-slow")
    process = DirectoryProcess(
        tmp / "dir",
        directory_key(softhsm_token.uri, "dir-slow"),
        extra=["--body-timeout", str(TIMEOUT)],
    )
    yield process
    process.stop()


@pytest.mark.parametrize("path", ["/v1/dir/publish", "/v1/dir/claim", "/v1/dir/status"])
def test_a_body_shorter_than_its_content_length_is_answered_408(
    directory: DirectoryProcess, path: str
) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", directory.port)) as conn:
        conn.settimeout(TIMEOUT + 9)
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        answer = b""
        while chunk := conn.recv(65536):  # until the server closes the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert f"within {TIMEOUT:g} seconds" in error["message"]
    assert time.monotonic() - started < TIMEOUT + 5


def test_directory_modules_import_nothing_of_the_cloud_agent() -> None:
    """The services share agent.http_service; a directory runs without the cloud's code."""
    probe = (
        "import pkgutil, importlib, sys, agent.directory, agent.cli.directory, agent.serving\n"
        "for m in pkgutil.iter_modules(agent.directory.__path__):\n"
        "    importlib.import_module('agent.directory.' + m.name)\n"
        "print([m for m in sys.modules if m == 'agent.cloud' or m.startswith('agent.cloud.')])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
