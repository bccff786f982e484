"""The sync key: a software Ed25519 key per owner that signs group messages.

Group messages are signed one by one, and the token is for long-term operations only
(one signature per relationship, never per message).  So each owner has a *sync key*,
made in software the first time it writes to a group, and certified once by its root:
a compact JWS (``typ`` ``janus-sync-key+jws``) of the root binding the sync key's
did:key to the root's.  Members check a message's author against the certificate in
their ``admit`` rule.  The private key lives in the relationship vault (sealed there
with the rest of the relationship state), never in a file of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import nacl.bindings
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.sync.group_errors import BadSyncKeyCertificateError
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.handle import software_properties
from janus_hsm.provider import KeyHandle, KeyProperties
from janus_hsm.public_keys import PublicKey
from policies.errors import PolicyError
from policies.jws import parse_compact, public_key_for, sign_compact, verify_signature

CERT_TYP: Final = "janus-sync-key+jws"
#: A certificate names two did:keys and a time: far below this.
MAX_CERT_CHARS: Final = 2048


class SyncKey(KeyHandle):
    """An Ed25519 key held in memory (from the vault), signing through libsodium."""

    # It is a software key by design (see the module docstring).
    allow_extractable = True

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self.seed = seed
        self._private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        raw = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._sodium = seed + raw

    @classmethod
    def generate(cls) -> SyncKey:
        return cls(nacl.bindings.randombytes(32))

    @property
    def uri(self) -> str:
        return "janus:sync-key"

    @property
    def properties(self) -> KeyProperties:
        return software_properties(Algorithm.EdDSA)

    def public_key(self) -> PublicKey:
        return self._private.public_key()

    def _sign_eddsa(self, data: bytes) -> bytes:
        # libsodium signs faster than OpenSSL through cryptography; the bytes are the same.
        signed: bytes = nacl.bindings.crypto_sign(data, self._sodium)
        return signed[:64]


@dataclass(frozen=True)
class SyncKeyCertificate:
    """A root's statement that ``sync_did`` writes for it (``root_did``)."""

    compact: str
    root_did: str
    sync_did: str
    issued: int


def certify(
    root: KeyHandle, sync_key: KeyHandle, *, now: int | None = None, typ: str = CERT_TYP
) -> SyncKeyCertificate:
    """The root signs the binding (one token signature, once per sync key).  A device's
    sync key is certified the same way by the device's key, under a ``typ`` of its own
    (agent/sync/device_sync_key.py), so neither certificate passes for the other."""
    issued = int(time.time()) if now is None else now
    payload = {"iss": root.did, "sub": sync_key.did, "iat": issued}
    compact = sign_compact(root, {"typ": typ}, payload)
    return SyncKeyCertificate(compact, root.did, sync_key.did, issued)


def parse_certificate(compact: object, *, typ: str = CERT_TYP) -> SyncKeyCertificate:
    """Verify a certificate that came from a peer; any fault is a typed refusal."""
    if not isinstance(compact, str) or len(compact) > MAX_CERT_CHARS:
        raise BadSyncKeyCertificateError(
            f"a sync-key certificate is a compact JWS of at most {MAX_CERT_CHARS} characters"
        )
    try:
        parsed = parse_compact(compact, typ=typ, what="the sync-key certificate")
        payload = parsed.payload
        if set(payload) != {"iss", "sub", "iat"}:
            raise BadSyncKeyCertificateError("a sync-key certificate has iss, sub and iat only")
        root, sub, issued = payload["iss"], payload["sub"], payload["iat"]
        if type(issued) is not int or issued < 0:
            raise BadSyncKeyCertificateError("a sync-key certificate's iat is a time")
        verify_signature(
            parsed, public_key_for(root, "the certificate's iss"), what="the certificate"
        )
        if parsed.header.get("kid", "").split("#")[0] != root:
            raise BadSyncKeyCertificateError("a sync-key certificate's kid is not its iss")
        key = public_key_for(sub, "the certificate's sub")
    except PolicyError as exc:
        raise BadSyncKeyCertificateError(f"a sync-key certificate does not verify: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BadSyncKeyCertificateError("a sync key is an Ed25519 did:key")
    return SyncKeyCertificate(compact, str(root), str(sub), issued)
