"""The errors of the relationship layer: each has a stable ``code`` and an HTTP status.

Relationship messages come from outside (a peer, a service); every parser rejects bad
input with one of these, never with a traceback, and a rejected input changes no state.
Messages never echo key material or plaintext.
"""

from __future__ import annotations

from agent.errors import AgentError


class RelationshipError(AgentError):
    """Base class of relationship errors."""

    code = "relationship_error"
    status = 400


class UnsupportedSuiteError(RelationshipError):
    """A key or a message names a suite this agent does not implement."""

    code = "unsupported_suite"


class MalformedMessageError(RelationshipError):
    """Bytes that are not a relationship message of the expected layout."""

    code = "malformed_relationship_message"


class BadPublicKeyError(MalformedMessageError):
    """A public key from outside that no DH may use: not a point of the suite's curve,
    or one (a small-order X25519 point) whose DH output is all zeros."""

    code = "bad_relationship_public_key"


class DecryptError(RelationshipError):
    """A message did not authenticate under any key of the relationship state."""

    code = "relationship_decrypt_failed"


class DuplicateMessageError(DecryptError):
    """The message was already decrypted once: its key is gone."""

    code = "duplicate_message"


class TooManySkippedError(RelationshipError):
    """The message would skip more message keys than the documented bound allows."""

    code = "too_many_skipped_messages"


class BadStateError(RelationshipError):
    """Serialised relationship state that is not of a known version and layout."""

    code = "bad_relationship_state"


class BadPrekeyBundleError(RelationshipError):
    """A prekey bundle that is malformed, expired or not signed by its root."""

    code = "bad_prekey_bundle"


class UnknownPrekeyError(RelationshipError):
    """An initial message names a prekey this agent never published or has dropped."""

    code = "unknown_prekey"


class PrekeyConsumedError(UnknownPrekeyError):
    """A one-time prekey was already used: it serves exactly one relationship."""

    code = "prekey_consumed"


class ReplayedInitialMessageError(RelationshipError):
    """An initial message that was already accepted once."""

    code = "replayed_initial_message"
    status = 409


class PlaintextTooLargeError(RelationshipError):
    """A message larger than the largest padding bucket."""

    code = "relationship_plaintext_too_large"
    status = 413


class CannotSendYetError(RelationshipError):
    """The responder's side has no sending chain until the initiator's first message."""

    code = "relationship_cannot_send_yet"
    status = 409
