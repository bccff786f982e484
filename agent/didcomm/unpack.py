"""Unpacking: any DIDComm envelope → the plaintext message and what protected it.

Layers are peeled from the outside in and must come in the order the spec allows:
anoncrypt, then authcrypt, then signed, then plaintext - each at most once, any of them
absent (anoncrypt(authcrypt(sign(m))) is accepted because the spec's own test vectors
use it).  The result is returned only when every layer authenticated and every
consistency rule held; otherwise an :class:`~agent.didcomm.errors.EnvelopeError`
subclass is raised and nothing of the content escapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.didcomm import jwe, jws
from agent.didcomm._encoding import load_object
from agent.didcomm.errors import (
    ConsistencyError,
    EnvelopeTooLargeError,
    MalformedEnvelopeError,
    MessageError,
    MessageFormatError,
)
from agent.didcomm.keys import LocalKey, SenderResolver, did_of
from agent.didcomm.message import Message

#: Envelopes larger than this are refused before parsing (``max_size`` overrides it).
MAX_ENVELOPE = 1024 * 1024

ANONCRYPT = "anoncrypt"
AUTHCRYPT = "authcrypt"
SIGNED = "signed"
PLAINTEXT = "plaintext"
_ORDER = (ANONCRYPT, AUTHCRYPT, SIGNED)


@dataclass(frozen=True)
class Layer:
    """One protective layer, outermost first in :attr:`Metadata.layers`."""

    kind: str  # anoncrypt | authcrypt | signed
    alg: str  # ECDH-ES+A256KW | ECDH-1PU+A256KW | EdDSA | ES256 | ES256K | ES384
    enc: str | None = None  # content encryption of an encrypted layer
    kid: str | None = None  # recipient kid that decrypted it, or the signer's kid
    recipient_kids: tuple[str, ...] = ()  # every recipient of an encrypted layer
    skid: str | None = None  # authcrypt sender kid

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "alg": self.alg}
        if self.enc is not None:
            out["enc"] = self.enc
        if self.kid is not None:
            out["kid"] = self.kid
        if self.recipient_kids:
            out["recipient_kids"] = list(self.recipient_kids)
        if self.skid is not None:
            out["skid"] = self.skid
        return out


@dataclass(frozen=True)
class Metadata:
    """What the envelope proved. ``mode`` names the layers, e.g. ``anoncrypt+signed``."""

    layers: tuple[Layer, ...]
    signed_message: str | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        return "+".join(layer.kind for layer in self.layers) or PLAINTEXT

    def _layer(self, kind: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.kind == kind), None)

    @property
    def encrypted(self) -> bool:
        return any(layer.kind in (ANONCRYPT, AUTHCRYPT) for layer in self.layers)

    @property
    def sender_kid(self) -> str | None:
        """The authcrypt sender's kid: authenticated to us, but repudiable."""
        layer = self._layer(AUTHCRYPT)
        return layer.skid if layer else None

    @property
    def signed_by(self) -> str | None:
        """The signer's kid: provable to third parties with :attr:`signed_message`."""
        layer = self._layer(SIGNED)
        return layer.kid if layer else None

    @property
    def sender(self) -> str | None:
        """The authenticated sender's DID (authcrypt or signature), or None if anonymous."""
        kid = self.sender_kid or self.signed_by
        return did_of(kid) if kid else None

    @property
    def algorithms(self) -> list[str]:
        return [f"{layer.alg}/{layer.enc}" if layer.enc else layer.alg for layer in self.layers]

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "encrypted": self.encrypted,
            "sender": self.sender,
            "sender_kid": self.sender_kid,
            "signed_by": self.signed_by,
            "algorithms": self.algorithms,
            "layers": [layer.as_dict() for layer in self.layers],
        }


@dataclass(frozen=True)
class Unpacked:
    message: Message
    metadata: Metadata


