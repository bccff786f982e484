"""Data sync: immutable, hash-named, signed messages with causal delivery (after Briar's BSP).

The layer's spec is docs/sync-protocol.md.  Pure logic, no network: a
:class:`SyncNode` turns what arrives from peers into deliveries and says what to send
next; the devices and groups layer carries its batches over relationships.
"""

from __future__ import annotations

from agent.sync.errors import (
    BadSignatureError,
    IdMismatchError,
    MalformedMessageError,
    MalformedRecordError,
    MessageTooLargeError,
    NotAdmittedError,
    StoreError,
    SyncError,
    UnsupportedVersionError,
)
from agent.sync.ids import new_conversation_id
from agent.sync.messages import MAX_BODY, Message, parse_message
from agent.sync.protocol import Limits, PeerSync, ReceiveResult, SyncNode
from agent.sync.records import IdsRecord, MessageRecord, RecordType, pack_batch, parse_batch
from agent.sync.store import AddResult, SyncStore

__all__ = [
    "MAX_BODY",
    "AddResult",
    "BadSignatureError",
    "IdMismatchError",
    "IdsRecord",
    "Limits",
    "MalformedMessageError",
    "MalformedRecordError",
    "Message",
    "MessageRecord",
    "MessageTooLargeError",
    "NotAdmittedError",
    "PeerSync",
    "ReceiveResult",
    "RecordType",
    "StoreError",
    "SyncError",
    "SyncNode",
    "SyncStore",
    "UnsupportedVersionError",
    "new_conversation_id",
    "pack_batch",
    "parse_batch",
    "parse_message",
]
