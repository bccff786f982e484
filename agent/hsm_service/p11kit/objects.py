"""How a key the service holds looks to a PKCS#11 client: a private and a public object.

The service never hands out a key: the private object has no value to read (CKA_VALUE is
CKR_ATTRIBUTE_SENSITIVE, CKA_SENSITIVE true, CKA_EXTRACTABLE false) and only names the
key the engine signs with. The attributes are derived from the engine's KeyView (label,
algorithm, SubjectPublicKeyInfo, allowed operations), not read from the token, so a
client sees exactly what the policy lets it see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.hsm_service.p11kit import constants as ck
from agent.hsm_service.p11kit.codec import AttributeValue
from janus_hsm.algorithms import Algorithm

# DER of each curve's OID, as CKA_EC_PARAMS carries it.
_EC_PARAMS = {
    Algorithm.ES256: bytes.fromhex("06082a8648ce3d030107"),  # 1.2.840.10045.3.1.7
    Algorithm.ES384: bytes.fromhex("06052b81040022"),  # 1.3.132.0.34
    Algorithm.EdDSA: bytes.fromhex("06032b6570"),  # 1.3.101.112
    Algorithm.X25519: bytes.fromhex("06032b656e"),  # 1.3.101.110
}
_KEY_TYPES = {
    Algorithm.ES256: ck.CKK_EC,
    Algorithm.ES384: ck.CKK_EC,
    Algorithm.EdDSA: ck.CKK_EC_EDWARDS,
    Algorithm.X25519: ck.CKK_EC_MONTGOMERY,
}
# The signing mechanisms each algorithm takes through this front.
SIGN_MECHANISMS: Mapping[Algorithm, tuple[int, ...]] = {
    Algorithm.ES256: (ck.CKM_ECDSA, ck.CKM_ECDSA_SHA256),
    Algorithm.ES384: (ck.CKM_ECDSA, ck.CKM_ECDSA_SHA384),
    Algorithm.EdDSA: (ck.CKM_EDDSA,),
    Algorithm.X25519: (),
}
# The mechanism that is exactly what the key's Janus default signature is (ES256 is ECDSA
# P-256 over SHA-256, r || s): these are sent to the engine as "the default", so they
# work on tokens that lack the hashing ECDSA mechanisms (SoftHSM 2.6 has CKM_ECDSA only).
JANUS_DEFAULT_MECHANISM = {
    Algorithm.ES256: ck.CKM_ECDSA_SHA256,
    Algorithm.ES384: ck.CKM_ECDSA_SHA384,
    Algorithm.EdDSA: ck.CKM_EDDSA,
}
# Key sizes in bits, as C_GetMechanismInfo reports them.
KEY_BITS = {Algorithm.ES256: 256, Algorithm.ES384: 384, Algorithm.EdDSA: 255, Algorithm.X25519: 255}
# Mechanisms whose input is the whole message (the front may buffer SignUpdate parts).
MULTIPART_MECHANISMS = frozenset({ck.CKM_ECDSA_SHA256, ck.CKM_ECDSA_SHA384})
# Attributes that would be the private key's secret: never readable.
SENSITIVE_ATTRIBUTES = frozenset({ck.CKA_VALUE, ck.CKA_PRIVATE_EXPONENT})


def signature_length(algorithm: Algorithm) -> int:
    """Bytes of a raw (r || s, or Ed25519) signature: known before signing, so a client
    asking for the size costs no use of the key."""
    return {Algorithm.ES256: 64, Algorithm.ES384: 96, Algorithm.EdDSA: 64}.get(algorithm, 0)


def _ec_point(algorithm: Algorithm, public_key_der: bytes) -> bytes:
    """CKA_EC_POINT: the public point as a DER OCTET STRING (what SoftHSM and OpenSC emit)."""
    key = serialization.load_der_public_key(public_key_der)
    if isinstance(key, ec.EllipticCurvePublicKey):
        raw = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    else:
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if len(raw) < 0x80:
        return bytes((0x04, len(raw))) + raw
    return bytes((0x04, 0x81, len(raw))) + raw


@dataclass(frozen=True)
class KeyObjects:
    """The two objects one key shows, as attribute maps."""

    label: str
    algorithm: Algorithm
    private: Mapping[int, AttributeValue]
    public: Mapping[int, AttributeValue]


def key_objects(
    label: str, algorithm: Algorithm, public_key_der: bytes, operations: frozenset[str]
) -> KeyObjects:
    """Build the objects of one key from what the engine shows of it."""
    can_sign = "sign" in operations and algorithm.can_sign
    mechanisms = SIGN_MECHANISMS.get(algorithm, ())
    common: dict[int, AttributeValue] = {
        ck.CKA_TOKEN: True,
        ck.CKA_LABEL: label.encode("utf-8"),
        # The label is the key's name in the service: as CKA_ID it lets tools pair the
        # public and private objects (pkcs11-tool --id, RFC 7512 id=).
        ck.CKA_ID: label.encode("utf-8"),
        ck.CKA_KEY_TYPE: _KEY_TYPES[algorithm],
        ck.CKA_EC_PARAMS: _EC_PARAMS[algorithm],
        ck.CKA_EC_POINT: _ec_point(algorithm, public_key_der),
        ck.CKA_PUBLIC_KEY_INFO: public_key_der,
        ck.CKA_MODIFIABLE: False,
        ck.CKA_COPYABLE: False,
        ck.CKA_DESTROYABLE: False,
        ck.CKA_ENCRYPT: False,
        ck.CKA_DECRYPT: False,
        ck.CKA_WRAP: False,
        ck.CKA_UNWRAP: False,
        ck.CKA_SIGN_RECOVER: False,
        ck.CKA_VERIFY_RECOVER: False,
        # Key agreement is not offered through this front (it would have to hand out the
        # shared secret as a new object): the HTTP front does ECDH.
        ck.CKA_DERIVE: False,
    }
    private = dict(common)
    private.update(
        {
            ck.CKA_CLASS: ck.CKO_PRIVATE_KEY,
            ck.CKA_PRIVATE: True,
            ck.CKA_SENSITIVE: True,
            ck.CKA_ALWAYS_SENSITIVE: True,
            ck.CKA_EXTRACTABLE: False,
            ck.CKA_NEVER_EXTRACTABLE: True,
            ck.CKA_SIGN: can_sign,
            ck.CKA_ALWAYS_AUTHENTICATE: False,
            ck.CKA_WRAP_WITH_TRUSTED: False,
            ck.CKA_ALLOWED_MECHANISMS: mechanisms if can_sign else (),
        }
    )
    public = dict(common)
    public.update(
        {
            ck.CKA_CLASS: ck.CKO_PUBLIC_KEY,
            ck.CKA_PRIVATE: False,
            ck.CKA_VERIFY: can_sign,
        }
    )
    return KeyObjects(label, algorithm, private, public)
