"""Which mailbox grant holds a forwarded message: ended grants never hide a valid one."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cloud.inbound import receive_forward
from agent.cloud.service import CloudAgent, CloudConfig
from agent.didcomm import (
    FORWARD_TYPE,
    Attachment,
    Message,
    NotEncryptedError,
    pack_anoncrypt,
    pack_plaintext,
    pack_signed,
    wrap_forward,
)
from agent.errors import NotFoundError, NoUsableGrantError
from agent.protocol import KEYREQ_TYP, sign_request
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.errors import CaveatFailedError
from policies.issue import grant

MAILBOX = Ability("janus:mailbox", "msg/receive")


@pytest.fixture(scope="module")
def owner(pkcs11_provider: Pkcs11Provider) -> KeyHandle:
    uri = "pkcs11:object=mailbox-owner"
    try:
        return pkcs11_provider.find(uri)
    except KeyNotFoundError:  # first use in this session
        return pkcs11_provider.generate(uri, Algorithm.ES256)


@pytest.fixture
def cloud(tmp_path: Path, owner: KeyHandle) -> Iterator[CloudAgent]:
    agent = CloudAgent(
        CloudConfig(state_dir=tmp_path / "cloud", passphrase_source=lambda: "pass", owner=owner.did)
    )
    yield agent
    agent.close()


def mailbox_grant(
    cloud: CloudAgent, owner: KeyHandle, *, ttl: int = 600, ability: Ability = MAILBOX
) -> str:
    now = int(time.time())
    record = cloud.create_grant(sign_request(owner, typ=KEYREQ_TYP, audience=cloud.did, now=now))
    bundle = grant(
        owner, audience=record.did, abilities=[ability], ttl_seconds=ttl, uses=10, now=now
    )
    cloud.install(record.grant_id, bundle.to_json())
    return record.grant_id


def forward_to(cloud: CloudAgent, owner: KeyHandle) -> bytes:
    message = Message(
        id=str(uuid.uuid4()),
        type="https://janus.dev/messages/1.0/note",
        body={"text": "hello"},
        to=(owner.did,),
    )
    envelope = wrap_forward(
        pack_anoncrypt(message, [owner.did]), to=owner.did, routing_keys=[cloud.routing_key.did]
    )
    return envelope.encode()


def test_an_expired_grant_still_listed_is_skipped(cloud: CloudAgent, owner: KeyHandle) -> None:
    """The agent restarted after its first mailbox grant expired, before its sweep ran."""
    stale = mailbox_grant(cloud, owner, ttl=1)
    fresh = mailbox_grant(cloud, owner)
    time.sleep(1.5)
    assert cloud.store.grant(stale).status == "active"  # not swept yet
    answer = receive_forward(cloud, forward_to(cloud, owner))
    assert answer["for"] == owner.did
    assert [m.msg_id for m in cloud.store.held(owner.did, 10)] == [answer["held"]]
    assert cloud.ledger.uses(cloud.store.grant(fresh).leaf_id or "") == 1


def test_a_grant_whose_key_is_gone_is_skipped(cloud: CloudAgent, owner: KeyHandle) -> None:
    """Another instance sharing the store destroyed its key: the store still lists it."""
    gone = mailbox_grant(cloud, owner)
    fresh = mailbox_grant(cloud, owner)
    cloud.keys.delete(cloud.store.grant(gone).key_uri)
    receive_forward(cloud, forward_to(cloud, owner))
    assert cloud.ledger.uses(cloud.store.grant(fresh).leaf_id or "") == 1


def test_no_usable_grant_is_a_clear_error(cloud: CloudAgent, owner: KeyHandle) -> None:
    with pytest.raises(NotFoundError, match="no mailbox grant"):
        receive_forward(cloud, forward_to(cloud, owner))
    expired = mailbox_grant(cloud, owner, ttl=1)
    gone = mailbox_grant(cloud, owner)
    cloud.keys.delete(cloud.store.grant(gone).key_uri)
    time.sleep(1.5)
    with pytest.raises(NoUsableGrantError) as ended:
        receive_forward(cloud, forward_to(cloud, owner))
    message = str(ended.value)
    assert f"{expired}: expired" in message and f"{gone}: grant_inactive" in message
    assert "the owner must grant a new one" in message
    assert ended.value.status == 410 and ended.value.code == "no_usable_grant"


def test_a_refusal_by_a_live_grant_is_reported_as_such(cloud: CloudAgent, owner: KeyHandle) -> None:
    """A caveat that refuses this message is not "no grant": the refusal is the answer."""
    narrow = Ability("janus:mailbox", "msg/receive", ({"field": "message", "eq": "x"},))
    mailbox_grant(cloud, owner, ability=narrow)
    with pytest.raises(CaveatFailedError):
        receive_forward(cloud, forward_to(cloud, owner))
    assert cloud.store.count_held(owner.did) == 0


def test_a_forward_not_encrypted_to_the_routing_key_is_refused(
    cloud: CloudAgent, owner: KeyHandle
) -> None:
    """Forwards are encrypted to the routing key: plaintext and signed-only ones are not held."""
    grant_id = mailbox_grant(cloud, owner)
    inner = pack_anoncrypt(
        Message(id=str(uuid.uuid4()), type="https://janus.dev/messages/1.0/note", body={}),
        [owner.did],
    )
    forward = Message(
        id=str(uuid.uuid4()),
        type=FORWARD_TYPE,
        to=(cloud.routing_key.did,),
        body={"next": owner.did},
        attachments=(Attachment(data={"json": json.loads(inner)}),),
    )
    signed = dataclasses.replace(forward, from_=owner.did)
    for envelope, mode in (
        (pack_plaintext(forward), "plaintext"),
        (pack_signed(signed, owner), "signed"),
    ):
        with pytest.raises(NotEncryptedError, match=f"routing key .*is {mode}") as refused:
            receive_forward(cloud, envelope.encode())
        assert refused.value.code == "not_encrypted" and refused.value.status == 400
    assert cloud.store.count_held(owner.did) == 0
    assert cloud.ledger.uses(cloud.store.grant(grant_id).leaf_id or "") == 0
