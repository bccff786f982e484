"""yubikit's and PC/SC's exceptions, turned into Janus's typed custody errors.

yubikit reports card answers as ``ApduError`` with a status word, and PC/SC reports a
pulled card as a pyscard exception (or, for the in-process virtual card, a
``ConnectionError``).  Callers of the PIV backend see only :mod:`janus_hsm.errors`,
each with a message saying what to do.
"""

from __future__ import annotations

from yubikit.core import BadResponseError, InvalidPinError, NotSupportedError
from yubikit.core import TimeoutError as YubikitTimeoutError
from yubikit.core.smartcard import SW, ApduError

from janus_hsm.errors import (
    BackendError,
    JanusHSMError,
    KeyNotFoundError,
    MechanismUnsupportedError,
    PinIncorrectError,
    PinLockedError,
    TokenLostError,
    UserPresenceTimeoutError,
)


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, OSError, EOFError]
    try:
        from smartcard.Exceptions import (  # type: ignore[import-untyped]
            CardConnectionException,
            NoCardException,
        )

        errors += [CardConnectionException, NoCardException]
    except ImportError:  # pyscard is only needed for PC/SC readers
        pass
    return tuple(errors)


#: Exceptions meaning "the card went away" (removed, reader gone, pcscd restarted).
CONNECTION_LOST: tuple[type[BaseException], ...] = _connection_errors()


def pin_locked(where: str) -> PinLockedError:
    return PinLockedError(
        f"the PIV PIN of {where} is blocked (no tries left). Unblock it with the PUK: "
        "`ykman piv access unblock-pin` (then set a new PIN). If the PUK is blocked too, "
        "the only way back is `ykman piv reset`, which destroys every PIV key on the card"
    )


def pin_incorrect(where: str, retries: int) -> PinIncorrectError:
    return PinIncorrectError(
        f"wrong PIV PIN for {where}: {retries} tr{'y' if retries == 1 else 'ies'} left "
        "before the PIN blocks. Janus does not retry on its own: check pin-source / "
        "JANUS_PIN before trying again",
        retries_left=retries,
    )


def presence_timeout(where: str, what: str) -> UserPresenceTimeoutError:
    return UserPresenceTimeoutError(
        f"{what} on {where} needs a touch and none came in time: touch the YubiKey's "
        "contact when it blinks, then retry"
    )


def card_lost(where: str, what: str, exc: BaseException) -> TokenLostError:
    return TokenLostError(
        f"lost the connection to {where} during {what} ({type(exc).__name__}). Check that "
        "the card is inserted and that no other program holds it exclusively, then retry"
    )


def translate(exc: BaseException, *, where: str, what: str) -> JanusHSMError:
    """The Janus error for a yubikit / PC/SC exception raised during ``what``."""
    if isinstance(exc, JanusHSMError):
        return exc
    if isinstance(exc, InvalidPinError):
        if exc.attempts_remaining == 0:
            return pin_locked(where)
        return pin_incorrect(where, exc.attempts_remaining)
    if isinstance(exc, YubikitTimeoutError):
        return presence_timeout(where, what)
    if isinstance(exc, NotSupportedError):
        return MechanismUnsupportedError(f"{where} cannot do {what}: {exc}")
    if isinstance(exc, ApduError):
        if exc.sw == SW.AUTH_METHOD_BLOCKED:
            return pin_locked(where)
        if exc.sw in (SW.REFERENCE_DATA_NOT_FOUND, SW.FILE_NOT_FOUND):
            return KeyNotFoundError(f"{where} has nothing there ({what}: SW {exc.sw:04X})")
        if exc.sw in (SW.INVALID_INSTRUCTION, SW.FUNCTION_NOT_SUPPORTED):
            return MechanismUnsupportedError(f"{where} does not support {what} (SW {exc.sw:04X})")
        return BackendError(f"{where}: {what} failed with status word {exc.sw:04X}")
    if isinstance(exc, CONNECTION_LOST):
        return card_lost(where, what, exc)
    if isinstance(exc, BadResponseError):
        return BackendError(f"{where}: {what}: the card's answer was malformed ({exc})")
    return BackendError(f"{where}: {what} failed: {type(exc).__name__}: {exc}")
