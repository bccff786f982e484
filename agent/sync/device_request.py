"""A new device's join request: its keys and name, signed by its own device key, and the
short code the user compares on both devices."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Final

from agent.sync.device_errors import ExpiredJoinRequestError, MalformedJoinRequestError
from agent.sync.device_format import (
    AGREEMENT_ALGS,
    NONCE,
    REQUEST_FIELDS,
    REQUEST_TYP,
    SIGNING_ALGS,
    check_did,
    check_fields,
    check_int,
    check_name,
    detached_header,
    detached_input,
    sign_detached,
    verify_detached,
)
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies.errors import PolicyError
from policies.jws import parse_compact

#: How long a join request may wait for its approval, and the clock skew tolerated.
REQUEST_LIFETIME: Final = 24 * 3600
CLOCK_SKEW: Final = 300


def short_code(compact: str) -> str:
    """The code both devices show for a join request: 12 digits (40 bits of its hash).

    Whoever swaps the request on its way must make one of their own with the same code:
    about 2^40 key generations and signatures, far beyond an approval's few minutes.
    """
    number = int.from_bytes(hashlib.sha256(compact.encode("ascii")).digest()[:5], "big")
    digits = f"{number:012d}"
    return f"{digits[0:4]} {digits[4:8]} {digits[8:12]}"


def same_code(given: str, expected: str) -> bool:
    """Codes compared as their digits, whatever spaces or dashes were typed."""
    return re.sub(r"[\s-]", "", given) == re.sub(r"[\s-]", "", expected)


@dataclass(frozen=True)
class JoinRequest:
    """A new device asking to join: its keys and name, signed by its own device key."""

    device: str
    agreement: str
    name: str
    nonce: str
    requested: int
    proof: bytes

    def payload(self) -> dict[str, Any]:
        return {
            "iss": self.device,
            "agreement": self.agreement,
            "name": self.name,
            "nonce": self.nonce,
            "iat": self.requested,
        }

    @property
    def compact(self) -> str:
        header = detached_header(self.device, REQUEST_TYP)
        return detached_input(header, self.payload()).decode() + "." + b64url_encode(self.proof)

    @property
    def code(self) -> str:
        return short_code(self.compact)

    @classmethod
    def sign(cls, device: KeyHandle, agreement: KeyHandle, name: str, *, now: int) -> JoinRequest:
        check_name(name, MalformedJoinRequestError)
        nonce = b64url_encode(os.urandom(16))
        draft = cls(device.did, agreement.did, name, nonce, now, b"")
        signed = sign_detached(device, REQUEST_TYP, draft.payload())
        return replace(draft, proof=signed.signature)

    @classmethod
    def parse(cls, compact: object) -> JoinRequest:
        """A join request from outside, once its format and its own signature check out.

        Its header and payload must be in the canonical form Janus signs (so the request
        can later be carried as a detached signature in the list).
        """
        error = MalformedJoinRequestError
        if not isinstance(compact, str):
            raise error("a join request must be a compact JWS string")
        try:
            parsed = parse_compact(compact.strip(), typ=REQUEST_TYP, what="join request")
        except PolicyError as exc:
            raise error(str(exc)) from None
        request = cls.from_fields(parsed.payload, parsed.signature, error=error)
        if parsed.header != detached_header(request.device, REQUEST_TYP) or (
            parsed.signing_input != detached_input(parsed.header, parsed.payload)
        ):
            raise error("the join request is not in the canonical form Janus signs")
        request.check_signature()
        return request

    @classmethod
    def from_fields(
        cls, payload: dict[str, Any], proof: bytes, *, error: type[Exception]
    ) -> JoinRequest:
        check_fields(payload, REQUEST_FIELDS, "join request", error)
        nonce = payload["nonce"]
        if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
            raise error("a join request's nonce must be 16 bytes of base64url")
        return cls(
            device=check_did(payload["iss"], "the device key", SIGNING_ALGS, error),
            agreement=check_did(payload["agreement"], "the agreement key", AGREEMENT_ALGS, error),
            name=check_name(payload["name"], error),
            nonce=nonce,
            requested=check_int(payload["iat"], "iat", error),
            proof=proof,
        )

    def check_signature(self) -> None:
        verify_detached(self.device, REQUEST_TYP, self.payload(), self.proof, "join request")

    def check_fresh(self, now: float) -> None:
        if not self.requested - CLOCK_SKEW <= now <= self.requested + REQUEST_LIFETIME:
            raise ExpiredJoinRequestError(
                "the join request is expired or dated in the future: make a new one on the "
                "joining device (`janus device request`)"
            )
