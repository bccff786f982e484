"""Keys as DIDComm names them: JWKs, did:key DID URLs, and the local keys that do ECDH.

Why this module exists rather than a JOSE library's key objects: the private half of a
Janus key stays in its token, so the only thing unpacking may ask of it is
:meth:`janus_hsm.provider.KeyHandle.exchange` (a raw ECDH ``Z``).  Public keys, on the
other hand, arrive from outside - in ``epk`` headers, JWK files, DID URLs - and every
one is checked here before any arithmetic is done with it: strict JWK members, points
on their curve (``cryptography`` refuses off-curve points when it loads them), no
small-order X25519 points.

did:key (W3C CCG did:key) is the one DID method resolved without a resolver, because
its DID *is* the key.  For an Ed25519 did:key, the key-agreement key is the X25519 key
obtained by the birational map from Edwards to Montgomery form (RFC 7748 section 4.1),
named ``did:key:z6Mk…#z6LS…``.  Janus computes that public key (for sending to such a
DID) but cannot decrypt for it with a key in a token: the matching X25519 private key
would have to be derived from the Ed25519 private key, which never leaves the device.
Receivers in Janus use an X25519, P-256 or P-384 key of their own for key agreement.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from agent.didcomm._encoding import b64d, b64e
from agent.didcomm.errors import (
    DIDCommError,
    InvalidPublicKeyError,
    KeyResolutionError,
    MalformedEnvelopeError,
    UnknownSenderError,
)
from janus_hsm.public_keys import PublicKeyFormatError, from_did_key, to_did_key

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | x25519.X25519PublicKey

#: Weierstrass curves by JWK ``crv``, with their coordinate size in bytes.
EC_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
    "secp256k1": (ec.SECP256K1(), 32),
}
_EC_CRV_BY_NAME = {curve.name: crv for crv, (curve, _) in EC_CURVES.items()}

#: Curves DIDComm uses for key agreement (P-521 is optional in the spec; supported).
AGREEMENT_CURVES = frozenset({"X25519", "P-256", "P-384", "P-521"})

_DID_URL = re.compile(r"did:[a-z0-9]+:[A-Za-z0-9._:%/?=&;+-]+#[A-Za-z0-9._:%/?=&;+~!$'()*,@-]+")
_DID = re.compile(r"did:[a-z0-9]+:[A-Za-z0-9._:%-]+(?:[/?][^#\s]*)?")

# The u-coordinates (mod p, top bit cleared as X25519 decodes them) of the Curve25519
# points of small order - the list libsodium and others refuse.  ECDH with one of them
# yields a value the sender knows without any private key (RFC 7748 section 6.1).
_P25519 = 2**255 - 19
_SMALL_ORDER_U = frozenset(
    {
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
    }
)


# --- JWK ------------------------------------------------------------------------------


# cryptography's key classes are ABCs, and an isinstance check against one costs about a
# microsecond; the concrete classes never change, so remember them.
_OKP_CRV_BY_TYPE: dict[type, str] = {}


def crv_of(public_key: PublicKey) -> str:
    """The JWK ``crv`` of a public key."""
    crv = _OKP_CRV_BY_TYPE.get(type(public_key))
    if crv is not None:
        return crv
    if isinstance(public_key, x25519.X25519PublicKey):
        _OKP_CRV_BY_TYPE[type(public_key)] = "X25519"
        return "X25519"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        _OKP_CRV_BY_TYPE[type(public_key)] = "Ed25519"
        return "Ed25519"
    crv = _EC_CRV_BY_NAME.get(public_key.curve.name)
    if crv is None:
        raise InvalidPublicKeyError(f"unsupported curve {public_key.curve.name}")
    return crv


def raw_bytes(public_key: PublicKey) -> bytes:
    """SEC1 uncompressed point, or the 32 raw bytes of an X25519/Ed25519 key."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_fingerprint(public_key: PublicKey) -> tuple[str, bytes]:
    """(crv, raw bytes): equal exactly when two public key objects are the same key."""
    return crv_of(public_key), raw_bytes(public_key)