def _parse(envelope: str | bytes | Mapping[str, Any], max_size: int) -> dict[str, Any]:
    if isinstance(envelope, str):
        # UTF-8 is at most 4 bytes a character: encode only when the length is in doubt.
        size = len(envelope) if len(envelope) * 4 <= max_size else len(envelope.encode())
    elif isinstance(envelope, bytes | bytearray):
        size = len(envelope)
    elif isinstance(envelope, Mapping):
        try:
            size = len(json.dumps(envelope, separators=(",", ":")).encode())
        except (TypeError, ValueError) as exc:
            raise MalformedEnvelopeError(f"envelope is not JSON: {exc}") from None
        if size > max_size:
            raise EnvelopeTooLargeError(f"envelope is {size} bytes; the limit is {max_size}")
        return dict(envelope)
    else:
        raise MalformedEnvelopeError(f"cannot unpack a {type(envelope).__name__}")
    if size > max_size:
        raise EnvelopeTooLargeError(f"envelope is {size} bytes; the limit is {max_size}")
    return load_object(envelope, "envelope")


def unpack(
    envelope: str | bytes | Mapping[str, Any],
    recipient_keys: Sequence[LocalKey] = (),
    *,
    sender_resolver: SenderResolver | None = None,
    max_size: int = MAX_ENVELOPE,
) -> Unpacked:
    """Open an envelope with the given private keys; verify every layer.

    ``recipient_keys`` are key handles (matched to the envelope's kids through their
    did:key) or :class:`~agent.didcomm.keys.NamedKey` (matched by kid).  Static ECDH
    runs through each key's ``exchange``: one call for anoncrypt, two for authcrypt.
    ``sender_resolver`` maps sender key ids that are not did:key to public keys.
    """
    obj = _parse(envelope, max_size)
    local = jwe.prepare_local_keys(recipient_keys)
    layers: list[Layer] = []
    signed_message: str | None = None
    while True:
        if jwe.is_jwe(obj):
            result = jwe.decrypt(obj, local, sender_resolver)
            kind = AUTHCRYPT if result.skid is not None else ANONCRYPT
            _check_order(layers, kind)
            layers.append(
                Layer(
                    kind=kind,
                    alg=result.alg,
                    enc=result.enc,
                    kid=result.recipient_kid,
                    recipient_kids=result.recipient_kids,
                    skid=result.skid,
                )
            )
            obj = load_object(result.payload, "decrypted payload")
        elif jws.is_jws(obj):
            _check_order(layers, SIGNED)
            verified = jws.verify(obj, sender_resolver)
            layers.append(Layer(kind=SIGNED, alg=verified.alg, kid=verified.kid))
            signed_message = json.dumps(verified.jws, separators=(",", ":"))
            obj = load_object(verified.payload, "signed payload")
        else:
            break
    try:
        message = Message.from_dict(obj)
    except MessageError as exc:
        raise MessageFormatError(str(exc)) from None
    _check_consistency(message, layers)
    return Unpacked(message, Metadata(tuple(layers), signed_message))


def _check_order(layers: list[Layer], kind: str) -> None:
    if layers and _ORDER.index(layers[-1].kind) >= _ORDER.index(kind):
        raise MalformedEnvelopeError(
            f"{kind} inside {layers[-1].kind}: DIDComm allows anoncrypt, authcrypt and "
            "signed layers once each, in that order"
        )


def _check_consistency(message: Message, layers: list[Layer]) -> None:
    """The spec's "Message Layer Addressing Consistency" rules, all of them errors."""
    for layer in layers:
        if layer.kind == SIGNED or layer.kind == AUTHCRYPT:
            kid = layer.kid if layer.kind == SIGNED else layer.skid
            assert kid is not None
            if message.from_ is None:
                raise ConsistencyError(f"a {layer.kind} message must say 'from'")
            if message.from_ != did_of(kid):
                raise ConsistencyError(
                    f"'from' is {message.from_} but the {layer.kind} key {kid} is not its key"
                )
        if layer.kind in (ANONCRYPT, AUTHCRYPT) and message.to is not None:
            assert layer.kid is not None
            if did_of(layer.kid) not in message.to:
                raise ConsistencyError(
                    f"the message 'to' does not list {did_of(layer.kid)}, whose key decrypted it"
                )
