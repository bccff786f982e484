"""Operator approvals: FIDO2 assertions over the capability about to be signed.

An issuance rule with ``require = ["approval"]`` and ``approvals = M`` needs M distinct
registered approvers to each make a WebAuthn assertion whose challenge is the digest of
the capability's claims (:func:`approval_challenge`).  The assertions travel in the
capability's evidence (``evd.approvals``), and any verifier holding the approver
registry can check them again (:func:`verify_capability_approvals`).

Verification is WebAuthn assertion verification (Web Authentication Level 2, §7.2)
minus what needs server state: the client data type, challenge and origin, the RP ID
hash, the UP (and, when asked, UV) flag, and the signature over
``authenticatorData ‖ SHA-256(clientDataJSON)`` with the approver's *registered* public
key.  The signature counter is not checked (it needs per-credential state); the
challenge binds the exact claims, including their random ``jti``, so an approval
cannot be reused for another capability.

Verifying needs only ``cryptography``; asking an authenticator for an approval
(:func:`request_approval`) needs python-fido2, the ``fido2`` extra.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from janus_hsm.algorithms import Algorithm
from janus_hsm.atomic_file import replace_file
from janus_hsm.public_keys import (
    PublicKey,
    PublicKeyFormatError,
    algorithm_of,
    b64url_decode,
    b64url_encode,
    from_jwk,
    public_key_from_raw,
    raw_public_bytes,
    to_jwk,
)
from policies.errors import FormatError, PolicyError, PolicyViolationError
from policies.jws import canonical_json, strict_json

if TYPE_CHECKING:
    from policies.capability import Capability

__all__ = [
    "APPROVERS_TYP",
    "MAX_APPROVERS_FILE",
    "Approval",
    "ApprovalRequestError",
    "Approver",
    "ApproverSet",
    "approval_challenge",
    "request_approval",
    "verify_approvals",
    "verify_capability_approvals",
]

APPROVERS_TYP: Final = "janus-approvers/1"
#: The evidence member (``evd.approvals``) the approvals travel in.
EVIDENCE_KEY: Final = "approvals"
MAX_CREDENTIAL_ID: Final = 1023  # WebAuthn: credential ids are at most 1023 bytes
_MAX_CLIENT_DATA: Final = 4096
_MAX_AUTH_DATA: Final = 1024
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", re.ASCII)
_FLAG_UP: Final = 0x01
_FLAG_UV: Final = 0x04
_APPROVER_KEYS = frozenset({"id", "credential_id", "public_key", "rp_id"})
_APPROVAL_KEYS = frozenset(
    {"approver_id", "credential_id", "authenticator_data", "client_data_json", "signature"}
)
# COSE (RFC 9053): kty 2 = EC2 with crv 1 P-256 / 2 P-384; kty 1 = OKP with crv 6 Ed25519.
_COSE_EC2 = {1: Algorithm.ES256, 2: Algorithm.ES384}
_COSE_ALG = {Algorithm.ES256: -7, Algorithm.ES384: -35, Algorithm.EdDSA: -8}


class ApprovalRequestError(PolicyError):
    """The authenticator gave no approval: presence denied, timed out, unknown credential,
    PIN needed… The message says which, as far as the authenticator told."""

    code = "approval_failed"


# --------------------------------------------------------------------------- registry


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a base64url string")
    try:
        return b64url_decode(value)
    except PublicKeyFormatError as exc:
        raise FormatError(f"{what}: {exc}") from None


def _public_key(value: Any, what: str) -> PublicKey:
    """A COSE key (int labels, as fido2's ``CoseKey``), a JWK (str members) or a
    ``cryptography`` public key, as a ``cryptography`` key that can verify assertions."""
    if isinstance(value, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        key: PublicKey = value
    elif isinstance(value, Mapping) and value and all(isinstance(k, int) for k in value):
        key = _from_cose(value, what)
    elif isinstance(value, Mapping):
        try:
            key = from_jwk(dict(value))
        except PublicKeyFormatError as exc:
            raise FormatError(f"{what}: {exc}") from None
    else:
        raise FormatError(f"{what} must be a COSE key or a JWK")
    if algorithm_of(key) not in _COSE_ALG:
        raise FormatError(f"{what}: {algorithm_of(key).value} keys cannot sign assertions")
    return key


def _from_cose(cose: Mapping[Any, Any], what: str) -> PublicKey:
    try:
        kty, crv = cose[1], cose[-1]
        if kty == 2 and crv in _COSE_EC2:
            alg = _COSE_EC2[crv]
            x, y = bytes(cose[-2]), bytes(cose[-3])
            if len(x) != alg.coordinate_size or len(y) != alg.coordinate_size:
                raise FormatError(f"{what}: COSE coordinates have the wrong length")
            return public_key_from_raw(alg, b"\x04" + x + y)
        if kty == 1 and crv == 6:
            return public_key_from_raw(Algorithm.EdDSA, bytes(cose[-2]))
    except (KeyError, TypeError) as exc:
        raise FormatError(f"{what}: incomplete COSE key ({exc})") from None
    except (PublicKeyFormatError, ValueError) as exc:
        raise FormatError(f"{what}: {exc}") from None
    raise FormatError(f"{what}: unsupported COSE key (kty {kty!r}, crv {crv!r})")


@dataclass(frozen=True)
class Approver:
    """A person's registered FIDO2 credential: who approves, with which key, for which RP.

    ``public_key`` may be given as a COSE key (e.g. ``AttestedCredentialData.public_key``
    from registration), a JWK or a ``cryptography`` key; it is kept as the latter.
    """

    id: str
    credential_id: bytes
    public_key: Any
    rp_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise FormatError(
                f"approver id {self.id!r} must be 1-64 letters, digits, '.', '_', '@' or '-'"
            )
        what = f"approver {self.id!r}"
        if not isinstance(self.credential_id, bytes | bytearray) or not (
            1 <= len(self.credential_id) <= MAX_CREDENTIAL_ID
        ):
            raise FormatError(f"{what}: credential_id must be 1-{MAX_CREDENTIAL_ID} bytes")
        object.__setattr__(self, "credential_id", bytes(self.credential_id))
        object.__setattr__(self, "public_key", _public_key(self.public_key, f"{what}: public_key"))
        if not isinstance(self.rp_id, str) or not self.rp_id or len(self.rp_id) > 253:
            raise FormatError(f"{what}: rp_id must be a non-empty string")

    @property
    def key(self) -> PublicKey:
        key: PublicKey = self.public_key
        return key

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "credential_id": b64url_encode(self.credential_id),
            "public_key": to_jwk(self.key),
            "rp_id": self.rp_id,
        }

    @classmethod
    def from_json(cls, obj: Any, *, what: str = "approver") -> Approver:
        if not isinstance(obj, dict):
            raise FormatError(f"{what} must be an object")
        if set(obj) != _APPROVER_KEYS:
            raise FormatError(f"{what} must have exactly {', '.join(sorted(_APPROVER_KEYS))}")
        if not isinstance(obj["public_key"], dict):
            raise FormatError(f"{what}: public_key must be a JWK object")
        return cls(
            id=obj["id"],
            credential_id=_b64(obj["credential_id"], f"{what}: credential_id"),
            public_key=obj["public_key"],
            rp_id=obj["rp_id"],
        )


#: The largest approver registry read (thousands of approvers fit in it).
MAX_APPROVERS_FILE = 1 << 20


@dataclass(frozen=True)
class ApproverSet:
    """The N registered approvers.  Ids, credential ids and public keys are unique, so
    one person's key can never be counted under two names."""

    approvers: tuple[Approver, ...] = ()

    def __post_init__(self) -> None:
        approvers = tuple(self.approvers)
        object.__setattr__(self, "approvers", approvers)
        for kind, values in (
            ("id", [a.id for a in approvers]),
            ("credential id", [a.credential_id for a in approvers]),
            ("public key", [raw_public_bytes(a.key) for a in approvers]),
        ):
            if len(set(values)) != len(values):
                raise FormatError(f"approvers: the same {kind} is registered twice")

    def __iter__(self) -> Iterator[Approver]:
        return iter(self.approvers)

    def __len__(self) -> int:
        return len(self.approvers)

    def get(self, approver_id: str) -> Approver | None:
        return next((a for a in self.approvers if a.id == approver_id), None)

    def with_approver(self, approver: Approver) -> ApproverSet:
        return ApproverSet((*self.approvers, approver))

    def without(self, approver_id: str) -> ApproverSet:
        if self.get(approver_id) is None:
            raise FormatError(f"no approver {approver_id!r}")
        return ApproverSet(tuple(a for a in self.approvers if a.id != approver_id))

    def to_json(self) -> str:
        return json.dumps(
            {"typ": APPROVERS_TYP, "approvers": [a.to_json() for a in self.approvers]}, indent=1
        )

    @classmethod
    def loads(cls, data: bytes | str, *, source: str = "<approvers>") -> ApproverSet:
        raw = data.encode() if isinstance(data, str) else data
        obj = strict_json(raw, source)
        if set(obj) != {"typ", "approvers"} or obj["typ"] != APPROVERS_TYP:
            raise FormatError(
                f"{source}: not an approver registry (expected typ {APPROVERS_TYP!r}, approvers)"
            )
        entries = obj["approvers"]
        if not isinstance(entries, list):
            raise FormatError(f"{source}: 'approvers' must be an array")
        return cls(
            tuple(
                Approver.from_json(entry, what=f"{source}: approver #{i}")
                for i, entry in enumerate(entries, start=1)
            )
        )

    @classmethod
    def load(cls, path: str | PathLike[str]) -> ApproverSet:
        """Read a registry file of at most :data:`MAX_APPROVERS_FILE` bytes."""
        try:
            with Path(path).open("rb") as f:
                data = f.read(MAX_APPROVERS_FILE + 1)
        except OSError as exc:
            raise FormatError(f"{path}: cannot read the approvers: {exc.strerror}") from exc
        if len(data) > MAX_APPROVERS_FILE:
            raise FormatError(
                f"{path}: larger than {MAX_APPROVERS_FILE} bytes, not an approver registry"
            )
        return cls.loads(data, source=str(path))

    def save(self, path: str | PathLike[str]) -> None:
        """Replace ``path`` atomically with this registry, mode 0600."""
        replace_file(path, self.to_json().encode() + b"\n")


# --------------------------------------------------------------------------- approvals


def approval_challenge(claims: Mapping[str, Any]) -> bytes:
    """SHA-256 of the canonical JSON of ``claims`` without ``evd``.

    The evidence is left out because the approvals themselves go into it; everything
    else the key signs (issuer, audience, abilities, limits, times, proofs, the random
    ``jti``) is bound.
    """
    unsigned = {name: value for name, value in claims.items() if name != "evd"}
    return hashlib.sha256(canonical_json(unsigned)).digest()


@dataclass(frozen=True)
class Approval:
    """One approver's WebAuthn assertion over :func:`approval_challenge` of a capability."""

    approver_id: str
    credential_id: bytes
    authenticator_data: bytes
    client_data_json: bytes
    signature: bytes

    def to_json(self) -> dict[str, str]:
        return {
            "approver_id": self.approver_id,
            "credential_id": b64url_encode(self.credential_id),
            "authenticator_data": b64url_encode(self.authenticator_data),
            "client_data_json": b64url_encode(self.client_data_json),
            "signature": b64url_encode(self.signature),
        }

    @classmethod
    def from_json(cls, obj: Any, *, what: str = "approval") -> Approval:
        if not isinstance(obj, dict):
            raise FormatError(f"{what} must be an object")
        if set(obj) != _APPROVAL_KEYS:
            raise FormatError(f"{what} must have exactly {', '.join(sorted(_APPROVAL_KEYS))}")
        if not isinstance(obj["approver_id"], str) or not obj["approver_id"]:
            raise FormatError(f"{what}: approver_id must be a non-empty string")
        return cls(
            approver_id=obj["approver_id"],
            credential_id=_b64(obj["credential_id"], f"{what}: credential_id"),
            authenticator_data=_b64(obj["authenticator_data"], f"{what}: authenticator_data"),
            client_data_json=_b64(obj["client_data_json"], f"{what}: client_data_json"),
            signature=_b64(obj["signature"], f"{what}: signature"),
        )


def request_approval(
    client_or_ctap: Any,
    approver: Approver,
    claims: Mapping[str, Any],
    *,
    rp_id: str,
    origin: str,
    user_verification: str = "discouraged",
    prompt: Callable[[Approver], None] | None = None,
) -> Approval:
    """Ask ``approver``'s authenticator for an assertion over ``claims``.

    ``client_or_ctap`` is a python-fido2 ``Fido2Client`` (its client data collector sets
    the origin, and it handles the PIN for user verification) or a raw ``Ctap2`` (the
    client data is built here with ``origin``; user verification is not available).
    ``prompt`` is called before the authenticator is asked, to tell the person to
    touch their key; printing it is the caller's job.  A refusal (presence denied,
    timeout, unknown credential…) is an :class:`ApprovalRequestError`.
    """
    try:
        from fido2.client import ClientError, WebAuthnClient
        from fido2.ctap import CtapError
        from fido2.ctap2.base import Ctap2
        from fido2.webauthn import (
            CollectedClientData,
            PublicKeyCredentialDescriptor,
            PublicKeyCredentialRequestOptions,
            PublicKeyCredentialType,
            UserVerificationRequirement,
        )
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "requesting FIDO2 approvals needs python-fido2: install janus-hsm[fido2]"
        ) from exc

    if approver.rp_id != rp_id:
        raise FormatError(f"approver {approver.id!r} is registered for {approver.rp_id!r}")
    challenge = approval_challenge(claims)
    uv = UserVerificationRequirement(user_verification)
    if prompt is not None:
        prompt(approver)
    try:
        if isinstance(client_or_ctap, WebAuthnClient):
            options = PublicKeyCredentialRequestOptions(
                challenge=challenge,
                rp_id=rp_id,
                allow_credentials=[
                    PublicKeyCredentialDescriptor(
                        type=PublicKeyCredentialType.PUBLIC_KEY, id=approver.credential_id
                    )
                ],
                user_verification=uv,
            )
            response = client_or_ctap.get_assertion(options).get_response(0)
            return Approval(
                approver_id=approver.id,
                credential_id=bytes(response.raw_id),
                authenticator_data=bytes(response.response.authenticator_data),
                client_data_json=bytes(response.response.client_data),
                signature=bytes(response.response.signature),
            )
        if isinstance(client_or_ctap, Ctap2):
            if uv is UserVerificationRequirement.REQUIRED:
                raise FormatError("user verification needs a Fido2Client (it collects the PIN)")
            client_data = CollectedClientData.create(
                type=CollectedClientData.TYPE.GET, challenge=challenge, origin=origin
            )
            assertion = client_or_ctap.get_assertion(
                rp_id,
                client_data.hash,
                allow_list=[{"type": "public-key", "id": approver.credential_id}],
            )
            return Approval(
                approver_id=approver.id,
                credential_id=bytes(assertion.credential["id"]),
                authenticator_data=bytes(assertion.auth_data),
                client_data_json=bytes(client_data),
                signature=bytes(assertion.signature),
            )
    except ClientError as exc:
        cause = exc.cause if isinstance(exc.cause, CtapError) else exc
        raise ApprovalRequestError(
            f"approver {approver.id!r} gave no approval: {_describe(cause)}"
        ) from exc
    except CtapError as exc:
        raise ApprovalRequestError(
            f"approver {approver.id!r} gave no approval: {_describe(exc)}"
        ) from exc
    raise TypeError("request_approval needs a fido2 Fido2Client or Ctap2")


