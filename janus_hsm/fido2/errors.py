"""Typed FIDO2 errors, each with a stable ``code``, mapped from fido2's ``CtapError``.

Why a hierarchy of our own: fido2 reports failures as ``CtapError`` codes, sometimes
wrapped in a ``ClientError`` whose code says little (``BAD_REQUEST`` covers a wrong PIN,
a blocked PIN and a denied touch alike).  An operator needs to know which of those
happened and what to do about it, and scripts need a code that does not change between
fido2 releases.  So every failure that leaves :mod:`janus_hsm.fido2` is one of these.
"""

from __future__ import annotations

from typing import Any

from janus_hsm.errors import (
    JanusHSMError,
    KeystoreError,
    PinIncorrectError,
    PinLockedError,
    UserPresenceTimeoutError,
)


class Fido2Error(JanusHSMError):
    """Base class of every FIDO2 failure."""

    code = "fido2_error"


class NoDeviceError(Fido2Error):
    """No authenticator is connected (over USB HID or PC/SC), or none of them fits."""

    code = "no_device"


class AmbiguousDeviceError(Fido2Error):
    """Several authenticators are connected and the command needs exactly one."""

    code = "ambiguous_device"


class Fido2PinBlockedError(Fido2Error, PinLockedError):
    """The PIN retry counter reached zero: only a reset (which erases every credential)
    makes the authenticator usable again."""

    code = "pin_blocked"


class Fido2PinAuthBlockedError(Fido2Error, PinLockedError):
    """Three wrong PINs in a row: unplug and replug the authenticator to try again."""

    code = "pin_auth_blocked"


class Fido2PinInvalidError(Fido2Error, PinIncorrectError):
    """The authenticator rejected the PIN; ``retries_left`` says how many tries remain."""

    code = "pin_invalid"


class Fido2PinRequiredError(Fido2Error):
    """The operation needs the PIN and no PIN source gave one, or no PIN is set."""

    code = "pin_required"


class Fido2SharedPinError(Fido2PinRequiredError):
    """One PIN (``JANUS_FIDO2_PIN`` or a pin-source file) would go to more than one
    authenticator: refused, as each wrong try spends that key's PIN retries."""

    code = "shared_pin_refused"


class PresenceTimeoutError(Fido2Error, UserPresenceTimeoutError):
    """Nobody touched the authenticator in time (the FIDO2 case of the custody error)."""

    code = "presence_timeout"


class PresenceDeniedError(Fido2Error):
    """The person at the authenticator refused (or the authenticator denied the operation)."""

    code = "presence_denied"


class UnknownCredentialError(Fido2Error):
    """The authenticator does not hold the credential asked for (wrong or reset key)."""

    code = "unknown_credential"


class Fido2UnsupportedError(Fido2Error):
    """The authenticator lacks what the operation needs (hmac-secret, PIN protocol 2…)."""

    code = "fido2_unsupported"


class CredentialExcludedError(Fido2Error):
    """Registering again on an authenticator that already holds a registered credential."""

    code = "credential_excluded"


class SoftwareDeviceRefusedError(Fido2Error):
    """A software (in-process) authenticator outside a test run: refused.  Its state
    file holds the credential keys in the clear and its "touch" is scripted."""

    code = "software_device_refused"


class Fido2RegistryError(Fido2Error):
    """The credential registry file is unreadable or malformed; nothing was changed."""

    code = "bad_registry"


class WrongCredentialError(KeystoreError):
    """An authenticator answered, but its hmac-secret does not unwrap the key: another
    authenticator with the same credential id, or an altered file.  No plaintext."""

    code = "wrong_credential"


def from_fido2_exception(exc: BaseException, *, doing: str) -> Fido2Error:
    """The typed error for a ``CtapError`` or ``ClientError`` raised while ``doing``.

    The cause of a ``ClientError`` is looked at first: fido2 wraps the authenticator's
    own status in it and the wrapper's code alone is ambiguous.
    """
    from fido2.client import ClientError, PinRequiredError
    from fido2.ctap import CtapError

    if isinstance(exc, PinRequiredError):
        return Fido2PinRequiredError(
            f"{doing}: the authenticator needs its PIN and none was given; set "
            "JANUS_FIDO2_PIN (or --pin-source FILE) for this one key, or run on a terminal "
            "to be asked for each key's PIN (PINs are never taken from argv)"
        )
    cause: Any = exc
    if isinstance(exc, ClientError):
        if isinstance(exc.cause, CtapError):
            cause = exc.cause
        elif exc.code == ClientError.ERR.TIMEOUT:
            return PresenceTimeoutError(f"{doing}: timed out waiting for a touch")
        elif exc.code == ClientError.ERR.DEVICE_INELIGIBLE:
            return UnknownCredentialError(
                f"{doing}: the authenticator does not hold the credential asked for"
            )
        elif exc.code == ClientError.ERR.CONFIGURATION_UNSUPPORTED:
            return Fido2UnsupportedError(f"{doing}: {exc.cause or 'not supported'}")
        else:
            return Fido2Error(f"{doing}: {exc.cause or exc!r}")
    if not isinstance(cause, CtapError):
        return Fido2Error(f"{doing}: {cause}")
    err = CtapError.ERR
    code = cause.code
    if code in (err.USER_ACTION_TIMEOUT, err.ACTION_TIMEOUT, err.KEEPALIVE_CANCEL):
        return PresenceTimeoutError(
            f"{doing}: timed out waiting for a touch; touch the key when it blinks"
        )
    if code == err.OPERATION_DENIED:
        return PresenceDeniedError(f"{doing}: user presence was denied at the authenticator")
    if code == err.NO_CREDENTIALS:
        return UnknownCredentialError(
            f"{doing}: the authenticator does not hold the credential asked for "
            "(another key, or this key was reset)"
        )
    if code == err.CREDENTIAL_EXCLUDED:
        return CredentialExcludedError(
            f"{doing}: this authenticator already holds a registered credential"
        )
    if code == err.PIN_BLOCKED:
        return Fido2PinBlockedError(
            f"{doing}: the authenticator's PIN is blocked (no retries left); it can only be "
            "reset, which erases its credentials: see docs/fido2.md, 'Recovering'"
        )
    if code == err.PIN_AUTH_BLOCKED:
        return Fido2PinAuthBlockedError(
            f"{doing}: too many wrong PINs in a row; unplug and replug the authenticator"
        )
    if code == err.PIN_INVALID:
        return Fido2PinInvalidError(f"{doing}: wrong PIN")
    if code in (err.PUAT_REQUIRED, err.PIN_NOT_SET):
        return Fido2PinRequiredError(f"{doing}: the authenticator needs a PIN")
    if code in (err.UNSUPPORTED_OPTION, err.UNSUPPORTED_ALGORITHM):
        return Fido2UnsupportedError(f"{doing}: the authenticator does not support this")
    return Fido2Error(f"{doing}: the authenticator answered {code.name}")


__all__ = [
    "AmbiguousDeviceError",
    "CredentialExcludedError",
    "Fido2Error",
    "Fido2PinAuthBlockedError",
    "Fido2PinBlockedError",
    "Fido2PinInvalidError",
    "Fido2PinRequiredError",
    "Fido2RegistryError",
    "Fido2SharedPinError",
    "Fido2UnsupportedError",
    "NoDeviceError",
    "PresenceDeniedError",
    "PresenceTimeoutError",
    "SoftwareDeviceRefusedError",
    "UnknownCredentialError",
    "WrongCredentialError",
    "from_fido2_exception",
]
