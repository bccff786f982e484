"""Holder keys at the receiving service: the root signs an address's creation only.

A real ``janus cloud serve --receiving`` process on loopback, the owner's root on a
SoftHSM token, and the software holder keys the edge makes per address.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from agent.protocol import sign_request
from agent.relationships.delivery import (
    RECEIVING_TYP,
    AddressFormatError,
    AddressRetiredError,
    HeldAddress,
    HolderKey,
    ReceivingClient,
    ServiceError,
)
from janus_hsm import b64url
from janus_hsm.public_keys import b64url_encode, to_did_key
from tests.agent.cloud.conftest import receiving_process


@pytest.fixture(scope="module")
def service(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    yield from receiving_process(edge, tmp_path_factory, "receiving")


def _status(call: object) -> int | None:
    with pytest.raises(ServiceError) as refused:
        assert callable(call)
        call()
    return refused.value.status


def test_pickup_ack_retire_are_signed_by_the_holder_key(
    edge: EdgeAgent, service: CloudProcess
) -> None:
    client = ReceivingClient(service.url)
    held = client.create_address(edge.root)
    assert held.holder is not None and held.holder not in repr(held)
    assert HeldAddress.from_dict(held.to_dict()) == held  # kept with the address
    client.deliver(held.address, b"one")
    client.deliver(held.address, b"two")
    got = client.pickup(None, held)  # None: the address's own holder key signs
    assert [d.ciphertext for d in got] == [b"one", b"two"]
    client.ack(None, held, [got[0].id])
    assert [d.ciphertext for d in client.pickup(None, held)] == [b"two"]
    # The owner's root still speaks for every address of its own.
    assert [d.ciphertext for d in client.pickup(edge.root, held)] == [b"two"]
    client.retire_address(None, held)
    with pytest.raises(AddressRetiredError):
        client.deliver(held.address, b"three")


def test_a_holder_key_speaks_for_its_own_address_only(
    edge: EdgeAgent, service: CloudProcess
) -> None:
    client = ReceivingClient(service.url)
    mine, theirs = client.create_address(edge.root), client.create_address(edge.root)
    client.deliver(theirs.address, b"not yours")
    key = mine.holder_key()
    assert key is not None
    assert _status(lambda: client.pickup(key, theirs)) == 403
    assert _status(lambda: client.ack(key, theirs, ["x"])) == 403
    assert _status(lambda: client.retire_address(key, theirs)) == 403
    # An unknown pickup id is the same refusal for a holder key: no probing.
    bogus = HeldAddress(mine.address, b64url_encode(b"\x00" * 16), mine.holder)
    assert _status(lambda: client.pickup(None, bogus)) == 403
    # A holder key cannot make addresses: creation stays with the owner.
    assert _status(lambda: client.create_address(key)) == 403
    # Nothing was taken from the other address.
    assert [d.ciphertext for d in client.pickup(None, theirs)] == [b"not yours"]
    client.deliver(theirs.address, b"still live")  # and it was not retired


def test_a_holder_signed_request_is_not_replayed(edge: EdgeAgent, service: CloudProcess) -> None:
    client = ReceivingClient(service.url)
    held = client.create_address(edge.root)
    key = held.holder_key()
    assert key is not None
    did = httpx.get(f"{service.url}/v1/did", timeout=10).json()["did"]
    body = {
        "request": sign_request(
            key,
            typ=RECEIVING_TYP,
            audience=did,
            now=int(time.time()),
            op="pickup",
            pickup_id=held.pickup_id,
        )
    }
    first = httpx.post(f"{service.url}/v1/receiving/pickup", json=body, timeout=10)
    again = httpx.post(f"{service.url}/v1/receiving/pickup", json=body, timeout=10)
    assert first.status_code == 200
    assert again.status_code == 403 and "replayed" in again.json()["error"]["message"]
    # A pickup request is not an ack request, even from the right key.
    body["request"] = sign_request(
        key, typ=RECEIVING_TYP, audience=did, now=int(time.time()), op="pickup",
        pickup_id=held.pickup_id,
    )  # fmt: skip
    wrong_route = httpx.post(f"{service.url}/v1/receiving/ack", json=body, timeout=10)
    assert wrong_route.status_code == 403


@pytest.mark.parametrize(
    "holder",
    [
        "not a did",
        42,
        "did:key:zNotBase58!",
        # an X25519 did:key (agreement only, cannot sign)
        to_did_key(x25519.X25519PrivateKey.generate().public_key()),
    ],
    ids=["not-a-did", "not-a-string", "bad-base58", "x25519-did-key"],  # fixed: the key is random
)
def test_a_bad_holder_key_is_refused_at_creation(
    edge: EdgeAgent, service: CloudProcess, holder: object
) -> None:
    did = httpx.get(f"{service.url}/v1/did", timeout=10).json()["did"]
    request = sign_request(
        edge.root, typ=RECEIVING_TYP, audience=did, now=int(time.time()), op="create",
        holder=holder,
    )  # fmt: skip
    answer = httpx.post(
        f"{service.url}/v1/receiving/addresses", json={"request": request}, timeout=10
    )
    assert answer.status_code == 400, answer.text
    assert "error" in answer.json()


def test_an_address_made_without_a_holder_key_needs_the_owner(
    edge: EdgeAgent, service: CloudProcess
) -> None:
    """An address of an older edge (or a directory's contact request): no holder key,
    so only the owner collects from it."""
    did = httpx.get(f"{service.url}/v1/did", timeout=10).json()["did"]
    request = sign_request(
        edge.root, typ=RECEIVING_TYP, audience=did, now=int(time.time()), op="create"
    )
    answer = httpx.post(
        f"{service.url}/v1/receiving/addresses", json={"request": request}, timeout=10
    ).json()
    assert answer["holder"] is None
    client = ReceivingClient(service.url)
    held = HeldAddress.from_dict(
        {
            "address": {
                "service": service.url,
                "address_id": answer["address_id"],
                "credential": answer["credential"],
            },
            "pickup_id": answer["pickup_id"],
        }
    )
    with pytest.raises(AddressFormatError):
        client.pickup(None, held)
    stranger = HolderKey.generate()
    assert _status(lambda: client.pickup(stranger, held)) == 403
    client.deliver(held.address, b"old style")
    assert [d.ciphertext for d in client.pickup(edge.root, held)] == [b"old style"]


def test_a_held_address_is_strict_about_its_holder_key() -> None:
    base = {
        "address": {
            "service": "http://127.0.0.1:1",
            "address_id": b64url_encode(bytes(16)),
            "credential": b64url_encode(bytes(32)),
        },
        "pickup_id": b64url_encode(bytes(16)),
    }
    for bad in (5, "", "!!", b64url.encode(bytes(31))):
        with pytest.raises(AddressFormatError):
            HeldAddress.from_dict({**base, "holder": bad})
    with pytest.raises(AddressFormatError):
        HeldAddress.from_dict({**base, "other": 1})
