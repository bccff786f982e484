"""Sync batches inside relationship messages: the envelope, and what a batch holds.

A batch travels as the body of a relationship message of type ``SYNC_TYPE`` (so the
Double Ratchet of that relationship encrypts it, and says which peer sent it)::

    {"v": 1, "batch": BASE64URL, "keys": [CERTIFICATE, …], "groups": [{"id", "creator"}, …]}

``keys`` are the sync-key certificates of the authors of the messages in the batch (a
member may relay a message by someone it shares no relationship with); ``groups``
names each group the batch speaks of with its creator, which is how an owner added to
a group learns of it (it joins a group only when its creator sends it).

With devices, the same envelope travels over the device-pair session with one device
(a fan-out message of type ``GROUP_BATCH_TYPE``), its ``keys`` the device sync-key
certificates of the authors (agent/sync/device_sync_key.py): each binds a sync key to
a device, which its owner's device list names.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from agent.sync.group_errors import MalformedEnvelopeError
from agent.sync.ids import ID_BYTES, id_text
from agent.sync.records import MAX_BATCH_BYTES, RECORD_HEAD, RecordType
from janus_hsm import b64url

ENVELOPE_VERSION: Final = 1
#: With devices, the envelope rides one device-pair session (fanout.py) as a message of
#: this type, instead of a relationship message of ``SYNC_TYPE``.
GROUP_BATCH_TYPE: Final = "https://janus.dev/sync/1.0/group-batch"
#: Certificates and groups an envelope may name (more is refused, not truncated).
MAX_KEYS: Final = 64
MAX_GROUPS: Final = 64
_LENGTH = struct.Struct(">I")
#: version, conversation, timestamp, then the author's length and the author.
_AUTHOR_AT: Final = 1 + ID_BYTES + 8


@dataclass(frozen=True)
class Envelope:
    batch: bytes
    keys: tuple[str, ...]
    groups: tuple[tuple[str, str], ...]  # (conversation, creator root did)

    def to_body(self) -> dict[str, Any]:
        return {
            "v": ENVELOPE_VERSION,
            "batch": b64url.encode(self.batch),
            "keys": list(self.keys),
            "groups": [{"id": c, "creator": d} for c, d in self.groups],
        }


def parse_envelope(body: object) -> Envelope:
    """An envelope from a peer, strictly (the batch itself is parsed by the sync node)."""
    if not isinstance(body, dict) or set(body) != {"v", "batch", "keys", "groups"}:
        raise MalformedEnvelopeError("a sync envelope has v, batch, keys and groups")
    if body["v"] != ENVELOPE_VERSION:
        raise MalformedEnvelopeError(f"sync envelope version {body['v']!r} is not supported")
    raw, keys, groups = body["batch"], body["keys"], body["groups"]
    if not isinstance(raw, str) or len(raw) > (MAX_BATCH_BYTES * 4) // 3 + 4:
        raise MalformedEnvelopeError("a sync envelope's batch is base64url of at most 64 KiB")
    batch = b64url.decode(raw, "the batch", error=MalformedEnvelopeError)
    if not isinstance(keys, list) or len(keys) > MAX_KEYS:
        raise MalformedEnvelopeError(f"a sync envelope lists at most {MAX_KEYS} keys")
    if not all(isinstance(k, str) for k in keys):
        raise MalformedEnvelopeError("a sync envelope's keys are compact JWS strings")
    if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
        raise MalformedEnvelopeError(f"a sync envelope names at most {MAX_GROUPS} groups")
    named: list[tuple[str, str]] = []
    for group in groups:
        if not isinstance(group, dict) or set(group) != {"id", "creator"}:
            raise MalformedEnvelopeError("a group of a sync envelope has id and creator")
        conv, creator = group["id"], group["creator"]
        if not isinstance(conv, str) or not isinstance(creator, str) or len(creator) > 128:
            raise MalformedEnvelopeError("a group's id and creator are strings")
        named.append((conv, creator))
    return Envelope(batch, tuple(keys), tuple(named))


@dataclass
class BatchSummary:
    """What a batch this node made holds, read without parsing it again.

    Hand-written: :func:`parse_batch` would verify every message's signature a second
    time, and only the record types, conversations, offered ids and authors are needed.
    """

    conversations: set[str]
    authors: set[str]
    offers: list[tuple[str, str]]  # (conversation, id)
    other: bool  # anything but offers (acks, requests, messages)


def summarize(batch: bytes) -> BatchSummary:
    out = BatchSummary(set(), set(), [], False)
    pos = 1
    while pos < len(batch):
        (length,) = _LENGTH.unpack_from(batch, pos)
        record = batch[pos + 4 : pos + 4 + length]
        pos += 4 + length
        conv = id_text(record[1:RECORD_HEAD])
        out.conversations.add(conv)
        if record[0] == RecordType.OFFER:
            payload = record[RECORD_HEAD:]
            out.offers += [
                (conv, id_text(payload[i : i + ID_BYTES])) for i in range(0, len(payload), ID_BYTES)
            ]
            continue
        out.other = True
        if record[0] == RecordType.MESSAGE:
            message = record[RECORD_HEAD:]
            size = message[_AUTHOR_AT]
            out.authors.add(message[_AUTHOR_AT + 1 : _AUTHOR_AT + 1 + size].decode("ascii"))
    return out


def worth_sending(summary: BatchSummary, peer_holds: Callable[[str, str], bool]) -> bool:
    """False for a batch that only offers what the peer is known to hold (the periodic
    heads offer): sent only now and then, so idle groups cost no traffic."""
    return summary.other or not all(peer_holds(c, m) for c, m in summary.offers)
