"""The HSM service's errors: one base class, each subclass a stable ``code``.

Both fronts (HTTP and p11-kit RPC) translate these and nothing else, so the reason a
request was refused is decided once, here, and reads the same on either path.  No
message ever carries a PIN, a payload or an approval's bytes.
"""

from __future__ import annotations

from typing import Final

from agent.errors import AgentError

#: Why :class:`Refused` refused, one of these (a public contract: fronts and clients
#: branch on it).
REFUSAL_REASONS: Final = frozenset(
    {
        "unknown_key",
        "client_not_allowed",
        "operation_not_allowed",
        "key_state",
        "max_uses",
        "rate_limited",
        "quorum_required",
        "quorum_invalid",
        "approval_reused",
    }
)

# The HTTP status a refusal maps to: a key the client may not see is "not found" (the
# same answer as a key that does not exist, so clients cannot probe for labels).
_STATUS: Final = {"unknown_key": 404, "rate_limited": 429}


class HsmServiceError(AgentError):
    """Base class of the HSM service's errors."""

    code = "hsm_service_error"
    status = 500


class ConfigError(HsmServiceError):
    """The configuration (or a policy change) is not acceptable.  ``source`` names the
    file and ``field`` the setting (``key.signer.quorum.m``), so an operator can fix it
    without reading code."""

    code = "bad_hsm_config"
    status = 400

    def __init__(self, message: str, *, source: str = "", field: str = "") -> None:
        where = ": ".join(part for part in (source, field) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.field = field


class InvalidRequest(HsmServiceError):
    """An operation request that is malformed (not a refusal by policy: nothing was
    decided, nothing is audited)."""

    code = "bad_hsm_request"
    status = 400


class Refused(HsmServiceError):
    """The policy refused the operation; the refusal was audited.  ``reason`` is one of
    :data:`REFUSAL_REASONS`."""

    code = "hsm_refused"
    status = 403

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.status = _STATUS.get(reason, 403)


class AuditUnavailable(HsmServiceError):
    """The decision could not be appended to the audit log: the operation did not run."""

    code = "audit_unavailable"
    status = 503


class TokenUnavailable(HsmServiceError):
    """The token could not be reached, even after re-opening its session once."""

    code = "token_unavailable"
    status = 503
