"""The refusals of a cloud agent on an event bus: each a stable code a client can act on.

They say *why* a use was not served although nothing was wrong with it: the agent is
not sure enough of the revocation state, is overloaded, or cannot reach the ledger that
counts the capability.  A client may retry each of them later.
"""

from __future__ import annotations

from agent.errors import AgentError


class CatchingUpError(AgentError):
    """The agent is reading the events it missed (start-up, reconnection)."""

    code = "catching_up"
    status = 503


class StaleRevocationStateError(AgentError):
    """No contact with the bus for longer than the staleness bound: a revocation may
    have been missed, so uses that must be exact are refused (failing closed)."""

    code = "revocation_state_stale"
    status = 503


class HomeLedgerUnreachableError(AgentError):
    """The capability's home ledger did not answer in time (or no bus leads there)."""

    code = "home_ledger_unreachable"
    status = 503


class OverloadedError(AgentError):
    """More uses are waiting than the agent's queue bound: shed, never skipped checks."""

    code = "overloaded"
    status = 429


class HomeLedgerRefusedError(AgentError):
    """The home ledger refused the use; ``code`` and ``status`` are its refusal's."""

    code = "home_ledger_refused"
    status = 403

    def __init__(self, message: str, *, code: str, status: int, link: int | None) -> None:
        super().__init__(message)
        # The home's own code (limit_exceeded, replay, revoked…), so a client sees the
        # same refusal wherever it sent the use.
        self.code = code
        self.status = status if 400 <= status < 600 else 403
        self.link = link
