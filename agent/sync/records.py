"""The sync records of the wire (after Briar's BSP) and the batch that carries them.

Four records, each naming its conversation:

- ``ack``: ids the sender now holds (stop offering or sending them to it);
- ``offer``: ids the sender holds that the receiver may lack;
- ``request``: ids the sender wants (from an offer, or parents it lacks);
- ``message``: one encoded message (:mod:`agent.sync.messages`).

A *batch* is what one transport message carries: a version byte, then records, each
prefixed with its length.  Parsing is strict and all-or-nothing: a batch is parsed
(every message's id computed and signature checked) before any of it is applied, so a
bad batch changes no state.  Id lists are sorted and free of repeats, so every record
has exactly one encoding.
"""

from __future__ import annotations

import enum
import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from agent.sync.errors import MalformedRecordError, SyncError, UnsupportedVersionError
from agent.sync.ids import ID_BYTES, id_bytes, id_text
from agent.sync.messages import MAX_MESSAGE_BYTES, Message, parse_message

BATCH_VERSION: Final = 1
MAX_IDS: Final = 256  # ids per ack / offer / request record (8 KiB of ids)
RECORD_HEAD: Final = 1 + ID_BYTES  # type, conversation
MAX_RECORD_BYTES: Final = RECORD_HEAD + MAX_MESSAGE_BYTES
MAX_BATCH_BYTES: Final = 64 * 1024  # the largest batch a receiver parses
_LENGTH = struct.Struct(">I")


class RecordType(enum.IntEnum):
    ACK = 0
    MESSAGE = 1
    OFFER = 2
    REQUEST = 3


@dataclass(frozen=True, slots=True)
class IdsRecord:
    """An ack, offer or request: a kind, a conversation and 1 to MAX_IDS distinct ids."""

    kind: RecordType
    conversation: str
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MessageRecord:
    message: Message

    @property
    def conversation(self) -> str:
        return self.message.conversation


Record = IdsRecord | MessageRecord


def ids_records(kind: RecordType, conversation: str, ids: Iterable[str]) -> list[IdsRecord]:
    """``ids`` as records of ``kind``, at most MAX_IDS each, in canonical (sorted) order."""
    ordered = sorted(set(ids), key=lambda i: id_bytes(i, "an id", SyncError))
    return [
        IdsRecord(kind, conversation, tuple(ordered[i : i + MAX_IDS]))
        for i in range(0, len(ordered), MAX_IDS)
    ]


def encode_record(record: Record) -> bytes:
    if isinstance(record, MessageRecord):
        head = bytes([RecordType.MESSAGE]) + id_bytes(record.conversation, "", SyncError)
        return head + record.message.encoded
    if record.kind is RecordType.MESSAGE or not 1 <= len(record.ids) <= MAX_IDS:
        raise MalformedRecordError(f"an id record holds 1 to {MAX_IDS} ids")
    raw = [id_bytes(i, "an id", MalformedRecordError) for i in record.ids]
    if any(a >= b for a, b in itertools.pairwise(raw)):
        raise MalformedRecordError("a record's ids are distinct and in ascending byte order")
    conv = id_bytes(record.conversation, "the conversation", MalformedRecordError)
    return bytes([record.kind]) + conv + b"".join(raw)


def record_size(record: Record) -> int:
    """The bytes ``record`` takes in a batch (its length prefix included)."""
    if isinstance(record, MessageRecord):
        body = len(record.message.encoded)
    else:
        body = ID_BYTES * len(record.ids)
    return _LENGTH.size + RECORD_HEAD + body


def parse_record(data: bytes) -> Record:
    """One record from outside; a message inside is verified (signature, bounds)."""
    if len(data) < RECORD_HEAD:
        raise MalformedRecordError("a record is shorter than its header")
    if len(data) > MAX_RECORD_BYTES:
        raise MalformedRecordError(f"a record is at most {MAX_RECORD_BYTES} bytes")
    try:
        kind = RecordType(data[0])
    except ValueError:
        raise MalformedRecordError(f"unknown record type {data[0]}") from None
    conversation = id_text(data[1:RECORD_HEAD])
    payload = data[RECORD_HEAD:]
    if kind is RecordType.MESSAGE:
        message = parse_message(payload)
        if message.conversation != conversation:
            raise MalformedRecordError("a message record names another conversation")
        return MessageRecord(message)
    if not payload or len(payload) % ID_BYTES or len(payload) > MAX_IDS * ID_BYTES:
        raise MalformedRecordError(f"an id record holds 1 to {MAX_IDS} ids of {ID_BYTES} bytes")
    raw = [payload[i : i + ID_BYTES] for i in range(0, len(payload), ID_BYTES)]
    if any(a >= b for a, b in itertools.pairwise(raw)):
        raise MalformedRecordError("a record's ids are distinct and in ascending byte order")
    return IdsRecord(kind, conversation, tuple(id_text(r) for r in raw))


def pack_batch(records: Sequence[Record]) -> bytes:
    parts = [bytes([BATCH_VERSION])]
    for record in records:
        encoded = encode_record(record)
        parts.append(_LENGTH.pack(len(encoded)) + encoded)
    out = b"".join(parts)
    if len(out) > MAX_BATCH_BYTES:
        raise MalformedRecordError(f"a batch is at most {MAX_BATCH_BYTES} bytes")
    return out


def parse_batch(data: object) -> list[Record]:
    """Every record of a batch, or a typed error (and then nothing of it is used)."""
    if not isinstance(data, bytes):
        raise MalformedRecordError("a batch is bytes")
    if not data:
        raise MalformedRecordError("a batch is empty")
    if len(data) > MAX_BATCH_BYTES:
        raise MalformedRecordError(f"a batch is at most {MAX_BATCH_BYTES} bytes")
    if data[0] != BATCH_VERSION:
        raise UnsupportedVersionError(f"sync batch version {data[0]} is not supported")
    records: list[Record] = []
    pos = 1
    while pos < len(data):
        if pos + _LENGTH.size > len(data):
            raise MalformedRecordError("a batch ends inside a record's length")
        (length,) = _LENGTH.unpack_from(data, pos)
        pos += _LENGTH.size
        if length > len(data) - pos:
            raise MalformedRecordError("a batch ends inside a record")
        records.append(parse_record(data[pos : pos + length]))
        pos += length
    return records
