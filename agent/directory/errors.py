"""The errors of the directory: each has a stable ``code`` and an HTTP status.

Everything a directory or a client parses comes from outside; every parser rejects bad
input with one of these, never with a traceback, and a rejected input changes no state.
"""

from __future__ import annotations

from agent.errors import AgentError


class DirectoryError(AgentError):
    """Base class of directory errors."""

    code = "directory_error"
    status = 400


class ProofError(DirectoryError):
    """A Merkle inclusion or consistency proof does not verify, or is malformed."""

    code = "bad_proof"


class EquivocationError(DirectoryError):
    """A directory showed two histories that cannot both be prefixes of one log.

    ``evidence`` holds the two signed tree heads (their JSON forms) that prove it.
    """

    code = "equivocation"
    status = 502

    def __init__(self, message: str, evidence: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.evidence: list[dict[str, object]] = list(evidence or [])


class TreeHeadError(DirectoryError):
    """A signed tree head is malformed, badly signed, stale, or from the future."""

    code = "bad_tree_head"


class DirectoryUnreachableError(DirectoryError):
    """The directory could not be reached, or answered something that is not its API."""

    code = "directory_unreachable"
    status = 502


class BindingNotPublishedError(DirectoryError):
    """The log binds the owner's name in an entry the owner never published."""

    code = "binding_not_published"
    status = 409

    def __init__(self, message: str, entries: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.entries: list[dict[str, object]] = list(entries or [])


class PackageError(DirectoryError):
    """A KeyPackage, a claimed prekey or an attestation is malformed or badly signed."""

    code = "bad_key_package"


class BadNameError(DirectoryError):
    """A name is malformed or outside the directory's namespace."""

    code = "bad_name"


class UnknownNameError(DirectoryError):
    """No live binding for that name in this directory."""

    code = "unknown_name"
    status = 404


class NameTakenError(DirectoryError):
    """The name is bound to another owner's root."""

    code = "name_taken"
    status = 409


class NotEnrolledError(DirectoryError):
    """The namespace's rules require the authority's grant for this name, and none was shown."""

    code = "not_enrolled"
    status = 403


class ClaimerBlockedError(DirectoryError):
    """The namespace's rules block this claimer."""

    code = "claimer_blocked"
    status = 403


class RateLimitedError(DirectoryError):
    """A per-name or per-claimer claim limit of the namespace's rules is reached."""

    code = "claim_rate_limited"
    status = 429


class RequestRefusedError(DirectoryError):
    """A signed request is badly signed, expired, replayed, or for another directory."""

    code = "bad_directory_request"
    status = 403


class RulesError(DirectoryError):
    """The namespace's rules file is malformed; the message names the line or key."""

    code = "bad_rules"


class StoreError(DirectoryError):
    """The directory's database cannot be opened or used (a URL's password is never shown)."""

    code = "directory_store"
    status = 503


class ContactError(DirectoryError):
    """A contact capability is missing, malformed, from another directory, used up or replayed."""

    code = "contact_refused"
    status = 403


class ContactReplayedError(ContactError):
    """The same first-contact invocation was presented twice."""

    code = "contact_replayed"
    status = 409


class AttestationError(DirectoryError):
    """An attestation is malformed, badly signed, expired, or its proof does not hold."""

    code = "bad_attestation"
