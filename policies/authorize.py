"""The one call a service makes per request: verify, then spend.

Verification alone proves the invocation is authentic; only the ledger can say the
nonce is fresh, no link is used up and nothing was revoked a moment ago.  Doing both
here, in this order, means a service cannot forget the second half.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.capability import Bundle
from policies.invocation import Invocation
from policies.ledger.aio import AsyncSpender
from policies.ledger.base import Ledger, SpendReceipt, SpendRequest
from policies.verify import DEFAULT_SKEW, Authorization, Verifier


@dataclass(frozen=True)
class Grant:
    """A use that verified and was counted: the evidence and the ledger's receipt."""

    authorization: Authorization
    receipt: SpendReceipt


def authorize(
    verifier: Verifier,
    ledger: Ledger,
    bundle: Bundle | str | bytes,
    invocation: Invocation | str,
    request: Mapping[str, Any],
    *,
    now: float,
    skew: int = DEFAULT_SKEW,
    root: str | None = None,
    audience: str | None = None,
) -> Grant:
    """Verify ``invocation`` under ``bundle`` for ``request`` and record one use.

    Raises a VerificationError subclass (nothing recorded), or ReplayError /
    LimitExceededError / RateLimitedError / RevokedError from the ledger (nothing
    recorded either: the ledger's transaction is all or nothing).
    """
    authorization = verifier.verify(
        bundle, invocation, request, now=now, skew=skew, root=root, audience=audience
    )
    return Grant(authorization, ledger.spend_one(spend_request(authorization, now=now, skew=skew)))


async def authorize_async(
    verifier: Verifier,
    spender: AsyncSpender,
    bundle: Bundle | str | bytes,
    invocation: Invocation | str,
    request: Mapping[str, Any],
    *,
    now: float,
    skew: int = DEFAULT_SKEW,
    root: str | None = None,
    audience: str | None = None,
) -> Grant:
    """``authorize`` on an event loop: verify here, then await the durable spend.

    Verification is CPU only (the chain's signatures are cached), so it runs on the
    loop; the spend joins the spender's next group commit.
    """
    authorization = verifier.verify(
        bundle, invocation, request, now=now, skew=skew, root=root, audience=audience
    )
    receipt = await spender.spend(spend_request(authorization, now=now, skew=skew))
    return Grant(authorization, receipt)


def spend_request(authorization: Authorization, *, now: float, skew: int) -> SpendRequest:
    """What the ledger records for a verified use: one per link, the nonce, the audit."""
    inv = authorization.invocation
    return SpendRequest(
        authorization.chain.link_limits(),
        nonce=inv.nonce,
        nonce_expires_at=inv.expires + skew,
        now=now,
        audit={
            "holder": inv.holder,
            "action": inv.action,
            "resource": inv.resource,
            "request": inv.digest,
        },
    )
