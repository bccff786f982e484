"""The errors of capabilities, policy and the ledger.

Verification failures name the link (0 = root) and the reason, because "invalid
token" tells an operator nothing.  ``code`` is stable for scripts and HTTP APIs.
"""

from __future__ import annotations


class PolicyError(Exception):
    """Base class of every error in ``policies``."""

    code = "policy_error"


class FormatError(PolicyError, ValueError):
    """A capability, bundle, invocation, revocation or caveat is malformed."""

    code = "bad_format"


class VerificationError(PolicyError):
    """A capability chain or invocation does not verify.

    ``link`` is the index of the offending link in the chain (0 = root), or None when
    the failure is not about one link (e.g. the invocation).
    """

    code = "invalid"

    def __init__(self, message: str, *, link: int | None = None) -> None:
        where = f"link {link}: " if link is not None else ""
        super().__init__(where + message)
        self.link = link
        self.reason = message


class SignatureInvalidError(VerificationError):
    code = "bad_signature"


class AlgorithmRefusedError(VerificationError):
    """alg none, HMAC, an unknown alg, or an alg that does not match the key."""

    code = "alg_refused"


class LinkageError(VerificationError):
    """A link's issuer is not its parent's audience, or proofs do not match."""

    code = "broken_chain"


class RootMismatchError(VerificationError):
    code = "wrong_root"


class AttenuationError(VerificationError):
    """A link grants more than its parent: wider ability, later expiry, larger limits."""

    code = "not_attenuated"


class ExpiredError(VerificationError):
    code = "expired"


class NotYetValidError(VerificationError):
    code = "not_yet_valid"


class RevokedError(VerificationError):
    code = "revoked"


class CaveatFailedError(VerificationError):
    code = "caveat_failed"


class NotAuthorizedError(VerificationError):
    """The invocation asks for an action/resource the capability does not grant."""

    code = "not_authorized"


class WrongHolderError(VerificationError):
    """The invocation is not signed by the capability's audience key."""

    code = "wrong_holder"


class ChainLimitError(VerificationError):
    """Too many links, or too many bytes."""

    code = "too_large"


class LimitExceededError(PolicyError):
    """The ledger refused a use: no uses left on some link."""

    code = "uses_exhausted"

    def __init__(self, message: str, *, link: int | None = None) -> None:
        super().__init__(message)
        self.link = link


class RateLimitedError(LimitExceededError):
    code = "rate_limited"


class ReplayError(PolicyError):
    """The invocation's nonce was seen before."""

    code = "replayed"


class PolicyViolationError(PolicyError):
    """A grant request is outside the issuance policy; the message names the rule."""

    code = "outside_policy"

    def __init__(self, message: str, *, rule: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule


class LedgerError(PolicyError):
    """The ledger's store failed (database unreachable, corrupt…)."""

    code = "ledger_error"


class LedgerNotFoundError(LedgerError):
    """A command that only reads a ledger was pointed at one that does not exist.

    Opening it would create an empty ledger, in which nothing is revoked and the audit
    log is empty: a mistyped path must not read as a clean record.
    """

    code = "ledger_not_found"


class AuditError(PolicyError):
    """The audit log does not verify; the message names the first broken entry."""

    code = "audit_broken"

    def __init__(self, message: str, *, entry: int | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class AttestationRequiredError(VerificationError):
    """The verifier requires the root key to be attested as born in hardware, and the
    root capability's evidence does not prove it (missing, untrusted, or another key)."""

    code = "root_not_attested"
