"""A client that announces a body and does not send it is answered 408 and let go.

Raw sockets against a real ``janus cloud serve`` process: HTTP clients send the body
they announce, which is exactly what these clients do not do.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from agent.cloud.process import CloudProcess

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    process = CloudProcess(tmp_path_factory.mktemp("cloud"), owner=None, body_timeout=TIMEOUT)
    yield process
    process.stop()


def read_until_closed(conn: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; fails if it keeps the connection."""
    started = time.monotonic()
    conn.settimeout(limit)
    answer = b""
    try:
        while chunk := conn.recv(65536):
            answer += chunk
    except TimeoutError:
        pytest.fail(f"the connection is still open after {limit} s; received {answer!r}")
    return answer, time.monotonic() - started


def assert_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert f"within {TIMEOUT:g} seconds" in error["message"]


@pytest.mark.parametrize("path", ["/v1/didcomm", "/v1/grants", "/v1/grants/x/actions/sign/a"])
def test_a_body_shorter_than_its_content_length_times_out(cloud: CloudProcess, path: str) -> None:
    with socket.create_connection(("127.0.0.1", cloud.port)) as conn:
        # No "Connection: close": the server must close it on its own.
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        answer, waited = read_until_closed(conn, limit=TIMEOUT + 9)
    assert_408(answer)
    assert TIMEOUT - 0.2 < waited < TIMEOUT + 5


def test_a_body_trickled_slowly_times_out_as_a_whole(cloud: CloudProcess) -> None:
    """Each byte comes well within any per-read limit; the whole body still has one."""

    def trickle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the server closes while we are still sending
            for _ in range(100):
                conn.sendall(b"x")
                time.sleep(0.1)

    with socket.create_connection(("127.0.0.1", cloud.port)) as conn:
        conn.sendall(b"PUT /v1/grants/x/bundle HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        sender = threading.Thread(target=trickle, args=(conn,), daemon=True)
        sender.start()
        answer, waited = read_until_closed(conn, limit=TIMEOUT + 9)
        sender.join(timeout=15)
    assert_408(answer)
    assert waited < TIMEOUT + 5


def test_the_agent_serves_on_after_slow_clients(cloud: CloudProcess) -> None:
    held = [socket.create_connection(("127.0.0.1", cloud.port)) for _ in range(5)]
    try:
        for conn in held:
            conn.sendall(b"POST /v1/didcomm HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        answer = httpx.post(f"{cloud.url}/v1/didcomm", content=b"{}", timeout=10)
        assert answer.status_code == 400  # a prompt client is answered at once
        for conn in held:
            assert_408(read_until_closed(conn, limit=TIMEOUT + 9)[0])
    finally:
        for conn in held:
            conn.close()
    assert cloud.process.poll() is None
    assert httpx.get(f"{cloud.url}/healthz", timeout=10).json()["status"] == "ok"


# did:key of an Ed25519 test vector: the services need an owner, never asked here.
OWNER = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    process = CloudProcess(
        tmp_path_factory.mktemp("relay"),
        owner=OWNER,
        body_timeout=TIMEOUT,
        extra_args=["--receiving", "--sending", "--sending-allow-host", "127.0.0.1"],
    )
    yield process
    process.stop()


@pytest.mark.parametrize(
    "path", ["/v1/receiving/deliveries", "/v1/receiving/pickup", "/v1/sending/submissions"]
)
def test_the_relay_services_time_out_bodies_alike(relay: CloudProcess, path: str) -> None:
    with socket.create_connection(("127.0.0.1", relay.port)) as conn:
        conn.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        answer, waited = read_until_closed(conn, limit=TIMEOUT + 9)
    assert_408(answer)
    assert TIMEOUT - 0.2 < waited < TIMEOUT + 5
