"""The device list's building blocks: bounds, strict field checks, detached signatures.

The request and the approval are JWS with detached payloads (RFC 7515 Appendix F): a
list entry carries only the signature, and the verifier rebuilds header and payload from
the entry's fields.  That keeps an entry near 500 bytes (two full JWS would double it)
and still lets any JOSE library check each signature.  Hand-written for the same reason
as policies/jws.py: every signature is made by ``KeyHandle.sign`` inside the device.
"""

from __future__ import annotations

import re
from typing import Any, Final

from agent.sync.device_errors import (
    DeviceSignatureError,
    MalformedDeviceListError,
    MissingApprovalError,
)
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import (
    PublicKeyFormatError,
    algorithm_of,
    b64url_decode,
    b64url_encode,
    from_did_key,
)
from janus_hsm.strictjson import canonical_json
from policies.errors import PolicyError
from policies.jws import ParsedJws, sign_jws, verify_signature

#: ``typ`` of a join request (a compact JWS by the new device's key).
REQUEST_TYP: Final = "janus-device-request+jws"
#: ``typ`` of an approval (detached JWS by an existing device's key).
APPROVAL_TYP: Final = "janus-device-approval+jws"
#: ``typ`` of the device list (compact JWS by the owner's root).
LIST_TYP: Final = "janus-device-list+jws"

#: Bounds of a list: current devices, and current plus removed (removed devices stay
#: listed so that approvals they gave can still be checked); the whole list must also
#: fit a compact JWS of policies.jws.MAX_COMPACT bytes.
MAX_DEVICES: Final = 16
MAX_ENTRIES: Final = 24

#: What a name, a nonce and an integer may be (integers exact in any JSON reader).
NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ._@+'-]{0,62}[A-Za-z0-9._@+'-])?")
NONCE = re.compile(r"[A-Za-z0-9_-]{22}")
MAX_INT = 2**53
SIGNING_ALGS = frozenset({Algorithm.ES256, Algorithm.ES384, Algorithm.EdDSA})
AGREEMENT_ALGS = frozenset({Algorithm.X25519, Algorithm.ES256})

#: The exact members of each object: anything missing or more is refused.
REQUEST_FIELDS = frozenset({"iss", "agreement", "name", "nonce", "iat"})
ENTRY_FIELDS = frozenset(
    {"device", "agreement", "name", "requested", "nonce", "proof"}
    | {"version", "added", "approver", "approval"}
)
REMOVED_FIELDS = ENTRY_FIELDS | {"removed", "removed_at"}
APPROVAL_FIELDS = frozenset({"type", "owner", "entry"})
LIST_FIELDS = frozenset({"iss", "version", "prev", "iat", "devices", "removed"})


def check_name(name: object, error: type[Exception] = MalformedDeviceListError) -> str:
    """A device name: 1-64 characters, letters, digits, space and . _ @ + ' -."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise error(
            "a device name is 1-64 characters: letters, digits, space and . _ @ + ' -, "
            "starting and ending with a letter, digit or sign"
        )
    return name


def check_did(value: object, what: str, algs: frozenset[Algorithm], error: type[Exception]) -> str:
    if not isinstance(value, str):
        raise error(f"{what} must be a did:key string")
    try:
        alg = algorithm_of(from_did_key(value))
    except PublicKeyFormatError as exc:
        raise error(f"{what}: {exc}") from None
    if alg not in algs:
        raise error(f"{what} is a {alg.value} key, not {' or '.join(sorted(algs))}")
    return value


def check_int(value: object, what: str, error: type[Exception], *, low: int = 0) -> int:
    if type(value) is not int or not low <= value < MAX_INT:
        raise error(f"{what} must be an integer from {low}")
    return value


def check_signature(value: object, what: str, error: type[Exception]) -> bytes:
    if not isinstance(value, str) or len(value) > 200:
        raise error(f"{what} must be a base64url signature")
    try:
        return b64url_decode(value)
    except PublicKeyFormatError as exc:
        raise error(f"{what}: {exc}") from None


def check_fields(
    obj: object, wanted: frozenset[str], what: str, error: type[Exception]
) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise error(f"{what} must be a JSON object")
    if not {"approver", "approval"} <= obj.keys() and "approver" in wanted:
        raise MissingApprovalError(f"{what} has no approving device and signature")
    if obj.keys() != wanted:
        extra, missing = sorted(obj.keys() - wanted), sorted(wanted - obj.keys())
        raise error(f"{what} has unknown members {extra} or lacks {missing}")
    return obj


# --- detached signatures -----------------------------------------------------------------


def detached_header(did: str, typ: str) -> dict[str, str]:
    alg = algorithm_of(from_did_key(did)).value
    return {"typ": typ, "alg": alg, "kid": f"{did}#{did.removeprefix('did:key:')}"}


def detached_input(header: dict[str, Any], payload: dict[str, Any]) -> bytes:
    return (
        b64url_encode(canonical_json(header)) + "." + b64url_encode(canonical_json(payload))
    ).encode("ascii")


def sign_detached(key: KeyHandle, typ: str, payload: dict[str, Any]) -> ParsedJws:
    signed = sign_jws(key, {"typ": typ}, payload)
    # The verifier rebuilds this exact input from the did alone: make sure it can.
    assert signed.signing_input == detached_input(detached_header(key.did, typ), payload)
    return signed


def verify_detached(
    did: str, typ: str, payload: dict[str, Any], signature: bytes, what: str
) -> None:
    header = detached_header(did, typ)
    parsed = ParsedJws("", header, payload, detached_input(header, payload), signature)
    try:
        verify_signature(parsed, from_did_key(did), what=what)
    except PolicyError as exc:
        raise DeviceSignatureError(str(exc)) from None
