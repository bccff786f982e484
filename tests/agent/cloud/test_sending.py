"""The sending service in real ``janus cloud serve --sending`` processes on loopback.

A receiving service runs next to it (``--sending-allow-host 127.0.0.1`` lets the sending
service forward over plain http to loopback, which its URL policy refuses otherwise).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from agent.relationships.delivery import (
    SENDING_RESOURCE,
    SUBMIT_ACTION,
    HeldAddress,
    ReceivingClient,
    ReceivingUrlRefusedError,
    SendingClient,
    ServiceError,
    seal_address,
)
from hardware.postgres import free_port
from hardware.softhsm import SoftHSMToken
from janus_hsm.public_keys import b64url_decode
from policies.abilities import Ability

SENDING_RULE = """
[[rule]]
name = "sending"
audiences = ["*"]
abilities = [{ can = "msg/submit", with = "janus:sending" }]
max_ttl = "1h"
max_uses = 1000
"""
SUBMIT = Ability(SENDING_RESOURCE, SUBMIT_ACTION)
SENDING_ARGS = [
    "--sending",
    "--sending-allow-host",
    "127.0.0.1",
    "--sending-retry-base",
    "0.2",
    "--log-level",
    "debug",
]


@pytest.fixture(scope="module")
def edge(softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory) -> EdgeAgent:
    state = tmp_path_factory.mktemp("edge")
    EdgeAgent.init(state, softhsm_token.uri())
    with (state / "policy.toml").open("a") as policy:
        policy.write(SENDING_RULE)
    return EdgeAgent.open(state)


@pytest.fixture(scope="module")
def receiving(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    process = CloudProcess(
        tmp_path_factory.mktemp("receiving"), owner=edge.did, extra_args=["--receiving"]
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sending(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    process = CloudProcess(
        tmp_path_factory.mktemp("sending"), owner=edge.did, extra_args=SENDING_ARGS
    )
    yield process
    process.stop()


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError("timed out")


def grant(edge: EdgeAgent, sending: CloudProcess, uses: int) -> str:
    return str(edge.grant(sending.url, [SUBMIT], ttl_seconds=600, uses=uses)["grant_id"])


def received(edge: EdgeAgent, receiving: ReceivingClient, held: HeldAddress) -> list[bytes]:
    return [d.ciphertext for d in receiving.pickup(edge.root, held)]


def test_submit_forward_and_use_limits(
    edge: EdgeAgent, receiving: CloudProcess, sending: CloudProcess
) -> None:
    owner = ReceivingClient(receiving.url)
    held = owner.create_address(edge.root)
    key = ReceivingClient(receiving.url).service_key()
    client = SendingClient(sending.url, grant(edge, sending, uses=3))

    # Bad input is refused before a use is counted.
    with pytest.raises(ServiceError) as bad:
        client.submit(receiving.url, b"short", b"hello")
    assert bad.value.code == "sealed_address_invalid"
    with pytest.raises(ReceivingUrlRefusedError):
        client.submit("http://10.0.0.1:80", seal_address(key, held.address, b"m"), b"m")

    ids = []
    for n in range(3):
        message = f"message {n}".encode()
        ids.append(client.submit(receiving.url, seal_address(key, held.address, message), message))
    with pytest.raises(ServiceError) as exhausted:
        client.submit(receiving.url, seal_address(key, held.address, b"4"), b"4")
    assert exhausted.value.code in ("uses_exhausted", "grant_inactive")

    wait_for(lambda: all(client.status(i)["state"] == "delivered" for i in ids))
    assert sorted(received(edge, owner, held)) == [b"message 0", b"message 1", b"message 2"]


def test_delay_is_honoured(edge: EdgeAgent, receiving: CloudProcess, sending: CloudProcess) -> None:
    owner = ReceivingClient(receiving.url)
    held = owner.create_address(edge.root)
    client = SendingClient(sending.url, grant(edge, sending, uses=1))
    sealed = seal_address(owner.service_key(), held.address, b"later")
    started = time.time()
    submission = client.submit(receiving.url, sealed, b"later", delay=2)
    time.sleep(1)
    assert client.status(submission)["state"] == "queued"
    assert received(edge, owner, held) == []
    wait_for(lambda: client.status(submission)["state"] == "delivered")
    assert time.time() - started >= 2
    assert received(edge, owner, held) == [b"later"]


def test_kill_9_before_forwarding_then_restart_forwards(
    edge: EdgeAgent, receiving: CloudProcess, tmp_path: Path
) -> None:
    process = CloudProcess(tmp_path / "sending", owner=edge.did, extra_args=SENDING_ARGS)
    owner = ReceivingClient(receiving.url)
    held = owner.create_address(edge.root)
    try:
        client = SendingClient(process.url, grant(edge, process, uses=5))
        sealed = seal_address(owner.service_key(), held.address, b"durable")
        client.submit(receiving.url, sealed, b"durable", delay=3)
        process.process.send_signal(signal.SIGKILL)
        process.process.wait()
    finally:
        process.stop()
    assert received(edge, owner, held) == []
    restarted = CloudProcess(tmp_path / "sending", owner=edge.did, extra_args=SENDING_ARGS)
    try:
        assert wait_for(lambda: received(edge, owner, held)) == [b"durable"]
    finally:
        restarted.stop()


def test_receiving_down_is_retried_with_backoff(
    edge: EdgeAgent, sending: CloudProcess, tmp_path: Path
) -> None:
    port = free_port()
    down = CloudProcess(
        tmp_path / "receiving", owner=edge.did, port=port, extra_args=["--receiving"]
    )
    owner = ReceivingClient(down.url)
    held = owner.create_address(edge.root)
    sealed = seal_address(owner.service_key(), held.address, b"eventually")
    down.stop()

    client = SendingClient(sending.url, grant(edge, sending, uses=1))
    submission = client.submit(down.url, sealed, b"eventually")
    status = wait_for(lambda: (s := client.status(submission))["attempts"] >= 3 and s)
    assert status["state"] == "queued"
    assert status["last_error"] == "unreachable"
    # Backoff 0.2, 0.4, 0.8 s (±20 %): the fourth attempt is >= 1.1 s after submission.
    assert status["next_attempt"] - status["created_at"] >= 0.9

    back = CloudProcess(
        tmp_path / "receiving", owner=edge.did, port=port, extra_args=["--receiving"]
    )
    try:
        wait_for(lambda: client.status(submission)["state"] == "delivered", timeout=30)
        assert received(edge, ReceivingClient(back.url), held) == [b"eventually"]
    finally:
        back.stop()


def test_permanent_refusal_is_not_retried(
    edge: EdgeAgent, receiving: CloudProcess, sending: CloudProcess
) -> None:
    owner = ReceivingClient(receiving.url)
    held = owner.create_address(edge.root)
    owner.retire_address(edge.root, held)
    client = SendingClient(sending.url, grant(edge, sending, uses=1))
    sealed = seal_address(owner.service_key(), held.address, b"to a retired address")
    submission = client.submit(receiving.url, sealed, b"to a retired address")
    status = wait_for(lambda: (s := client.status(submission))["state"] != "queued" and s)
    assert status["state"] == "failed"
    assert status["last_error"] == "address_retired"
    assert status["attempts"] == 1


def test_the_sending_service_never_holds_the_address(
    edge: EdgeAgent, receiving: CloudProcess, sending: CloudProcess
) -> None:
    owner = ReceivingClient(receiving.url)
    held = owner.create_address(edge.root)
    client = SendingClient(sending.url, grant(edge, sending, uses=2))
    key = owner.service_key()
    queued = client.submit(receiving.url, seal_address(key, held.address, b"a"), b"a", delay=60)
    sent = client.submit(receiving.url, seal_address(key, held.address, b"b"), b"b")
    wait_for(lambda: client.status(sent)["state"] == "delivered")
    assert client.status(queued)["state"] == "queued"  # its sealed blob is in the database

    secrets = [
        held.address.address_id.encode(),
        held.address.credential.encode(),
        b64url_decode(held.address.address_id),
        b64url_decode(held.address.credential),
    ]
    files = [
        p
        for p in sending.state_dir.iterdir()
        if p.name.startswith(("sending.db", "cloud.db", "server-")) and p.is_file()
    ]
    assert any(p.name == "sending.db" for p in files)
    assert any(p.name.startswith("server-") for p in files)  # the captured log
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{path.name} holds the recipient's address"