def _describe(exc: Exception) -> str:
    from fido2.ctap import CtapError

    if isinstance(exc, CtapError):
        err = CtapError.ERR
        known = {
            err.OPERATION_DENIED: "user presence denied",
            err.USER_ACTION_TIMEOUT: "timed out waiting for a touch",
            err.NO_CREDENTIALS: "the key does not hold the registered credential",
            err.PIN_BLOCKED: "the PIN is blocked",
            err.PUAT_REQUIRED: "a PIN is required",
        }
        return known.get(exc.code, str(exc))
    return str(exc)


# --------------------------------------------------------------------------- verification


def verify_approvals(
    approvals: Iterable[Approval],
    approvers: ApproverSet,
    claims: Mapping[str, Any],
    *,
    required: int,
    require_uv: bool = False,
    origin: str,
    rp_id: str,
) -> list[str]:
    """Check each approval as a WebAuthn assertion over ``claims``; return the ids of
    the distinct approvers whose approval is valid, in order.  Fewer than ``required``
    → :class:`PolicyViolationError` saying how many were valid and why the others
    were not."""
    if not isinstance(required, int) or isinstance(required, bool) or required < 1:
        raise FormatError("required approvals must be a positive integer")
    challenge = approval_challenge(claims)
    rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
    counted: list[str] = []
    problems: list[str] = []
    for index, approval in enumerate(approvals):
        if not isinstance(approval, Approval):
            raise FormatError(f"approval #{index} is not an Approval")
        name = f"approval #{index} ({approval.approver_id!r})"
        reason = _assertion_problem(
            approval, approvers, challenge, rp_id_hash, rp_id, origin, require_uv
        )
        if reason is not None:
            problems.append(f"{name}: {reason}")
        elif approval.approver_id in counted:
            problems.append(f"{name}: the same approver again counts once")
        else:
            counted.append(approval.approver_id)
    if len(counted) < required:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise PolicyViolationError(
            f"{len(counted)} valid approval(s) from distinct approvers, {required} required"
            + detail
        )
    return counted


