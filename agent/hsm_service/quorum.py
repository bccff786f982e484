"""Quorum approvals for an operation: what approvers sign, and checking what they signed.

An approval is a WebAuthn assertion (policies.approvals) whose challenge is the digest
of the *claims* below: the service's name, the operation, the key, the SHA-256 of the
payload (and the raw mechanism, when one is named), the requester, the requester's
nonce and an expiry.  So an approval answers one request at one service: another
payload, key, requester or nonce gives another digest, and the service records each
digest it acted on (audit.ServiceLog) so the same approvals never count twice.  The
approver's device shows the person these claims before they touch (`janus fido2
approve` prints them).

Counting is policies.approvals.verify_approvals: each distinct registered approver
counts once, whatever the number of assertions they made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

from agent.hsm_service.config import Quorum
from agent.hsm_service.errors import InvalidRequest, Refused
from policies.approvals import Approval, ApproverSet, approval_challenge, verify_approvals
from policies.errors import FormatError, PolicyViolationError

CLAIMS_TYP: Final = "janus-hsm-approval/1"
#: More assertions than this in one request are not a quorum but an attempt to make
#: the service verify signatures for nothing.
MAX_APPROVALS: Final = 32
MAX_NONCE: Final = 128


def operation_claims(
    *,
    service: str,
    operation: str,
    key: str,
    payload: bytes,
    requester: str,
    nonce: str,
    expires: int,
    mechanism: int | None = None,
) -> dict[str, Any]:
    """The claims an approver signs for one request (their digest is the challenge)."""
    claims: dict[str, Any] = {
        "typ": CLAIMS_TYP,
        "aud": service,
        "operation": operation,
        "key": key,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "requester": requester,
        "nonce": nonce,
        "expires": int(expires),
    }
    if mechanism is not None:
        claims["mechanism"] = int(mechanism)
    return claims


def check_approvals(
    quorum: Quorum,
    approvals: Sequence[Approval],
    claims: Mapping[str, Any],
    approvers: ApproverSet,
    *,
    rp_id: str,
    origin: str,
    now: float,
    max_ttl: int,
) -> tuple[list[str], bytes]:
    """The approvers counted and the challenge, or :class:`Refused` saying why not.

    No approval at all, or fewer valid ones than M (each valid), is
    ``quorum_required``; an approval that does not verify for *this* request (another
    request's, an unregistered approver, a wrong signature) or expired claims make
    ``quorum_invalid``.
    """
    if len(approvals) > MAX_APPROVALS:
        raise InvalidRequest(f"at most {MAX_APPROVALS} approvals per request")
    if not approvals:
        raise Refused(
            "quorum_required",
            f"{quorum.m} approval(s) from {', '.join(quorum.approvers)} are required",
        )
    nonce = claims.get("nonce")
    if not isinstance(nonce, str) or not nonce or len(nonce) > MAX_NONCE:
        raise Refused("quorum_invalid", f"a quorum request needs a nonce of 1-{MAX_NONCE} chars")
    expires = claims.get("expires")
    if not isinstance(expires, int) or expires <= now:
        raise Refused("quorum_invalid", "the approvals have expired: ask the approvers again")
    if expires > now + max_ttl:
        raise Refused("quorum_invalid", f"the approvals' expiry is more than {max_ttl} s ahead")
    eligible = ApproverSet(tuple(a for a in approvers if a.id in quorum.approvers))
    counted: list[str] = []
    problems: list[str] = []
    for index, approval in enumerate(approvals):
        if not isinstance(approval, Approval):
            raise InvalidRequest(f"approval #{index} is not an approval")
        try:
            (approver,) = verify_approvals(
                [approval], eligible, claims, required=1, origin=origin, rp_id=rp_id
            )
        except PolicyViolationError as exc:
            problems.append(f"approval #{index}: {_detail(str(exc))}")
            continue
        except FormatError as exc:
            problems.append(f"approval #{index}: {exc}")
            continue
        if approver not in counted:  # the same approver twice counts once
            counted.append(approver)
    if len(counted) >= quorum.m:
        return counted, approval_challenge(claims)
    summary = f"{len(counted)} valid approval(s) from distinct approvers, {quorum.m} required"
    if problems:
        raise Refused("quorum_invalid", f"{summary} ({'; '.join(problems)})")
    raise Refused("quorum_required", summary)


def _detail(message: str) -> str:
    """verify_approvals' reason for one approval, without its counting preamble."""
    start, end = message.find("("), message.rfind(")")
    inner = message[start + 1 : end] if 0 <= start < end else message
    return inner.split(": ", 1)[1] if inner.startswith("approval #") else inner