def public_to_jwk(public_key: PublicKey) -> dict[str, str]:
    crv = crv_of(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        size = EC_CURVES[crv][1]
        numbers = public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64e(numbers.x.to_bytes(size, "big")),
            "y": b64e(numbers.y.to_bytes(size, "big")),
        }
    return {"kty": "OKP", "crv": crv, "x": b64e(raw_bytes(public_key))}


def jwk_to_public(jwk: object, what: str = "JWK") -> PublicKey:
    """Load a public JWK strictly; raises InvalidPublicKeyError (an EnvelopeError).

    Weierstrass points are loaded with ``from_encoded_point``, which refuses points that
    are not on the curve - the check DIDComm requires for every NIST-curve ``epk``.
    X25519 keys of small order are refused here, before any ECDH sees them.
    """
    if type(jwk) is not dict and not isinstance(jwk, Mapping):
        raise InvalidPublicKeyError(f"{what} must be a JSON object")
    if "d" in jwk:
        raise InvalidPublicKeyError(f"{what} contains a private key ('d')")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    try:
        if kty == "OKP" and crv in ("X25519", "Ed25519"):
            x = b64d(jwk.get("x"), f"{what} 'x'")
            if len(x) != 32:
                raise InvalidPublicKeyError(f"{what}: {crv} 'x' must be 32 bytes")
            if crv == "X25519":
                agreement = x25519.X25519PublicKey.from_public_bytes(x)
                check_x25519_peer(agreement, what)
                return agreement
            return ed25519.Ed25519PublicKey.from_public_bytes(x)
        if kty == "EC" and isinstance(crv, str) and crv in EC_CURVES:
            curve, size = EC_CURVES[crv]
            x = b64d(jwk.get("x"), f"{what} 'x'")
            y = b64d(jwk.get("y"), f"{what} 'y'")
            if len(x) != size or len(y) != size:
                raise InvalidPublicKeyError(f"{what}: {crv} coordinates must be {size} bytes")
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
    except MalformedEnvelopeError as exc:
        raise InvalidPublicKeyError(str(exc)) from None
    except ValueError as exc:
        raise InvalidPublicKeyError(f"{what} is not a valid {crv} point: {exc}") from None
    raise InvalidPublicKeyError(f"{what}: unsupported key type kty={kty!r} crv={crv!r}")


def check_x25519_peer(public_key: x25519.X25519PublicKey, what: str = "X25519 key") -> None:
    """Refuse the small-order points of RFC 7748 section 6.1 (their ECDH output is known).

    The token would refuse too (an all-zero Z), but not every token checks, and there is
    no reason to spend a token operation on a point that is known to be useless.
    """
    u = int.from_bytes(raw_bytes(public_key), "little") & ((1 << 255) - 1)
    if u % _P25519 in _SMALL_ORDER_U:
        raise InvalidPublicKeyError(f"{what} is an X25519 point of small order")


def ed25519_to_x25519(public_key: ed25519.Ed25519PublicKey) -> x25519.X25519PublicKey:
    """The X25519 key an Ed25519 did:key agrees keys with (RFC 7748 4.1 birational map).

    libsodium's conversion is used because it also checks that the Edwards point is a
    valid point of the prime-order subgroup, which the one-line formula does not.
    """
    try:
        converted = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(raw_bytes(public_key))
    except nacl.exceptions.CryptoError:
        raise InvalidPublicKeyError(
            "the Ed25519 key is not a valid point, so it has no X25519 form"
        ) from None
    result = x25519.X25519PublicKey.from_public_bytes(converted)
    check_x25519_peer(result)
    return result


# --- DIDs and DID URLs --------------------------------------------------------------


def is_did_url(text: object) -> bool:
    """A DID URL with a fragment, the form DIDComm ``kid``/``skid`` values must have."""
    return isinstance(text, str) and _DID_URL.fullmatch(text) is not None


def is_did(text: object) -> bool:
    """A DID (or DID URL without fragment), as ``from``/``to`` and ``next`` carry them."""
    return isinstance(text, str) and _DID.fullmatch(text) is not None


def did_of(kid: str) -> str:
    """The DID part of a DID URL: what ``from`` and ``to`` must name."""
    return kid.partition("#")[0]


