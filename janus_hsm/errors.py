"""The errors of key custody.

Every error carries a message that says what went wrong *and what to do*, because the
person reading it is usually an operator at a terminal with a token in hand.  Callers
that need to branch catch the specific subclass; everything derives from
:class:`JanusHSMError` so a CLI can turn any custody failure into one clean line.
"""

from __future__ import annotations


class JanusHSMError(Exception):
    """Base class of every key-custody error.

    ``code`` is a stable machine-readable identifier (used in ``--json`` output);
    the message is for people and may change between releases.
    """

    code = "custody_error"


class UriError(JanusHSMError, ValueError):
    """A key URI is malformed, or names an attribute Janus does not accept."""

    code = "bad_uri"


class PinError(JanusHSMError):
    """Base class of PIN problems."""

    code = "pin_error"


class PinUnavailableError(PinError):
    """No PIN source produced a PIN (no pin-source, no JANUS_PIN, no terminal)."""

    code = "pin_unavailable"


class PinIncorrectError(PinError):
    """The token rejected the PIN.

    ``retries_left`` is the number the token reported, or ``None`` when the token
    only says "low" / "final try" (PKCS#11 reports flags, not counts).
    """

    code = "pin_incorrect"

    def __init__(self, message: str, *, retries_left: int | None = None) -> None:
        super().__init__(message)
        self.retries_left = retries_left


class PinLockedError(PinError):
    """The PIN is blocked; it must be reset with the security officer's PIN / PUK."""

    code = "pin_locked"


class ModuleLoadError(JanusHSMError):
    """The PKCS#11 module (shared library) could not be found or loaded."""

    code = "no_module"


class TokenNotFoundError(JanusHSMError):
    """No token (or more than one) matched the URI's token attributes."""

    code = "no_token"


class KeyNotFoundError(JanusHSMError):
    """No key matched the URI."""

    code = "key_not_found"


class AmbiguousKeyError(JanusHSMError):
    """Several keys matched the URI; the URI must say which one (object= or id=)."""

    code = "ambiguous_key"


class KeyExistsError(JanusHSMError):
    """A key with this label or id already exists; Janus never creates duplicates."""

    code = "key_exists"


class MechanismUnsupportedError(JanusHSMError):
    """The token or backend cannot do this algorithm or operation."""

    code = "mechanism_unsupported"


class TokenLostError(JanusHSMError):
    """The session or the token went away and reopening it once did not help."""

    code = "token_lost"


class ExtractableKeyError(JanusHSMError):
    """A private key is, or once was, extractable, so it is not fit for custody."""

    code = "extractable_key"


class ExportRefusedError(JanusHSMError):
    """Someone asked a hardware-backed key for its private bytes."""

    code = "export_refused"


class AttestationUnavailableError(JanusHSMError):
    """The backend has no way to prove where the key was generated."""

    code = "attestation_unavailable"


class KeystoreError(JanusHSMError):
    """A software keystore file is unreadable, corrupt, or the passphrase is wrong."""

    code = "keystore_error"


class BackendError(JanusHSMError):
    """The device reported a failure Janus has no more specific name for."""

    code = "backend_error"


class UserPresenceTimeoutError(JanusHSMError):
    """The device wanted a touch (user presence) and none came before it gave up."""

    code = "presence_timeout"


class ManagementKeyError(JanusHSMError):
    """A PIV card's management key is missing, malformed or was rejected by the card."""

    code = "management_key"


class AttestationError(JanusHSMError):
    """An attestation does not prove what it claims: bad chain, wrong key, bad data."""

    code = "attestation_invalid"


class AttestationUntrustedError(AttestationError):
    """The attestation chain is well formed but ends at no trusted root."""

    code = "attestation_untrusted"


class AttestationExpiredError(AttestationError):
    """A certificate in the attestation chain is outside its validity period."""

    code = "attestation_expired"


class AttestationKeyMismatchError(AttestationError):
    """The attested public key is not the key it was presented for."""

    code = "attestation_key_mismatch"


class SubjectError(JanusHSMError, ValueError):
    """An X.509 subject name (RFC 4514) for a key's certificate request is malformed."""

    code = "bad_subject"
