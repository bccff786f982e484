"""The errors of the data-sync layer: each has a stable ``code`` and an HTTP status.

Sync messages and records come from peers; every parser rejects bad input with one of
these, never with a traceback, and a rejected input changes no state.  Messages name
what was wrong, never a message body.
"""

from __future__ import annotations

from agent.errors import AgentError


class SyncError(AgentError):
    """Base class of sync errors."""

    code = "sync_error"
    status = 400


class MalformedMessageError(SyncError):
    """Bytes that are not a sync message of the documented layout and bounds."""

    code = "malformed_sync_message"


class MessageTooLargeError(MalformedMessageError):
    """A message, or one of its fields, is longer than the documented limit."""

    code = "sync_message_too_large"


class UnsupportedVersionError(SyncError):
    """A message or a record of a format version this agent does not implement."""

    code = "unsupported_sync_version"


class BadSignatureError(SyncError):
    """A message whose signature does not verify under its author's did:key."""

    code = "sync_bad_signature"


class IdMismatchError(SyncError):
    """A message whose hash is not the id it was asked for or announced under."""

    code = "sync_id_mismatch"


class MalformedRecordError(SyncError):
    """Bytes that are not a sync record (or batch of records) of the documented layout."""

    code = "malformed_sync_record"


class NotAdmittedError(SyncError):
    """A valid message that the conversation's rules refuse (e.g. from a non-member).

    Raised by the ``admit`` hook the groups layer gives a :class:`SyncNode`; the
    message is not stored, and is acknowledged so the peer stops offering it.
    """

    code = "sync_not_admitted"
    status = 403


class StoreError(SyncError):
    """The sync store's database is not one this agent wrote, or holds a bad record."""

    code = "sync_store_error"
    status = 500