# did:key ids by key bytes: base58 is slow in Python, and the same few keys (our own,
# our correspondents') are named on every pack and unpack.  Pure functions of their
# input, so caching cannot change a result.
_IDENT_CACHE: dict[tuple[str, bytes], str | None] = {}
_CACHE_LIMIT = 4096


def did_key_ident(public_key: PublicKey) -> str | None:
    """The method-specific id (``z…``) of a key's did:key; None for keys did:key lacks."""
    fingerprint = key_fingerprint(public_key)
    try:
        return _IDENT_CACHE[fingerprint]
    except KeyError:
        pass
    try:
        ident: str | None = to_did_key(public_key)[len("did:key:") :]
    except PublicKeyFormatError:
        ident = None
    if len(_IDENT_CACHE) >= _CACHE_LIMIT:
        _IDENT_CACHE.clear()
    _IDENT_CACHE[fingerprint] = ident
    return ident


def _did_key_ident(public_key: PublicKey) -> str:
    ident = did_key_ident(public_key)
    if ident is None:
        raise KeyResolutionError(f"{crv_of(public_key)} keys have no did:key")
    return ident


def did_key_of(public_key: PublicKey) -> str:
    """did:key of a key (X25519, Ed25519, P-256, P-384)."""
    return "did:key:" + _did_key_ident(public_key)


@functools.lru_cache(maxsize=_CACHE_LIMIT)
def agreement_kid(did: str) -> str:
    """The key-agreement DID URL of a did:key DID (``did#ident``; Ed25519 → its X25519)."""
    public = _parse_did_key(did)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return f"{did}#{_did_key_ident(ed25519_to_x25519(public))}"
    return f"{did}#{did[len('did:key:') :]}"


def authentication_kid(did: str) -> str:
    """The signing DID URL of a did:key DID (``did#ident``)."""
    _parse_did_key(did)
    return f"{did}#{did[len('did:key:') :]}"


def _parse_did_key(did: str) -> PublicKey:
    try:
        return from_did_key(did)
    except PublicKeyFormatError as exc:
        raise KeyResolutionError(f"{did[:60]!r} is not a usable did:key: {exc}") from None


@functools.lru_cache(maxsize=_CACHE_LIMIT)
def resolve_did_key_url(kid: str) -> PublicKey:
    """The public key a did:key DID URL names.

    ``did:key:X#X`` is the key X itself; ``did:key:X#Y`` is accepted only when X is an
    Ed25519 key and Y the X25519 key derived from it (the did:key method's
    keyAgreement entry).  Raises KeyResolutionError otherwise.
    """
    if not kid.startswith("did:key:z") or not is_did_url(kid):
        raise KeyResolutionError(f"{kid[:80]!r} is not a did:key DID URL")
    did, _, fragment = kid.partition("#")
    public = _parse_did_key(did)
    ident = did[len("did:key:") :]
    if fragment == ident:
        return public
    if isinstance(public, ed25519.Ed25519PublicKey):
        derived = ed25519_to_x25519(public)
        if fragment == _did_key_ident(derived):
            return derived
    raise KeyResolutionError(f"{kid[:80]!r}: the fragment names no key of this did:key")


# --- recipients -------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipient:
    """One recipient key: its DID URL (the JWE ``kid``) and its public key."""

    kid: str
    public_key: PublicKey

    def __post_init__(self) -> None:
        if not is_did_url(self.kid):
            raise KeyResolutionError(f"recipient kid {self.kid[:80]!r} is not a DID URL (did:…#…)")

    @property
    def did(self) -> str:
        return did_of(self.kid)

    @property
    def crv(self) -> str:
        return crv_of(self.public_key)


RecipientSpec = str | Mapping[str, Any] | Recipient


