"""DIDComm Messaging v2 envelopes with the private keys left where they live.

Plaintext, signed (JWS JSON), anoncrypt (ECDH-ES+A256KW) and authcrypt (ECDH-1PU+A256KW)
messages, and Routing 2.0 ``forward`` wrapping, written against the DIF DIDComm
Messaging spec and checked against its published test vectors.  Every ECDH with a
static key - the recipient's when unpacking, the sender's in authcrypt - is one call to
:meth:`janus_hsm.provider.KeyHandle.exchange`, so the key can be in SoftHSM, on a
YubiKey or in a software keystore.  Why it is hand-written: no maintained Python
DIDComm or JOSE library can do ECDH with a key it cannot read (see :mod:`.jwa`).

See docs/messages.md for the API, the formats and the refusals.
"""

from __future__ import annotations

from agent.didcomm.errors import (
    ConsistencyError,
    DecryptionError,
    DIDCommError,
    EnvelopeError,
    EnvelopeTooLargeError,
    InvalidPublicKeyError,
    KeyResolutionError,
    MalformedEnvelopeError,
    MessageError,
    MessageFormatError,
    NotEncryptedError,
    PackError,
    SignatureError,
    UnknownSenderError,
    UnsupportedAlgorithmError,
    UnusableKeyError,
    WrongRecipientError,
)
from agent.didcomm.jwa import A256CBC_HS512, A256GCM, CONTENT_ALGORITHMS, XC20P
from agent.didcomm.keys import (
    AgreementKey,
    NamedKey,
    Recipient,
    SenderResolver,
    jwk_resolver,
    resolve_recipient,
)
from agent.didcomm.message import Attachment, Message
from agent.didcomm.pack import pack_anoncrypt, pack_authcrypt, pack_plaintext, pack_signed
from agent.didcomm.routing import FORWARD_TYPE, Forward, parse_forward, unwrap_forward, wrap_forward
from agent.didcomm.unpack import MAX_ENVELOPE, Layer, Metadata, Unpacked, unpack

__all__ = [
    "A256CBC_HS512",
    "A256GCM",
    "CONTENT_ALGORITHMS",
    "FORWARD_TYPE",
    "MAX_ENVELOPE",
    "XC20P",
    "AgreementKey",
    "Attachment",
    "ConsistencyError",
    "DIDCommError",
    "DecryptionError",
    "EnvelopeError",
    "EnvelopeTooLargeError",
    "Forward",
    "InvalidPublicKeyError",
    "KeyResolutionError",
    "Layer",
    "MalformedEnvelopeError",
    "Message",
    "MessageError",
    "MessageFormatError",
    "Metadata",
    "NamedKey",
    "NotEncryptedError",
    "PackError",
    "Recipient",
    "SenderResolver",
    "SignatureError",
    "UnknownSenderError",
    "Unpacked",
    "UnsupportedAlgorithmError",
    "UnusableKeyError",
    "WrongRecipientError",
    "jwk_resolver",
    "pack_anoncrypt",
    "pack_authcrypt",
    "pack_plaintext",
    "pack_signed",
    "parse_forward",
    "resolve_recipient",
    "unpack",
    "unwrap_forward",
    "wrap_forward",
]
