"""Packing: plaintext → signed, anoncrypt, authcrypt (and the combinations DIDComm allows).

The layer-consistency rules of the spec ("Message Layer Addressing Consistency") are
checked when packing, not only when unpacking, so Janus never sends an envelope that a
careful receiver - Janus included - would refuse: the plaintext ``from`` is the DID of
the sender's key (authcrypt) and of the signer's key (signed), and when the plaintext
has ``to``, every recipient key belongs to a DID listed there.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.didcomm import jwa, jwe, jws
from agent.didcomm.errors import PackError, UnusableKeyError
from agent.didcomm.keys import (
    AgreementKey,
    LocalKey,
    NamedKey,
    Recipient,
    RecipientSpec,
    agreement_kid,
    crv_of,
    did_key_of,
    did_of,
    resolve_recipient,
)
from agent.didcomm.message import Message

DEFAULT_ENC = jwa.A256CBC_HS512


def _recipients(message: Message, to: Sequence[RecipientSpec]) -> list[Recipient]:
    if isinstance(to, str | Recipient) or not to:
        raise PackError("'to' must be a non-empty list of recipients")
    recipients = [resolve_recipient(spec) for spec in to]
    if message.to is not None:
        missing = sorted({r.did for r in recipients} - set(message.to))
        if missing:
            raise PackError(
                f"the message 'to' does not list {', '.join(missing)}; a recipient would "
                "refuse it (add them to 'to', or leave 'to' out)"
            )
    return recipients


def pack_plaintext(message: Message) -> str:
    """The message as ``application/didcomm-plain+json`` (no protection at all)."""
    return message.to_json()


def pack_signed(
    message: Message, signer: jws.Signer, *, kid: str | None = None, flattened: bool = False
) -> str:
    """Sign ``message`` (JWS JSON, general unless ``flattened``) with a key handle.

    EdDSA for Ed25519 keys and ES256 for P-256 keys, as DIDComm requires; ES384 for
    P-384 keys (which other DIDComm agents need not verify).  ``kid`` defaults to the
    signer's did:key DID URL; ``message.from_`` must be its DID.
    """
    return jws.sign(message, signer, kid=kid, flattened=flattened)


def _payload(message: Message, signer: jws.Signer | None, signer_kid: str | None) -> bytes:
    if signer is None:
        return message.to_json().encode()
    return jws.sign(message, signer, kid=signer_kid).encode()


def pack_anoncrypt(
    message: Message,
    to: Sequence[RecipientSpec],
    *,
    enc: str = DEFAULT_ENC,
    signer: jws.Signer | None = None,
    signer_kid: str | None = None,
) -> str:
    """Encrypt ``message`` to ``to`` without revealing the sender (ECDH-ES+A256KW).

    ``to`` holds did:key DIDs or DID URLs, public JWKs whose ``kid`` is a DID URL, or
    :class:`Recipient` objects, all on one curve (X25519, P-256, P-384 or P-521).
    ``enc`` is A256CBC-HS512 (default), A256GCM or XC20P.  With ``signer`` the message
    is signed first: anoncrypt(sign(m)) gives the recipient non-repudiation.
    """
    recipients = _recipients(message, to)
    return jwe.encrypt(_payload(message, signer, signer_kid), recipients, enc=enc)


def sender_kid_of(sender: LocalKey) -> tuple[AgreementKey, str]:
    """(key, skid): a NamedKey's kid, or the did:key key-agreement DID URL of the key."""
    if isinstance(sender, NamedKey):
        return sender.key, sender.kid
    public = sender.public_key()
    if crv_of(public) == "Ed25519":
        raise UnusableKeyError(
            "an Ed25519 key cannot be an authcrypt sender (no ECDH); use the X25519, "
            "P-256 or P-384 key that the sender's DID lists for key agreement"
        )
    return sender, agreement_kid(did_key_of(public))


def pack_authcrypt(
    message: Message,
    to: Sequence[RecipientSpec],
    sender: LocalKey,
    *,
    signer: jws.Signer | None = None,
    signer_kid: str | None = None,
    protect_sender: bool = False,
    outer_enc: str = DEFAULT_ENC,
) -> str:
    """Encrypt ``message`` to ``to`` and authenticate ``sender`` (ECDH-1PU+A256KW).

    Content encryption is A256CBC-HS512, the only one ECDH-1PU allows.  ``sender`` is a
    key handle (its did:key names it) or a :class:`NamedKey`; its ECDH runs where the
    key lives, once per recipient.  ``message.from_`` must be the sender key's DID.
    ``protect_sender`` wraps the result in anoncrypt (``outer_enc``) so that only the
    recipients, not an observer, see ``skid``.  ``signer`` signs the plaintext first
    (the spec discourages authcrypt(sign(m)); prefer ``pack_anoncrypt(signer=…)``).
    """
    key, skid = sender_kid_of(sender)
    if message.from_ != did_of(skid):
        raise PackError(
            f"authcrypt needs the message 'from' ({message.from_}) to be the sender's DID "
            f"({did_of(skid)})"
        )
    recipients = _recipients(message, to)
    inner = jwe.encrypt(
        _payload(message, signer, signer_kid),
        recipients,
        enc=jwa.A256CBC_HS512,
        sender=key,
        skid=skid,
    )
    if not protect_sender:
        return inner
    return jwe.encrypt(inner.encode(), recipients, enc=outer_enc)