def resolve_recipient(spec: RecipientSpec) -> Recipient:
    """A did:key DID or DID URL, a public JWK whose ``kid`` is a DID URL, or a Recipient."""
    if isinstance(spec, Recipient):
        recipient = spec
    elif isinstance(spec, str):
        if "#" in spec:
            recipient = Recipient(spec, resolve_did_key_url(spec))
        elif spec.startswith("did:key:"):
            kid = agreement_kid(spec)
            recipient = Recipient(kid, resolve_did_key_url(kid))
        else:
            raise KeyResolutionError(
                f"cannot resolve {spec[:60]!r}: only did:key DIDs resolve on their own; "
                "give the recipient's public JWK with a DID URL as 'kid'"
            )
    elif isinstance(spec, Mapping):
        jwk_kid = spec.get("kid")
        if not isinstance(jwk_kid, str) or not is_did_url(jwk_kid):
            raise KeyResolutionError("a recipient JWK needs a 'kid' that is a DID URL (did:…#…)")
        kid = jwk_kid
        try:
            public = jwk_to_public(spec, f"JWK {kid}")
        except DIDCommError as exc:
            raise KeyResolutionError(str(exc)) from None
        if kid.startswith("did:key:"):
            named = resolve_did_key_url(kid)
            if key_fingerprint(named) != key_fingerprint(public):
                raise KeyResolutionError(f"JWK {kid}: the key is not the one its did:key names")
        recipient = Recipient(kid, public)
    else:
        raise KeyResolutionError(f"cannot use a {type(spec).__name__} as a recipient")
    if recipient.crv not in AGREEMENT_CURVES:
        raise KeyResolutionError(
            f"{recipient.kid}: {recipient.crv} keys cannot do key agreement; "
            "DIDComm encrypts to X25519, P-256, P-384 or P-521 keys"
        )
    return recipient


# --- local keys -------------------------------------------------------------------------


@runtime_checkable
class AgreementKey(Protocol):
    """What unpacking and authcrypt need from a private key: ECDH and nothing else.

    :class:`janus_hsm.provider.KeyHandle` is one (keys in SoftHSM, YubiKeys, software
    keystores); the private key never has to leave wherever it lives.
    """

    def public_key(self) -> PublicKey: ...

    def exchange(self, peer_public_key: PublicKey) -> bytes: ...


@dataclass(frozen=True)
class NamedKey:
    """A local key with the DID URL others know it by, when that is not its did:key.

    A bare key is matched to envelope recipients through its did:key (and, for an
    X25519 key, nothing else); keys named by other DID methods are given this way.
    """

    kid: str
    key: AgreementKey

    def __post_init__(self) -> None:
        if not is_did_url(self.kid):
            raise KeyResolutionError(f"{self.kid[:80]!r} is not a DID URL (did:…#…)")


LocalKey = AgreementKey | NamedKey

#: Maps a sender's key id (``skid`` or JWS ``kid``) to its public key; None if unknown.
SenderResolver = Callable[[str], PublicKey | None]


def jwk_resolver(jwks: Iterable[Mapping[str, Any]]) -> SenderResolver:
    """A resolver over public JWKs that carry their DID URL as ``kid`` (e.g. a DID doc)."""
    table: dict[str, PublicKey] = {}
    for jwk in jwks:
        kid = jwk.get("kid")
        if not is_did_url(kid):
            raise KeyResolutionError("every JWK needs a 'kid' that is a DID URL (did:…#…)")
        assert isinstance(kid, str)
        try:
            table[kid] = jwk_to_public(jwk, f"JWK {kid}")
        except DIDCommError as exc:
            raise KeyResolutionError(str(exc)) from None
    return table.get


def resolve_sender(kid: str, resolver: SenderResolver | None) -> PublicKey:
    """The sender's public key: the caller's resolver first, then did:key."""
    if resolver is not None:
        found = resolver(kid)
        if found is not None:
            return found
    if kid.startswith("did:key:"):
        try:
            return resolve_did_key_url(kid)
        except KeyResolutionError as exc:
            raise UnknownSenderError(str(exc)) from None
    raise UnknownSenderError(
        f"cannot resolve the sender key {kid[:80]!r}: not a did:key, and no resolver knew it"
    )


def local_kids(key: LocalKey) -> tuple[str | None, PublicKey]:
    """(explicit kid or None, public key) of a local key."""
    if isinstance(key, NamedKey):
        return key.kid, key.key.public_key()
    return None, key.public_key()
