"""The errors of DIDComm messaging.

Two families, because the people who must act on them differ:

* :class:`EnvelopeError` - something *received* is wrong (malformed, tampered, not for
  us, too large, an algorithm we do not accept, a sender that does not add up).  The
  sender or an attacker caused it; the receiver can only drop the message.  Unpacking
  raises one of these and never returns part of a message.
* :class:`PackError` and :class:`KeyResolutionError` - the *caller* asked for something
  impossible (recipients on different curves, a ``from`` that is not the sender, a
  DID that names no usable key).  Fix the call.

Key-custody failures (wrong PIN, token removed) are not wrapped: they arrive as the
:class:`janus_hsm.errors.JanusHSMError` the backend raised, because what to do about
them is the same as everywhere else in Janus.

Every class has a stable ``code`` for ``--json`` output and logs; messages are for
people and may change.  They are agent errors, so each also has the HTTP ``status`` an
agent answers when a request causes one: 4xx, as a request's content caused them all.
"""

from __future__ import annotations

from agent.errors import AgentError


class DIDCommError(AgentError):
    """Base class of every DIDComm messaging error."""

    code = "didcomm_error"
    status = 400


# --- the caller's mistakes ------------------------------------------------------------


class PackError(DIDCommError, ValueError):
    """The arguments to a pack call cannot make a valid envelope."""

    code = "pack_error"


class KeyResolutionError(DIDCommError, ValueError):
    """A DID, DID URL or JWK given as a recipient or sender names no usable key."""

    code = "key_resolution_error"


class UnusableKeyError(DIDCommError, ValueError):
    """A local key cannot do what the envelope needs (e.g. an Ed25519 key asked for ECDH)."""

    code = "unusable_key"
    status = 422  # well-formed, but names a key that cannot do what is asked


class MessageError(DIDCommError, ValueError):
    """A plaintext message does not follow the DIDComm message structure."""

    code = "bad_message"


# --- what was received ------------------------------------------------------------------


class EnvelopeError(DIDCommError, ValueError):
    """A received envelope was refused; nothing of its content is returned."""

    code = "bad_envelope"


class MalformedEnvelopeError(EnvelopeError):
    """Not valid JSON, not a JWE/JWS in the form DIDComm uses, or a member of a wrong type."""

    code = "malformed_envelope"


class MessageFormatError(EnvelopeError, MessageError):
    """The plaintext inside an envelope is not a valid DIDComm message."""

    code = "bad_message"


class EnvelopeTooLargeError(EnvelopeError):
    """The envelope is larger than the configured limit (1 MiB unless said otherwise)."""

    code = "envelope_too_large"
    status = 413


class UnsupportedAlgorithmError(EnvelopeError):
    """``alg``, ``enc``, curve or a critical header is one this implementation refuses."""

    code = "unsupported_algorithm"


class InvalidPublicKeyError(EnvelopeError):
    """A public key in or named by the envelope is invalid (off the curve, small order…)."""

    code = "invalid_public_key"


class WrongRecipientError(EnvelopeError):
    """None of the envelope's recipients is one of the keys we were given."""

    code = "wrong_recipient"


class NotEncryptedError(EnvelopeError):
    """An envelope that must be encrypted to one of our keys came as plaintext or signed only.

    ``unpack`` accepts those (other implementations send them); a receiver that needs
    confidentiality, such as a mediator whose forwards are encrypted to its routing key,
    refuses them with this.
    """

    code = "not_encrypted"


class DecryptionError(EnvelopeError):
    """Authentication failed: the envelope was altered, or was not encrypted to our key."""

    code = "decryption_failed"


class SignatureError(EnvelopeError):
    """A JWS signature does not verify with the key its ``kid`` names."""

    code = "bad_envelope_signature"


class UnknownSenderError(EnvelopeError):
    """The sender's key id (``skid`` or a JWS ``kid``) cannot be resolved to a public key."""

    code = "unknown_sender"


class ConsistencyError(EnvelopeError):
    """The layers disagree: ``from`` is not the sender's DID, ``to`` omits the recipient, …"""

    code = "inconsistent_envelope"
