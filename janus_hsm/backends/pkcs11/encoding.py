"""CKA_EC_PARAMS and CKA_EC_POINT: what tokens store, mapped to Janus algorithms.

Tokens disagree on details (named-curve OID vs PrintableString for the Edwards and
Montgomery curves; EC_POINT wrapped in a DER OCTET STRING or bare), so reading
accepts every form seen in the wild and writing uses the most widely accepted one.
"""

from __future__ import annotations

from asn1crypto.core import ObjectIdentifier, OctetString, PrintableString

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import MechanismUnsupportedError

_OIDS = {
    "1.2.840.10045.3.1.7": Algorithm.ES256,
    "1.3.132.0.34": Algorithm.ES384,
    "1.3.101.112": Algorithm.EdDSA,
    "1.3.101.110": Algorithm.X25519,
}
_NAMES = {
    "edwards25519": Algorithm.EdDSA,
    "ed25519": Algorithm.EdDSA,
    "curve25519": Algorithm.X25519,
    "x25519": Algorithm.X25519,
}
_GENERATE_OID = {alg: oid for oid, alg in _OIDS.items()}


def ec_params_for(alg: Algorithm) -> bytes:
    """DER named-curve parameters to generate a key of ``alg`` with."""
    return bytes(ObjectIdentifier(_GENERATE_OID[alg]).dump())


def algorithm_from_ec_params(params: bytes) -> Algorithm:
    try:
        if params[:1] == b"\x06":
            oid = ObjectIdentifier.load(params).dotted
            return _OIDS[oid]
        if params[:1] == b"\x13":
            name = str(PrintableString.load(params).native).lower()
            return _NAMES[name]
    except (KeyError, ValueError, TypeError):
        pass
    raise MechanismUnsupportedError(
        f"key uses EC parameters Janus does not support ({params[:16].hex()}); "
        "supported: P-256, P-384, Ed25519, X25519"
    )


def point_from_ec_point(alg: Algorithm, data: bytes) -> bytes:
    """The bare point: SEC1 uncompressed for P-curves, 32 raw bytes for 25519."""
    raw_len = 1 + 2 * alg.coordinate_size if alg.curve is not None else 32
    if len(data) == raw_len and (alg.curve is None or data[0] == 0x04):
        return bytes(data)
    try:
        inner = OctetString.load(bytes(data)).native
    except (ValueError, TypeError):
        inner = None
    if isinstance(inner, bytes) and len(inner) == raw_len:
        return inner
    raise MechanismUnsupportedError(f"cannot read the token's EC_POINT ({len(data)} bytes)")
