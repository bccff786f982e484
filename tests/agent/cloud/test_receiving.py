"""The receiving service in a real ``janus cloud serve --receiving`` process on loopback."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from agent.relationships.delivery import (
    Address,
    AddressFormatError,
    AddressQuotaError,
    AddressRetiredError,
    DeliveryRefusedError,
    MessageTooLargeError,
    ReceivingClient,
    UnknownPickupIdError,
    UnknownServiceKeyError,
    delivery_body,
    seal_address,
)
from janus_hsm.public_keys import b64url_encode
from tests.agent.cloud.conftest import receiving_process


@pytest.fixture(scope="module")
def service(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    yield from receiving_process(
        edge,
        tmp_path_factory,
        "receiving",
        "--receiving-max-message",
        "4096",
        "--receiving-quota",
        "50",
    )


@pytest.fixture(scope="module")
def other(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    yield from receiving_process(edge, tmp_path_factory, "other")


def test_create_deliver_pickup_ack_retire(edge: EdgeAgent, service: CloudProcess) -> None:
    client = ReceivingClient(service.url)
    held = client.create_address(edge.root)
    assert held.pickup_id != held.address.address_id
    sender = ReceivingClient(service.url)  # a peer: knows the address only
    sender.deliver(held.address, b"first")
    sender.deliver(held.address, b"second")

    got = client.pickup(edge.root, held)
    assert [d.ciphertext for d in got] == [b"first", b"second"]
    assert abs(got[0].received_at - time.time()) < 60
    assert client.pickup(edge.root, held, limit=1)[0].ciphertext == b"first"  # until acked
    client.ack(edge.root, held, [got[0].id])
    assert [d.ciphertext for d in client.pickup(edge.root, held)] == [b"second"]
    client.ack(edge.root, held, [got[1].id])
    assert client.pickup(edge.root, held) == []

    client.retire_address(edge.root, held)
    with pytest.raises(AddressRetiredError) as refused:
        sender.deliver(held.address, b"too late")
    assert refused.value.status == 410


def test_the_database_keeps_no_sender_and_no_credential(
    edge: EdgeAgent, service: CloudProcess
) -> None:
    client = ReceivingClient(service.url)
    held = client.create_address(edge.root)
    client.deliver(held.address, b"x" * 100)
    db = sqlite3.connect(service.state_dir / "receiving.db")
    columns = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
    assert columns == {"delivery_id", "address_id", "ciphertext", "received_at"}
    db.close()
    data = (service.state_dir / "receiving.db").read_bytes()
    wal = service.state_dir / "receiving.db-wal"
    data += wal.read_bytes() if wal.exists() else b""
    assert b64url_decode(held.address.credential) not in data


def b64url_decode(text: str) -> bytes:
    from janus_hsm.public_keys import b64url_decode as decode

    return decode(text)


def test_wrong_credential_and_unknown_address_are_one_refusal(
    edge: EdgeAgent, service: CloudProcess
) -> None:
    client = ReceivingClient(service.url)
    held = client.create_address(edge.root)
    wrong = Address(service.url, held.address.address_id, b64url_encode(os.urandom(32)))
    unknown = Address(service.url, b64url_encode(os.urandom(16)), held.address.credential)
    for address in (wrong, unknown):
        with pytest.raises(DeliveryRefusedError) as refused:
            client.deliver(address, b"hello")
        assert refused.value.status == 403
    assert client.pickup(edge.root, held) == []


def test_quota_and_size_limit(edge: EdgeAgent, service: CloudProcess) -> None:
    client = ReceivingClient(service.url)
    held = client.create_address(edge.root, quota=3)
    for n in range(3):
        client.deliver(held.address, f"m{n}".encode())
    with pytest.raises(AddressQuotaError):
        client.deliver(held.address, b"one too many")
    client.ack(edge.root, held, [client.pickup(edge.root, held, limit=1)[0].id])
    client.deliver(held.address, b"room again")  # acknowledged: room for one more

    client.deliver(client.create_address(edge.root).address, b"y" * 4096)  # the limit itself
    fresh = client.create_address(edge.root)
    with pytest.raises(MessageTooLargeError) as too_large:
        client.deliver(fresh.address, b"y" * 4097)
    assert too_large.value.status == 413
    assert client.pickup(edge.root, fresh) == []
    with pytest.raises(Exception) as over:
        client.create_address(edge.root, quota=10**6)
    assert getattr(over.value, "status", None) == 400


def test_sealed_for_another_service_is_refused(
    edge: EdgeAgent, service: CloudProcess, other: CloudProcess
) -> None:
    held = ReceivingClient(service.url).create_address(edge.root)
    other_key = ReceivingClient(other.url).service_key()
    sealed = seal_address(other_key, held.address, b"hello")
    answer = httpx.post(
        f"{service.url}/v1/receiving/deliveries", json=delivery_body(sealed, b"hello"), timeout=10
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == UnknownServiceKeyError.code


def test_sealed_address_is_bound_to_its_ciphertext(edge: EdgeAgent, service: CloudProcess) -> None:
    client = ReceivingClient(service.url)
    held = client.create_address(edge.root)
    sealed = seal_address(client.service_key(), held.address, b"original")
    answer = httpx.post(
        f"{service.url}/v1/receiving/deliveries", json=delivery_body(sealed, b"swapped"), timeout=10
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "sealed_address_invalid"
    assert client.pickup(edge.root, held) == []


def test_owner_requests_need_the_owner(
    edge: EdgeAgent, service: CloudProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from janus_hsm.algorithms import Algorithm
    from janus_hsm.backends.software import SoftwareProvider

    stranger = SoftwareProvider.open(
        f"soft:dir={tmp_path_factory.mktemp('stranger')}",
        passphrase_source=lambda: "stranger passphrase",
        allow_extractable=True,
    ).generate("soft:object=stranger", Algorithm.EdDSA)
    client = ReceivingClient(service.url)
    with pytest.raises(Exception) as refused:
        client.create_address(stranger)
    assert getattr(refused.value, "status", None) == 403
    held = client.create_address(edge.root)
    with pytest.raises(Exception) as refused_pickup:
        client.pickup(stranger, held)
    assert getattr(refused_pickup.value, "status", None) == 403
    bogus = type(held)(held.address, b64url_encode(os.urandom(16)))
    with pytest.raises(UnknownPickupIdError):
        client.pickup(edge.root, bogus)
    # The address id is not a pickup id: knowing an address does not let one collect.
    as_pickup = type(held)(held.address, held.address.address_id)
    with pytest.raises(UnknownPickupIdError):
        client.pickup(edge.root, as_pickup)


def test_key_document_is_signed_by_the_agent(service: CloudProcess) -> None:
    did = httpx.get(f"{service.url}/v1/did", timeout=10).json()["did"]
    key = ReceivingClient(service.url, did=did).service_key()
    assert key.service_did == did
    with pytest.raises(Exception) as pinned:
        ReceivingClient(
            service.url, did="did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
        ).service_key()
    assert getattr(pinned.value, "code", None) == "service_key_invalid"


def test_the_verified_key_document_names_the_service(service: CloudProcess) -> None:
    """A client learns the service's did from its signed key document, not only from an
    owner-signed request: later documents are then pinned to it."""
    did = httpx.get(f"{service.url}/v1/did", timeout=10).json()["did"]
    client = ReceivingClient(service.url)
    assert client.did is None
    keys = client.service_keys()
    assert client.did == did == keys[0].service_did


def test_key_rotation_keeps_the_previous_key_for_the_overlap(
    edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory
) -> None:
    process = CloudProcess(
        tmp_path_factory.mktemp("rotating"),
        owner=edge.did,
        extra_args=["--receiving", "--receiving-key-rotation", "2", "--receiving-key-overlap", "3"],
    )
    try:
        client = ReceivingClient(process.url)
        held = client.create_address(edge.root)
        first = client.service_key()
        sealed_early = seal_address(first, held.address, b"sealed before the rotation")
        time.sleep(max(0.0, first.use_until - time.time()) + 0.2)
        second = client.service_key()
        assert second.kid != first.kid
        assert {k.kid for k in client.service_keys()} >= {first.kid, second.kid}
        # In the overlap: an address sealed to the old key still opens.
        answer = httpx.post(
            f"{process.url}/v1/receiving/deliveries",
            json=delivery_body(sealed_early, b"sealed before the rotation"),
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        client.deliver(held.address, b"sealed to the new key")
        # After the overlap: the old key is gone.
        time.sleep(max(0.0, first.accept_until - time.time()) + 0.2)
        late = seal_address(first, held.address, b"late")
        answer = httpx.post(
            f"{process.url}/v1/receiving/deliveries", json=delivery_body(late, b"late"), timeout=10
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == UnknownServiceKeyError.code
        got = [d.ciphertext for d in client.pickup(edge.root, held)]
        assert got == [b"sealed before the rotation", b"sealed to the new key"]
    finally:
        process.stop()


def test_address_parsing_is_strict(service: CloudProcess) -> None:
    credential = b64url_encode(os.urandom(32))
    good = {
        "service": service.url,
        "address_id": b64url_encode(os.urandom(16)),
        "credential": credential,
    }
    assert Address.from_dict(good).to_dict() == good
    bad: object
    for bad in (
        {**good, "extra": 1},
        {**good, "service": "ftp://example.com"},
        {**good, "service": "https://user:pw@example.com"},
        {**good, "address_id": good["address_id"][:-1]},
        {**good, "credential": credential[:-1] + "_"},
        {**good, "credential": 5},
        [],
    ):
        with pytest.raises(AddressFormatError):
            Address.from_dict(bad)
    assert credential not in repr(Address.from_dict(good))


def test_without_owner_the_services_do_not_start(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.raises(RuntimeError, match="--owner"):
        CloudProcess(tmp_path_factory.mktemp("ownerless"), owner=None, extra_args=["--receiving"])
