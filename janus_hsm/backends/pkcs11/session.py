"""One logged-in session per token per process, reused, and recovered once if it drops.

Logging in costs ~30x a signature on SoftHSM and far more on network HSMs, so the
session is opened once and kept.  Real HSMs close idle sessions (YubiHSM 2 after
15-40 s) and tokens get unplugged: on "session/token gone" errors the session is
reopened and the operation retried exactly once, then :class:`TokenLostError`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, ObjectClass, TokenFlag

from janus_hsm.errors import (
    BackendError,
    JanusHSMError,
    KeyNotFoundError,
    MechanismUnsupportedError,
    PinIncorrectError,
    PinLockedError,
    TokenLostError,
    TokenNotFoundError,
)
from janus_hsm.pin import PinSource
from janus_hsm.uri import Pkcs11Uri

from .module import LoadedModule

T = TypeVar("T")

# Errors after which reopening the session (and logging in again) may help.
_SESSION_LOST: tuple[type[Exception], ...] = (
    pkcs11.exceptions.SessionHandleInvalid,
    pkcs11.exceptions.SessionClosed,
    pkcs11.exceptions.DeviceRemoved,
    pkcs11.exceptions.TokenNotPresent,
    pkcs11.exceptions.UserNotLoggedIn,
    pkcs11.exceptions.ObjectHandleInvalid,
    pkcs11.exceptions.KeyHandleInvalid,
)
# Errors after which the module itself must reconnect (C_Finalize, C_Initialize):
# p11-kit-client reports a lost server as CKR_DEVICE_ERROR and stays disconnected
# until it is initialised again; USB tokens that were unplugged behave alike.
_DEVICE_LOST: tuple[type[Exception], ...] = (
    pkcs11.exceptions.DeviceError,
    pkcs11.exceptions.DeviceRemoved,
)
_UNSUPPORTED: tuple[type[Exception], ...] = (
    pkcs11.exceptions.MechanismInvalid,
    pkcs11.exceptions.MechanismParamInvalid,
    pkcs11.exceptions.FunctionNotSupported,
    pkcs11.exceptions.KeyTypeInconsistent,
    pkcs11.exceptions.DomainParamsInvalid,
    pkcs11.exceptions.AttributeValueInvalid,
)


_TOKEN_KEYS = frozenset(
    {"token", "manufacturer", "serial", "model", "slot-description", "slot-manufacturer", "slot-id"}
)


class _OpenFailed(Exception):
    """Opening the session hit what SoftHSM's token-file race looks like: a general
    error, or a user PIN that seems not to be set (read from a half-written file)."""

    def __init__(self, cause: Exception):
        super().__init__(type(cause).__name__)
        self.cause = cause


# What opening a session answers while SoftHSM's token file is half-written.
_OPEN_RACE: tuple[type[Exception], ...] = (
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.UserPinNotInitialized,
)
_RETRYABLE: tuple[type[Exception], ...] = (*_SESSION_LOST, _OpenFailed)
# The token was found when its TokenSession was made: not finding it later means the
# module lost it (a server or device went away), like a device error does.
_MODULE_LOST: tuple[type[Exception], ...] = (*_DEVICE_LOST, TokenNotFoundError)
_LOST: tuple[type[Exception], ...] = (*_RETRYABLE, *_MODULE_LOST)
_PASSED_UP: tuple[type[Exception], ...] = (*_SESSION_LOST, *_DEVICE_LOST)


def describe_token(token: Any) -> str:
    serial = (token.serial or b"").decode("ascii", "replace").strip()
    return f"token '{token.label}'" + (f" (serial {serial})" if serial else "")


# What C_GetSlotList / C_GetTokenInfo answer while SoftHSM's token file is being
# rewritten by another process's C_Login (docs/performance.md): worth one more look.
_TOKEN_FILE_RACE: tuple[type[Exception], ...] = (
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.TokenNotRecognised,
)
_LOOK_AGAIN: tuple[type[Exception], ...] = (*_TOKEN_FILE_RACE, TokenNotFoundError)
_RACE_PAUSE = 0.05  # seconds; the writer's window is a truncate and a write


def find_token(module: LoadedModule, uri: Pkcs11Uri) -> Any:
    """The single token the URI's token attributes select.

    Looks twice when the first look fails the way SoftHSM's file-store race does (a
    general error, or the token missing or uninitialised for a moment); any other PKCS#11
    error, or the race twice, is a typed error.  Device and session loss pass up
    untranslated, for :meth:`TokenSession.run` to recover from.
    """
    for last in (False, True):
        try:
            return _find_token(module, uri)
        except _PASSED_UP:
            raise
        except _LOOK_AGAIN as exc:
            if not last:
                # SoftHSM keeps what it read of a half-written token file (the token is
                # then missing for the rest of the process): only a fresh C_Initialize
                # reads the store again.
                time.sleep(_RACE_PAUSE)
                module.reinitialize()
                continue
            if isinstance(exc, TokenNotFoundError):
                raise
            failure = exc
        except pkcs11.PKCS11Error as exc:
            failure = exc
        raise BackendError(
            f"{module.path} failed listing its tokens ({type(failure).__name__}). With "
            "SoftHSM, this happens while other processes log in to the same token at the "
            "same moment: retry"
        ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def find_token_typed(module: LoadedModule, uri: Pkcs11Uri) -> Any:
    """:func:`find_token` for callers outside :meth:`TokenSession.run`, which cannot
    recover a lost device: that, too, is a typed error here."""
    try:
        return find_token(module, uri)
    except _PASSED_UP as exc:
        raise TokenLostError(
            f"{module.path} lost its token while Janus looked for it ({type(exc).__name__}). "
            "Check that the device is connected and reachable, then retry"
        ) from None


def _find_token(module: LoadedModule, uri: Pkcs11Uri) -> Any:
    lib = module.lib
    wanted = uri.path
    for name in ("library-manufacturer", "library-description", "library-version"):
        if name in wanted:
            actual = {
                "library-manufacturer": lib.manufacturer_id,
                "library-description": lib.library_description,
                "library-version": "{}.{}".format(*lib.library_version),
            }[name]
            if wanted[name] != actual and not (
                name == "library-version" and actual.startswith(wanted[name] + ".")
            ):
                raise TokenNotFoundError(
                    f"{module.path} is {name} {actual!r}, but the URI asks for {wanted[name]!r}"
                )
    matches, seen = [], []
    for slot in lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except (pkcs11.exceptions.TokenNotPresent, pkcs11.exceptions.TokenNotRecognised):
            continue
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        seen.append(token.label)
        actual = {
            "token": token.label,
            "manufacturer": token.manufacturer_id,
            "serial": (token.serial or b"").decode("ascii", "replace").strip(),
            "model": token.model,
            "slot-description": slot.slot_description,
            "slot-manufacturer": slot.manufacturer_id,
            "slot-id": str(slot.slot_id),
        }
        if all(wanted[k] == v for k, v in actual.items() if k in wanted):
            matches.append(token)
    selector = ";".join(f"{k}={v}" for k, v in wanted.items() if k in _TOKEN_KEYS) or "(any)"
    if not matches:
        available = ", ".join(repr(label) for label in seen) or "none"
        raise TokenNotFoundError(
            f"no token matches {selector} in {module.path} (initialised tokens: {available}). "
            "Check token= in the URI, that the device is connected, and, for SoftHSM, "
            "that SOFTHSM2_CONF points at the right token directory (if it does, other "
            "processes logging in at this moment can hide the token: retry)"
        )
    if len(matches) > 1:
        raise TokenNotFoundError(
            f"{len(matches)} tokens match {selector} in {module.path}; "
            "add token= or serial= to the URI to pick one"
        )
    return matches[0]


class TokenSession:
    """The process's session with one token. Every call holds the module's lock."""

    def __init__(self, module: LoadedModule, token_uri: Pkcs11Uri, pin_source: PinSource):
        self.module = module
        self.token_uri = token_uri
        self._pin_source = pin_source
        self._token: Any = None
        self._session: Any = None
        self._generation = module.generation
        self._objects: dict[tuple[int, bytes, str], Any] = {}

    def replace_pin_source(self, pin_source: PinSource) -> None:
        with self.module.lock:
            if self._session is None:
                self._pin_source = pin_source

    @property
    def token(self) -> Any:
        with self.module.lock:
            if self._token is None:
                self._token = find_token_typed(self.module, self.token_uri)
            return self._token

    @property
    def label(self) -> str:
        return str(self.token.label)

    def describe(self) -> str:
        return describe_token(self.token)

    def run(self, operation: Callable[[Any], T], *, what: str) -> T:
        """Run ``operation(session)`` under the module lock; reopen the session once if lost."""
        with self.module.lock:
            self.module.check_process()
            described = self._describe_safely()
            try:
                return self._attempt(operation, what)
            except _MODULE_LOST:
                self._discard()
                self.module.reinitialize()
            except _OpenFailed:
                # SoftHSM keeps what it read of a half-written token file for the rest of
                # the process: only a fresh C_Initialize reads the store again.
                self._discard()
                time.sleep(_RACE_PAUSE)
                self.module.reinitialize()
            except _RETRYABLE:
                self._discard()
            try:
                return self._attempt(operation, what)
            except _OpenFailed as exc:
                self._discard()
                if isinstance(exc.cause, pkcs11.exceptions.UserPinNotInitialized):
                    raise BackendError(
                        f"{described} has no user PIN set (CKR_USER_PIN_NOT_INITIALIZED): "
                        "set one (softhsm2-util --init-token, or pkcs11-tool --init-pin "
                        "with the SO PIN), then retry"
                    ) from None
                raise BackendError(
                    f"{self.module.path}: opening a session with {described} failed twice "
                    f"({exc}). With SoftHSM, this happens while other processes log in to "
                    "the same token at the same moment: retry"
                ) from None
            except _LOST as exc:
                self._discard()
                raise TokenLostError(
                    f"lost the session with {described} during {what} and could not "
                    f"reopen it ({type(exc).__name__}). Check that the device is "
                    "connected and reachable (for p11-kit-client: that its p11-kit server "
                    "runs), then retry"
                ) from None

    def _attempt(self, operation: Callable[[Any], T], what: str) -> T:
        try:
            session = self._open()
        except _OPEN_RACE as exc:
            # SoftHSM rewrites its token file non-atomically on login; a process reading
            # it at that moment gets CKR_GENERAL_ERROR, or finds no user PIN set.
            # Initialising the module again and opening again is the remedy.
            raise _OpenFailed(exc) from None
        except _PASSED_UP:
            raise
        except pkcs11.PKCS11Error as exc:
            raise BackendError(
                f"{self.module.path}: opening a session with {self._describe_safely()} "
                f"failed ({type(exc).__name__})"
            ) from None
        try:
            return operation(session)
        except _PASSED_UP:
            raise
        except JanusHSMError:
            raise
        except _UNSUPPORTED as exc:
            raise MechanismUnsupportedError(
                f"{self._describe_safely()} cannot do {what} ({type(exc).__name__})"
            ) from None
        except pkcs11.exceptions.NoSuchKey:
            raise KeyNotFoundError(f"key vanished from {self._describe_safely()}") from None
        except pkcs11.PKCS11Error as exc:
            detail = str(exc) or type(exc).__name__
            raise BackendError(
                f"{self.module.path}, {self._describe_safely()}: {what} failed: {detail}"
            ) from None

    def object(
        self,
        session: Any,
        object_class: ObjectClass,
        key_id: bytes,
        label: str,
        check: Callable[[Any], None] | None = None,
    ) -> Any:
        """A cached object handle, looked up by id (or label when the id is empty).

        ``check`` sees each object found by a new lookup (after the cache was dropped or
        the session reopened), before it is used or cached: the object under that id
        may have been replaced since the handle was made.
        """
        cache_key = (int(object_class), key_id, label if not key_id else "")
        found = self._objects.get(cache_key)
        if found is None:
            attrs: dict[Attribute, Any] = {Attribute.CLASS: object_class}
            if key_id:
                attrs[Attribute.ID] = key_id
            else:
                attrs[Attribute.LABEL] = label
            objects = list(session.get_objects(attrs))
            if len(objects) != 1:
                raise KeyNotFoundError(
                    f"{len(objects)} objects on {self._describe_safely()} match the key "
                    f"{label!r}; it was deleted or duplicated since it was opened"
                )
            found = objects[0]
            if check is not None:
                check(found)
            self._objects[cache_key] = found
        return found

    def forget(self) -> None:
        """Drop cached object handles (after objects were created or destroyed)."""
        self._objects.clear()

    def _open(self) -> Any:
        if self._generation != self.module.generation:
            # The module was initialised again (for another token's sake): this
            # session's handles are void, and closing them could close a new session.
            self._session, self._token = None, None
            self._generation = self.module.generation
        if self._session is not None:
            return self._session
        token = find_token(self.module, self.token_uri)
        self._token = token
        if token.flags & TokenFlag.LOGIN_REQUIRED:
            self._session = self._login(token)
        else:
            self._session = token.open(rw=True)
        self._objects.clear()
        return self._session

    def _login(self, token: Any) -> Any:
        if token.flags & TokenFlag.USER_PIN_LOCKED:
            raise _locked(token)
        pin = self._pin_source()
        try:
            return token.open(rw=True, user_pin=pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # Another session of this process already logged the token in.
            return token.open(rw=True)
        except pkcs11.exceptions.PinIncorrect:
            fresh = find_token(self.module, self.token_uri)
            if fresh.flags & TokenFlag.USER_PIN_LOCKED:
                raise _locked(fresh) from None
            retries: int | None = None
            note = ""
            if fresh.flags & TokenFlag.USER_PIN_FINAL_TRY:
                retries, note = 1, " One try is left before the PIN locks."
            elif fresh.flags & TokenFlag.USER_PIN_COUNT_LOW:
                note = " Few tries are left before the PIN locks."
            raise PinIncorrectError(
                f"wrong PIN for {describe_token(fresh)}.{note} Janus does not retry on its "
                "own: check pin-source / JANUS_PIN before trying again",
                retries_left=retries,
            ) from None
        except pkcs11.exceptions.PinLocked:
            raise _locked(token) from None
        except (pkcs11.exceptions.PinInvalid, pkcs11.exceptions.PinLenRange):
            raise PinIncorrectError(
                f"the PIN given for {describe_token(token)} has a length or characters the "
                "token does not accept"
            ) from None
        finally:
            del pin

    def _discard(self) -> None:
        session, self._session = self._session, None
        self._objects.clear()
        self._token = None
        if session is not None and self._generation == self.module.generation:
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()

    def close(self) -> None:
        with self.module.lock:
            self._discard()

    def _describe_safely(self) -> str:
        if self._token is not None:
            return describe_token(self._token)
        return f"token {self.token_uri.token or '(unnamed)'}"


def _locked(token: Any) -> PinLockedError:
    return PinLockedError(
        f"the user PIN of {describe_token(token)} is locked. Unlock it with the security "
        "officer PIN (e.g. `pkcs11-tool --init-pin --login --login-type so`, or your HSM "
        "vendor's tool), then set a new PIN"
    )