def _assertion_problem(
    approval: Approval,
    approvers: ApproverSet,
    challenge: bytes,
    rp_id_hash: bytes,
    rp_id: str,
    origin: str,
    require_uv: bool,
) -> str | None:
    """Why ``approval`` is not a valid assertion over ``challenge``, or None if it is."""
    approver = approvers.get(approval.approver_id)
    if approver is None:
        return "not a registered approver"
    if not hmac.compare_digest(approval.credential_id, approver.credential_id):
        return "not the approver's registered credential"
    if approver.rp_id != rp_id:
        return f"the approver is registered for {approver.rp_id!r}, not {rp_id!r}"
    if len(approval.client_data_json) > _MAX_CLIENT_DATA:
        return "client data too large"
    try:
        client_data = strict_json(approval.client_data_json, "client data")
    except FormatError as exc:
        return str(exc)
    if client_data.get("type") != "webauthn.get":
        return "client data type is not 'webauthn.get'"
    try:
        signed_challenge = _b64(client_data.get("challenge"), "client data challenge")
    except FormatError as exc:
        return str(exc)
    if not hmac.compare_digest(signed_challenge, challenge):
        return "the challenge is not the digest of this capability"
    if client_data.get("origin") != origin:
        return f"origin {client_data.get('origin')!r} is not {origin!r}"
    if client_data.get("crossOrigin", False) is not False:
        return "a cross-origin assertion"
    auth_data = approval.authenticator_data
    if not 37 <= len(auth_data) <= _MAX_AUTH_DATA:
        return "authenticator data has the wrong length"
    if not hmac.compare_digest(auth_data[:32], rp_id_hash):
        return f"the RP ID hash is not that of {rp_id!r}"
    flags = auth_data[32]
    if not flags & _FLAG_UP:
        return "user presence (UP) flag not set"
    if require_uv and not flags & _FLAG_UV:
        return "user verification required, but the UV flag is not set"
    message = auth_data + hashlib.sha256(approval.client_data_json).digest()
    if not _signature_valid(approver.key, message, approval.signature):
        return "the signature does not verify with the approver's registered key"
    return None


