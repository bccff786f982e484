"""Routing 2.0: wrap once per routing key (last to first), unwrap hop by hop."""

from __future__ import annotations

import base64
import json

import pytest

from agent.didcomm import (
    A256GCM,
    FORWARD_TYPE,
    Attachment,
    Message,
    MessageFormatError,
    PackError,
    WrongRecipientError,
    pack_anoncrypt,
    pack_authcrypt,
    parse_forward,
    unpack,
    unwrap_forward,
    wrap_forward,
)
from agent.didcomm._encoding import b64d
from agent.didcomm.keys import agreement_kid
from janus_hsm.provider import KeyHandle

TYPE = "https://example.com/protocols/test/1.0/ping"


def test_two_mediators(soft_keys: dict[str, KeyHandle], hsm_keys: dict[str, KeyHandle]) -> None:
    sender, recipient = soft_keys["x25519-a"], hsm_keys["x25519"]
    mediator_1, mediator_2 = soft_keys["p256-a"], hsm_keys["p256"]
    sent = Message.new(TYPE, {"hello": "bob"}, from_=sender.did, to=[recipient.did])
    inner = pack_authcrypt(sent, [recipient.did], sender)
    routing_keys = [agreement_kid(mediator_1.did), agreement_kid(mediator_2.did)]
    wrapped = wrap_forward(inner, to=recipient.did, routing_keys=routing_keys, enc=A256GCM)

    # Only the first mediator can open the outer layer.
    with pytest.raises(WrongRecipientError):
        unpack(wrapped, [mediator_2, recipient])

    hop_1, unpacked_1 = unwrap_forward(wrapped, [mediator_1])
    assert unpacked_1.metadata.mode == "anoncrypt"
    assert unpacked_1.metadata.sender is None  # mediators do not learn the sender
    assert hop_1.next == routing_keys[1]
    assert hop_1.message.type == FORWARD_TYPE
    assert hop_1.message.to == (mediator_1.did,)

    hop_2, _ = unwrap_forward(hop_1.payload, [mediator_2])
    assert hop_2.next == recipient.did
    assert json.loads(hop_2.payload) == json.loads(inner)

    final = unpack(hop_2.payload, [recipient])
    assert final.message == sent
    assert final.metadata.mode == "authcrypt" and final.metadata.sender == sender.did


def test_one_routing_key_given_as_did(soft_keys: dict[str, KeyHandle]) -> None:
    recipient, mediator = soft_keys["x25519-b"], soft_keys["x25519-c"]
    inner = pack_anoncrypt(Message.new(TYPE), [recipient.did])
    wrapped = wrap_forward(inner, to=recipient.did, routing_keys=[mediator.did], expires_time=5)
    hop, unpacked = unwrap_forward(wrapped, [mediator])
    assert hop.next == recipient.did
    assert unpacked.message.expires_time == 5
    assert unpack(hop.payload, [recipient]).message.type == TYPE


def test_forward_with_base64_attachment(soft_keys: dict[str, KeyHandle]) -> None:
    recipient = soft_keys["x25519-b"]
    inner = pack_anoncrypt(Message.new(TYPE), [recipient.did])
    forward = Message.new(
        FORWARD_TYPE,
        {"next": recipient.did},
        attachments=(
            Attachment(data={"base64": base64.urlsafe_b64encode(inner.encode()).decode()}),
        ),
    )
    assert json.loads(parse_forward(forward).payload) == json.loads(inner)


@pytest.mark.parametrize(
    "forward",
    [
        Message.new(TYPE, {"next": "did:example:b"}),
        Message.new(FORWARD_TYPE, {}),
        Message.new(FORWARD_TYPE, {"next": "bob"}),
        Message.new(FORWARD_TYPE, {"next": "did:example:b"}),
        Message.new(
            FORWARD_TYPE,
            {"next": "did:example:b"},
            attachments=(Attachment(data={"links": ["https://x"]}),),
        ),
        Message.new(
            FORWARD_TYPE,
            {"next": "did:example:b"},
            attachments=(Attachment(data={"base64": "!!!"}),),
        ),
    ],
    ids=["not forward", "no next", "next not a DID", "no attachment", "links", "bad base64"],
)
def test_bad_forward_messages(forward: Message) -> None:
    with pytest.raises(MessageFormatError):
        parse_forward(forward)


def test_wrap_forward_arguments(soft_keys: dict[str, KeyHandle]) -> None:
    recipient = soft_keys["x25519-b"]
    inner = pack_anoncrypt(Message.new(TYPE), [recipient.did])
    with pytest.raises(PackError):
        wrap_forward(inner, to=recipient.did, routing_keys=[])
    with pytest.raises(PackError):
        wrap_forward(inner, to="bob", routing_keys=[recipient.did])


def test_forward_layer_is_anoncrypt_with_mediator_in_to(soft_keys: dict[str, KeyHandle]) -> None:
    recipient, mediator = soft_keys["x25519-b"], soft_keys["x25519-c"]
    inner = pack_anoncrypt(Message.new(TYPE), [recipient.did])
    wrapped = json.loads(wrap_forward(inner, to=recipient.did, routing_keys=[mediator.did]))
    header = json.loads(b64d(wrapped["protected"], "p"))
    assert header["alg"] == "ECDH-ES+A256KW" and "skid" not in header
    assert [r["header"]["kid"] for r in wrapped["recipients"]] == [agreement_kid(mediator.did)]
