"""Compact JWS (RFC 7515) signed by a KeyHandle, verified against a did:key.

Hand-written on purpose: signing must go through ``KeyHandle.sign`` so the private key
stays in its device (JOSE libraries want a key object they can use themselves), and
verification must be narrower than general-purpose JOSE: only ES256, ES384 and EdDSA,
the algorithm bound to the key type named by the issuer's did:key, no ``crit``
extensions, no unencoded payloads, strict base64url and JSON.  Every link still
verifies with any standard JOSE library, which the tests check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from janus_hsm.algorithms import Algorithm, is_low_s
from janus_hsm.provider import KeyHandle, raw_to_der
from janus_hsm.public_keys import (
    PublicKey,
    PublicKeyFormatError,
    algorithm_of,
    b64url_decode,
    b64url_encode,
    from_did_key,
)
from janus_hsm.strictjson import canonical_json as canonical_json
from janus_hsm.strictjson import loads_object
from policies.errors import AlgorithmRefusedError, FormatError, SignatureInvalidError

ALLOWED_ALGS = frozenset({"ES256", "ES384", "EdDSA"})
MAX_COMPACT = 16 * 1024


def sha256_b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("ascii")
    return b64url_encode(hashlib.sha256(data).digest())


def strict_json(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object from outside: no duplicate members, no NaN, no floats."""
    return loads_object(data, what, error=FormatError)


@dataclass(frozen=True)
class ParsedJws:
    compact: str
    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def sign_compact(handle: KeyHandle, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """Sign ``payload`` with the key in ``handle``; ``alg`` and ``kid`` are set here."""
    return sign_jws(handle, header, payload).compact


def sign_jws(handle: KeyHandle, header: dict[str, Any], payload: dict[str, Any]) -> ParsedJws:
    """``sign_compact``, also returning the pieces, so the signer need not parse it back.

    ``header`` and ``payload`` of the result are the objects given (with ``alg`` and
    ``kid`` added to a copy of the header): the caller must not change them.
    """
    alg = handle.algorithm
    if alg.value not in ALLOWED_ALGS:
        raise AlgorithmRefusedError(f"{alg.value} keys cannot sign JWS")
    full_header, encoded_header = _header(handle.did, alg.value, header)
    signing_input = (encoded_header + "." + b64url_encode(canonical_json(payload))).encode("ascii")
    signature = handle.sign(signing_input)
    compact = signing_input.decode("ascii") + "." + b64url_encode(signature)
    if len(compact) > MAX_COMPACT:
        raise FormatError(f"the signed object is larger than {MAX_COMPACT} bytes")
    return ParsedJws(compact, full_header, payload, signing_input, signature)


# A key signs many objects of a few kinds (typ) with the same header: keep its encoding.
_HEADERS: dict[tuple[str, ...], tuple[dict[str, Any], str]] = {}
_MAX_HEADERS = 1024


def _header(did: str, alg: str, header: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The full protected header (``alg`` and ``kid`` added) and its base64url encoding."""
    key: tuple[str, ...] | None = None
    if all(type(v) is str for v in header.values()):  # else: not cached
        key = (did, alg, *(item for kv in sorted(header.items()) for item in kv))
        cached = _HEADERS.get(key)
        if cached is not None:
            return cached
    full = {**header, "alg": alg, "kid": f"{did}#{did.removeprefix('did:key:')}"}
    encoded = (full, b64url_encode(canonical_json(full)))
    if key is not None:
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.clear()
        _HEADERS[key] = encoded
    return encoded


def parse_compact(compact: str, *, typ: str, what: str) -> ParsedJws:
    """Split and decode a compact JWS, refusing every header Janus does not accept."""
    if not isinstance(compact, str):
        raise FormatError(f"{what} must be a string")
    if len(compact) > MAX_COMPACT:
        raise FormatError(f"{what} is larger than {MAX_COMPACT} bytes")
    parts = compact.split(".")
    if len(parts) != 3:
        raise FormatError(f"{what} is not a compact JWS (expected 3 parts, got {len(parts)})")
    try:
        header = strict_json(b64url_decode(parts[0]), f"{what} header")
        payload = strict_json(b64url_decode(parts[1]), f"{what} payload")
        signature = b64url_decode(parts[2])
    except PublicKeyFormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    alg = header.get("alg")
    if alg not in ALLOWED_ALGS:
        raise AlgorithmRefusedError(
            f"{what} uses alg {alg!r}; only {', '.join(sorted(ALLOWED_ALGS))} are accepted"
        )
    if "crit" in header:
        raise AlgorithmRefusedError(f"{what} has critical header extensions {header['crit']!r}")
    if header.get("b64", True) is not True:
        raise AlgorithmRefusedError(f"{what} uses an unencoded payload (b64: false)")
    if header.get("typ") != typ:
        raise FormatError(f"{what} has typ {header.get('typ')!r}, expected {typ!r}")
    return ParsedJws(compact, header, payload, (parts[0] + "." + parts[1]).encode(), signature)


def public_key_for(did: Any, what: str) -> PublicKey:
    if not isinstance(did, str):
        raise FormatError(f"{what} must be a did:key string")
    try:
        return from_did_key(did)
    except PublicKeyFormatError as exc:
        raise FormatError(f"{what}: {exc}") from None


def verify_signature(parsed: ParsedJws, public_key: PublicKey, *, what: str) -> None:
    """Check the signature, and that the header's alg is the one the key's type implies."""
    key_alg = algorithm_of(public_key)
    if key_alg.value != parsed.header["alg"] or key_alg is Algorithm.X25519:
        raise AlgorithmRefusedError(
            f"{what} says alg {parsed.header['alg']} but its key is {key_alg.jwk_crv}"
        )
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            # libsodium verifies Ed25519 about 2x faster than OpenSSL through cryptography
            # (docs/performance.md); the result is the same RFC 8032 check.
            raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
            try:
                if len(parsed.signature) != 64:
                    raise InvalidSignature
                nacl.bindings.crypto_sign_open(parsed.signature + parsed.signing_input, raw)
            except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
                raise InvalidSignature from None
            return
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        size = key_alg.coordinate_size
        if len(parsed.signature) != 2 * size:
            raise SignatureInvalidError(f"{what} signature has the wrong length")
        if not is_low_s(parsed.signature, key_alg):
            # (r, n - s) would verify too: a second text, so a second id, for the same
            # signed object. Janus signs in low-S form only (janus_hsm.algorithms.low_s).
            raise SignatureInvalidError(f"{what} signature is not in low-S form")
        hash_alg = key_alg.hash_algorithm
        assert hash_alg is not None
        public_key.verify(
            raw_to_der(parsed.signature, size), parsed.signing_input, ec.ECDSA(hash_alg)
        )
    except InvalidSignature:
        raise SignatureInvalidError(f"{what} signature does not verify") from None
