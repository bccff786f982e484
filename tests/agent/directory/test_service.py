"""The directory service in real ``janus dir serve`` processes: publish, claim, attest,
and the refusals a client and a receiving service make."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.directory.client import DirectoryClient, verify_attestation, verify_claim
from agent.directory.contact import (
    create_contact_address,
    deliver_first_contact,
    present_contact,
)
from agent.directory.errors import (
    AttestationError,
    ContactError,
    ContactReplayedError,
    NameTakenError,
    PackageError,
    RequestRefusedError,
    TreeHeadError,
)
from agent.directory.keypackage import OneTimePrekey, sign_package
from agent.edge.agent import EdgeAgent
from agent.relationships import x3dh
from agent.relationships.delivery import ReceivingClient, delivery_body, seal_address
from agent.relationships.prekeys import PrekeyStore, sign_binding
from agent.relationships.suite import Suite
from hardware.softhsm import SoftHSMToken
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from tests.agent.directory.dirprocess import (
    DirectoryProcess,
    directory_key,
    intro_address,
    software_keys,
)

NAME = "alice@example.org"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dir-service")


@pytest.fixture(scope="module")
def directory(softhsm_token: SoftHSMToken, tmp: Path) -> Iterator[DirectoryProcess]:
    process = DirectoryProcess(tmp / "dir", directory_key(softhsm_token.uri, "dir-service-a"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def other_directory(softhsm_token: SoftHSMToken, tmp: Path) -> Iterator[DirectoryProcess]:
    process = DirectoryProcess(tmp / "dir2", directory_key(softhsm_token.uri, "dir-service-b"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def owner(softhsm_token: SoftHSMToken, tmp: Path) -> EdgeAgent:
    agent, _ = EdgeAgent.init(tmp / "owner", softhsm_token.uri(), name="dir-owner")
    return agent


@pytest.fixture(scope="module")
def receiving(owner: EdgeAgent, tmp: Path) -> Iterator[CloudProcess]:
    process = CloudProcess(tmp / "receiving", owner=owner.did, extra_args=["--receiving"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def claimers(tmp: Path) -> list[KeyHandle]:
    return software_keys(tmp / "claimers", 4)


@pytest.fixture(scope="module")
def published(
    directory: DirectoryProcess, owner: EdgeAgent, receiving: CloudProcess, tmp: Path
) -> dict[str, Any]:
    with DirectoryClient(directory.url) as client:
        held = create_contact_address(receiving.url, owner.root, client.did)
        store = PrekeyStore(tmp / "owner-prekeys", Suite.X25519)
        answer = client.publish(
            owner.root, owner.agreement, store, name=NAME, intro=held.address, prekeys=3
        )
    return {"answer": answer, "held": held, "store": store}


def test_claim_verifies_and_starts_x3dh(
    directory: DirectoryProcess,
    published: dict[str, Any],
    claimers: list[KeyHandle],
    owner: EdgeAgent,
    tmp: Path,
) -> None:
    with DirectoryClient(directory.url) as client:
        claim = client.claim(claimers[0], NAME)
    assert claim.package.root_did == owner.did and not claim.last_resort
    bundle = claim.bundle()
    assert bundle.binding_form == "directory-batch"
    assert bundle.one_time_prekeys[0][0] == claim.prekey.opk_id  # type: ignore[union-attr]
    # The claimed package is what x3dh.initiate takes; the owner's store answers it.
    me = software_keys(tmp / "initiator", 1)[0]
    my_agreement = software_keys(tmp / "initiator-x", 1, Algorithm.X25519)[0]
    keys, header = x3dh.initiate(my_agreement, me.did, sign_binding(me, my_agreement), bundle)
    store: PrekeyStore = published["store"]
    theirs, peer = x3dh.respond(
        owner.agreement, store, header, replay_guard=x3dh.FileReplayGuard(tmp / "guard")
    )
    assert theirs.shared_secret == keys.shared_secret and peer.root_did == me.did
    assert not store.has_one_time(claim.prekey.opk_id)  # type: ignore[union-attr]


def test_a_package_not_signed_by_the_names_root_is_refused(
    directory: DirectoryProcess, published: dict[str, Any], claimers: list[KeyHandle], tmp: Path
) -> None:
    with DirectoryClient(directory.url) as client:
        answer = client.claim_answer(claimers[1], NAME)
        did = client.did
    mallory = software_keys(tmp / "mallory", 1)[0]
    mallory_x = software_keys(tmp / "mallory-x", 1, Algorithm.X25519)[0]
    store = PrekeyStore(tmp / "mallory-prekeys", Suite.X25519)
    spk, pq, _, _ = store.generate(one_time=0)
    forged = sign_package(
        mallory, mallory_x, name=NAME, directory=did, signed_prekey=spk, pq_prekey=pq,
        one_time=[], batch_id="b" * 22, intro=published["held"].address,
    )  # fmt: skip
    with pytest.raises(PackageError, match="root the log binds"):
        verify_claim(
            {**answer, "package": forged, "last_resort": True, "one_time": None},
            name=NAME, directory=did, seen=None, fetch_consistency=None,
        )  # fmt: skip
    # The genuine answer verifies; a one-time prekey from outside the signed batch does not.
    verify_claim(answer, name=NAME, directory=did, seen=None, fetch_consistency=None)
    if answer["one_time"] is not None:
        _, _, opks, pqopks = store.generate(one_time=1)
        alien = OneTimePrekey(opks[0][0], opks[0][1], pqopks[0][0], pqopks[0][1])
        tampered = {**answer["one_time"], "prekey": alien.to_dict()}
        with pytest.raises(PackageError, match="not in the signed batch"):
            verify_claim(
                {**answer, "one_time": tampered},
                name=NAME, directory=did, seen=None, fetch_consistency=None,
            )  # fmt: skip


def test_stale_and_future_tree_heads_are_refused(
    directory: DirectoryProcess, published: dict[str, Any], claimers: list[KeyHandle]
) -> None:
    with DirectoryClient(directory.url) as client:
        answer = client.claim_answer(claimers[2], NAME)
        did = client.did
    now = int(time.time())
    for moment, why in ((now + 3600, "stale"), (now - 3600, "future")):
        with pytest.raises(TreeHeadError, match=why):
            verify_claim(
                answer, name=NAME, directory=did, seen=None, fetch_consistency=None, now=moment
            )
    with pytest.raises(TreeHeadError, match="another key"):
        verify_claim(
            answer, name=NAME, directory=claimers[0].did, seen=None, fetch_consistency=None
        )


def test_contact_capabilities_at_the_intro_address(
    directory: DirectoryProcess,
    other_directory: DirectoryProcess,
    published: dict[str, Any],
    owner: EdgeAgent,
    claimers: list[KeyHandle],
    tmp: Path,
) -> None:
    held = published["held"]
    # The other directory serves the same name (an owner may publish at several), but
    # its capabilities are not the ones this intro address requires.
    with DirectoryClient(other_directory.url) as other:
        other.publish(
            owner.root, owner.agreement, PrekeyStore(tmp / "other-prekeys", Suite.X25519),
            name=NAME, intro=held.address, prekeys=1,
        )  # fmt: skip
        foreign = other.claim(claimers[3], NAME)
    with pytest.raises(ContactError, match="contact capability does not hold"):
        deliver_first_contact(claimers[3], foreign.contact, held.address, b"hello from afar")
    # Without a capability the intro address takes nothing.
    service = ReceivingClient(receiving_url := held.address.service)
    with pytest.raises(Exception) as bare:
        service.deliver(held.address, b"no capability")
    assert getattr(bare.value, "code", None) == "contact_refused"

    with DirectoryClient(directory.url) as client:
        claim = client.claim(claimers[3], NAME)
    first = b"first message"
    key = service.service_key()
    body: dict[str, Any] = dict(delivery_body(seal_address(key, held.address, first), first))
    body["contact"] = present_contact(
        claimers[3], claim.contact, address_id=held.address.address_id, ciphertext=first,
        service_did=key.service_did,
    )  # fmt: skip
    ok = httpx.post(f"{receiving_url}/v1/receiving/deliveries", json=body, timeout=10)
    assert ok.status_code == 202, ok.text
    replay = httpx.post(f"{receiving_url}/v1/receiving/deliveries", json=body, timeout=10)
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "contact_replayed"
    # A fresh invocation of the same capability: its one use is spent.
    with pytest.raises(ContactError, match="used up"):
        deliver_first_contact(claimers[3], claim.contact, held.address, b"second")
    # The capability is bound to its ciphertext: another message under it is refused.
    with DirectoryClient(directory.url) as client:
        claim2 = client.claim(claimers[3], NAME)
    body2: dict[str, Any] = dict(delivery_body(seal_address(key, held.address, b"other"), b"other"))
    body2["contact"] = present_contact(
        claimers[3], claim2.contact, address_id=held.address.address_id, ciphertext=first,
        service_did=key.service_did,
    )  # fmt: skip
    bad = httpx.post(f"{receiving_url}/v1/receiving/deliveries", json=body2, timeout=10)
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "contact_refused"
    held_now = service.pickup(owner.root, held)
    assert [d.ciphertext for d in held_now] == [first]
    assert ContactReplayedError.status == 409


def test_owner_requests_are_checked(
    directory: DirectoryProcess, published: dict[str, Any], owner: EdgeAgent, tmp: Path
) -> None:
    intruder = software_keys(tmp / "intruder", 1)[0]
    intruder_x = software_keys(tmp / "intruder-x", 1, Algorithm.X25519)[0]
    with DirectoryClient(directory.url) as client:
        with pytest.raises(NameTakenError):
            client.publish(
                intruder, intruder_x, PrekeyStore(tmp / "intruder-prekeys", Suite.X25519),
                name=NAME, intro=intro_address(), prekeys=1,
            )  # fmt: skip
        with pytest.raises(RequestRefusedError):
            client.status(intruder, NAME)
        with pytest.raises(RequestRefusedError):
            client.withdraw(intruder, NAME)
        body = {
            "request": client._signed(owner.root, "janus-dir-request+jws", op="status", name=NAME)
        }
        first = httpx.post(f"{directory.url}/v1/dir/status", json=body, timeout=10)
        assert first.status_code == 200
        again = httpx.post(f"{directory.url}/v1/dir/status", json=body, timeout=10)
        assert again.status_code == 403 and "replayed" in again.json()["error"]["message"]


def test_attestation_verifies_offline_and_tampering_is_caught(
    directory: DirectoryProcess, published: dict[str, Any], owner: EdgeAgent
) -> None:
    with DirectoryClient(directory.url) as client:
        attestation = client.attest("alice")
        did = client.did
    checked = verify_attestation(attestation, directory=did)
    assert checked["root"] == owner.did and checked["name"] == NAME
    head, payload, sig = attestation.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["root"] = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AttestationError):
        verify_attestation(f"{head}.{forged}.{sig}")
    with pytest.raises(AttestationError, match="another directory"):
        verify_attestation(attestation, directory=owner.did)


def test_an_intro_address_is_picked_up_with_its_own_holder_key(
    published: dict[str, Any], receiving: CloudProcess
) -> None:
    """The token signs once to create the intro address, never to pick up from it."""
    held = published["held"]
    assert held.holder_key() is not None
    client = ReceivingClient(receiving.url)
    try:
        held_now = client.pickup(None, held)  # signed by the holder key alone
        assert all(d.ciphertext for d in held_now)
    finally:
        client.close()
