"""Routing Protocol 2.0: ``forward`` messages for mediators.

A sender wraps an already packed envelope once per routing key of the recipient's
DIDComm service, *from the last key to the first*, so the first mediator peels the
outermost layer; each layer is an anoncrypted ``forward`` whose ``body.next`` says
where the attached envelope goes next (the next routing key, or finally the
recipient).  Mediators see only ciphertext and ``next``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.didcomm._encoding import dumps, load_object
from agent.didcomm.errors import EnvelopeError, MessageFormatError, PackError
from agent.didcomm.keys import LocalKey, RecipientSpec, SenderResolver, is_did, is_did_url
from agent.didcomm.keys import resolve_recipient as _resolve
from agent.didcomm.message import Attachment, Message
from agent.didcomm.pack import DEFAULT_ENC, pack_anoncrypt
from agent.didcomm.unpack import MAX_ENVELOPE, Unpacked, unpack

FORWARD_TYPE = "https://didcomm.org/routing/2.0/forward"


def wrap_forward(
    envelope: str | Mapping[str, Any],
    *,
    to: str,
    routing_keys: Sequence[RecipientSpec],
    enc: str = DEFAULT_ENC,
    expires_time: int | None = None,
) -> str:
    """Wrap ``envelope`` (packed for ``to``) in one anoncrypted forward per routing key.

    ``to`` is the final recipient's DID (``next`` of the innermost forward);
    ``routing_keys`` is the service's ``routingKeys`` in the DID document's order.
    """
    if not routing_keys or isinstance(routing_keys, str):
        raise PackError("routing_keys must be a non-empty list")
    if not (is_did(to) or is_did_url(to)):
        raise PackError(f"'to' must be the recipient's DID, not {to[:60]!r}")
    current = load_object(envelope, "envelope") if isinstance(envelope, str) else dict(envelope)
    next_hop = to
    for spec in reversed(routing_keys):
        recipient = _resolve(spec)
        forward = Message(
            id=str(uuid.uuid4()),
            type=FORWARD_TYPE,
            to=(recipient.did,),
            expires_time=expires_time,
            body={"next": next_hop},
            attachments=(Attachment(data={"json": current}),),
        )
        packed = pack_anoncrypt(forward, [recipient], enc=enc)
        current = load_object(packed, "envelope")
        next_hop = spec if isinstance(spec, str) else recipient.kid
    return dumps(current)


@dataclass(frozen=True)
class Forward:
    """A forward message's instruction: send ``payloads`` (packed envelopes) to ``next``."""

    next: str
    payloads: tuple[str, ...]
    message: Message

    @property
    def payload(self) -> str:
        if len(self.payloads) != 1:
            raise MessageFormatError(f"the forward carries {len(self.payloads)} payloads")
        return self.payloads[0]


def parse_forward(message: Message) -> Forward:
    """Read a forward message; refuse anything that is not one."""
    if message.type != FORWARD_TYPE:
        raise MessageFormatError(f"not a forward message: type is {message.type!r}")
    next_hop = message.body.get("next")
    if not (is_did(next_hop) or is_did_url(next_hop)):
        raise MessageFormatError("forward 'body.next' must be a DID or DID URL")
    assert isinstance(next_hop, str)
    if not message.attachments:
        raise MessageFormatError("a forward message needs the envelope as an attachment")
    payloads = []
    for attachment in message.attachments:
        data = attachment.data
        if isinstance(data.get("json"), Mapping):
            payloads.append(dumps(data["json"]))
        elif isinstance(data.get("base64"), str):
            payloads.append(_base64_payload(data["base64"]))
        else:
            raise MessageFormatError("forward attachments must hold the envelope as json or base64")
    return Forward(next=next_hop, payloads=tuple(payloads), message=message)


def _base64_payload(text: str) -> str:
    from janus_hsm import b64url

    # Attachments may be padded (DIDComm allows it); nothing else is accepted.
    raw = b64url.decode(
        text, "forward attachment base64", error=MessageFormatError, allow_padding=True
    )
    try:
        return dumps(load_object(raw, "forwarded envelope"))
    except EnvelopeError as exc:
        raise MessageFormatError(str(exc)) from None


def unwrap_forward(
    envelope: str | bytes | Mapping[str, Any],
    mediator_keys: Sequence[LocalKey],
    *,
    sender_resolver: SenderResolver | None = None,
    max_size: int = MAX_ENVELOPE,
) -> tuple[Forward, Unpacked]:
    """What a mediator does: decrypt one layer, return where to send what it carries."""
    unpacked = unpack(envelope, mediator_keys, sender_resolver=sender_resolver, max_size=max_size)
    return parse_forward(unpacked.message), unpacked