def _signature_valid(key: PublicKey, message: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            hash_alg = hashes.SHA384() if key.curve.key_size == 384 else hashes.SHA256()
            key.verify(signature, message, ec.ECDSA(hash_alg))  # WebAuthn: DER ECDSA
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def approvals_evidence(approvals: Sequence[Approval]) -> list[dict[str, str]]:
    """The ``evd.approvals`` member for ``approvals``."""
    return [a.to_json() for a in approvals]


def capability_approvals(capability: Capability) -> list[Approval]:
    """The approvals a capability carries in ``evd.approvals`` ([] when none)."""
    evidence = capability.evidence or {}
    if EVIDENCE_KEY not in evidence:
        return []
    entries = evidence[EVIDENCE_KEY]
    if not isinstance(entries, list):
        raise FormatError("'evd.approvals' must be an array")
    return [Approval.from_json(e, what=f"evd.approvals[{i}]") for i, e in enumerate(entries)]


def verify_capability_approvals(
    capability: Capability,
    approvers: ApproverSet,
    required: int,
    *,
    require_uv: bool = False,
    origin: str,
    rp_id: str,
) -> list[str]:
    """Re-check the approvals a capability carries against its own claims.

    Only the approvals are checked here; the capability's signature and chain are the
    :class:`~policies.verify.Verifier`'s job.
    """
    return verify_approvals(
        capability_approvals(capability),
        approvers,
        capability.jws.payload,
        required=required,
        require_uv=require_uv,
        origin=origin,
        rp_id=rp_id,
    )
