"""``msg/send`` delivery is bounded as a whole, whatever the receiving server does."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cloud import outbound
from agent.errors import DeliveryError
from janus_hsm.algorithms import Algorithm
from tests.policies.keys import software_keys


@pytest.fixture
def trickler() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers one byte every 0.2 s, forever."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"y" * 10_000:
                    if stop.is_set():
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/inbox"
    stop.set()
    thread.join(5)
    listener.close()


def test_a_receiver_that_trickles_cannot_hold_a_send(
    trickler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = software_keys(tmp_path, {"grant": Algorithm.EdDSA, "bob": Algorithm.X25519})
    monkeypatch.setattr(outbound, "SEND_TIMEOUT", 1.0)  # each read is well inside it
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="TimeoutError"):
        outbound.send_message(
            keys["grant"], {"to": keys["bob"].did, "endpoint": trickler, "body": {"x": 1}}
        )
    assert time.monotonic() - started < 3.0
