"""One PIV card: its yubikit session, its lock, its PIN state.

Every APDU exchange with a card goes through :meth:`PivCard.run`, which holds the
card's lock (a card does one thing at a time, and a PIN verified by one thread is the
card's state, not the thread's), turns yubikit / PC/SC exceptions into typed Janus
errors, and, when the card was opened by discovery, reconnects once if the connection
dropped (a pcscd restart, a USB reset).  A card that is really gone gives
:class:`TokenLostError` at once; nothing waits for it to come back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from yubikit.core import InvalidPinError
from yubikit.core.smartcard import SW, ApduError, SmartCardConnection
from yubikit.piv import PIN_POLICY, TOUCH_POLICY, PivSession

from janus_hsm.errors import JanusHSMError, PinIncorrectError
from janus_hsm.pin import PinSource

from .errors import CONNECTION_LOST, pin_locked, presence_timeout, translate

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Called with a human sentence before an operation that waits for a touch.
TouchCallback = Callable[[str], None]

_NEEDS_TOUCH = (TOUCH_POLICY.ALWAYS, TOUCH_POLICY.CACHED)


def log_touch(message: str) -> None:
    log.warning("%s", message)


class PivCard:
    """The process's session with one card. Thread-safe: one lock per card."""

    def __init__(
        self,
        *,
        description: str,
        connection: SmartCardConnection | None = None,
        connect: Callable[[], SmartCardConnection] | None = None,
    ) -> None:
        if connection is None and connect is None:
            raise ValueError("a PivCard needs a connection or a way to connect")
        self.description = description
        self.lock = threading.RLock()
        self._connect = connect
        self._connection = connection
        self._session: PivSession | None = None
        self._pin_verified = False

    @property
    def connected(self) -> bool:
        """Whether this process holds the card open now (others then cannot see it)."""
        return self._connection is not None

    # --- session ------------------------------------------------------------------

    def session(self) -> PivSession:
        """The open yubikit session (opened on first use). Call with the lock held."""
        if self._session is None:
            if self._connection is None:
                assert self._connect is not None
                self._connection = self._connect()
            self._session = PivSession(self._connection)
            self._pin_verified = False
        return self._session

    def run(self, what: str, operation: Callable[[PivSession], T], *, retry: bool = True) -> T:
        """``operation(session)`` under the card lock, with errors translated.

        With ``retry`` (for operations that are safe to repeat), a dropped connection is
        reopened once when the card was found by discovery.
        """
        with self.lock:
            try:
                return operation(self.session())
            except CONNECTION_LOST as exc:
                self._discard()
                if not (retry and self._connect is not None):
                    raise translate(exc, where=self.description, what=what) from None
            except JanusHSMError:
                raise
            except Exception as exc:
                raise translate(exc, where=self.description, what=what) from None
            try:  # one reconnect, for discovered cards only
                return operation(self.session())
            except Exception as exc:
                if isinstance(exc, CONNECTION_LOST):
                    self._discard()
                raise translate(exc, where=self.description, what=what) from None

    def _discard(self) -> None:
        connection = self._connection if self._connect is not None else None
        self._session = None
        self._pin_verified = False
        if connection is not None:
            self._connection = None
            with contextlib.suppress(Exception):
                connection.close()
            _release_pcsc_context(connection)

    def close(self) -> None:
        """Drop the session (and a discovered card's connection); reopened on next use."""
        with self.lock:
            self._discard()

    # --- PIN and touch ------------------------------------------------------------

    def verify_pin(
        self, session: PivSession, pin_source: PinSource, *, force: bool = False
    ) -> bool:
        """Verify the PIN from ``pin_source`` unless already verified in this session.

        ``pin_source`` is the caller's (each provider and its handles keep their own: one
        card may be opened by several providers, with different sources).  Returns True
        when a VERIFY was sent now.  A blocked PIN is reported without spending a try
        (firmware 5.3+ tells the count without a VERIFY).
        """
        if self._pin_verified and not force:
            return False
        try:
            remaining = session.get_pin_metadata().attempts_remaining
        except Exception:  # no metadata before firmware 5.3
            remaining = None
        if remaining == 0:
            raise pin_locked(self.description)
        pin = pin_source()
        try:
            session.verify_pin(pin)
        except ValueError as exc:
            self._pin_verified = False
            if isinstance(exc, InvalidPinError):
                raise translate(exc, where=self.description, what="PIN verification") from None
            raise PinIncorrectError(
                f"the PIN for {self.description} is longer than the 8 bytes PIV allows"
            ) from None
        finally:
            del pin
        self._pin_verified = True
        return True

    def use_key(
        self,
        session: PivSession,
        what: str,
        pin_policy: PIN_POLICY | None,
        touch_policy: TOUCH_POLICY | None,
        operation: Callable[[], T],
        *,
        pin_source: PinSource,
        on_touch: TouchCallback,
    ) -> T:
        """Run a private-key operation as the slot's PIN and touch policies demand.

        PIN "always" is verified right before every use (the card forgets it after one
        command); "once" is verified on first use in the session and again if the card
        says it forgot (another application was selected, the card was reset), with the
        caller's ``pin_source``.  A slot with a touch policy is announced through the
        caller's ``on_touch`` first; when the card then refuses although the PIN was
        just verified, the touch did not come.
        """
        always = pin_policy in (PIN_POLICY.ALWAYS, PIN_POLICY.MATCH_ALWAYS)
        needs_pin = pin_policy is not PIN_POLICY.NEVER
        touch = touch_policy in _NEEDS_TOUCH
        for attempt in (1, 2):
            fresh = (
                self.verify_pin(session, pin_source, force=always or attempt == 2)
                if needs_pin
                else False
            )
            if touch:
                on_touch(f"Touch your YubiKey ({self.description}) to approve {what}")
            try:
                return operation()
            except ApduError as exc:
                refused = exc.sw in (
                    SW.SECURITY_CONDITION_NOT_SATISFIED,
                    SW.CONDITIONS_NOT_SATISFIED,
                )
                if not refused:
                    raise
                if touch and (fresh or not needs_pin or exc.sw == SW.CONDITIONS_NOT_SATISFIED):
                    raise presence_timeout(self.description, what) from None
                if not needs_pin or attempt == 2:
                    raise
                # The card forgot a PIN verified earlier: verify again and retry once.
                self._pin_verified = False
        raise AssertionError("unreachable")


def _release_pcsc_context(connection: SmartCardConnection) -> None:
    """Release pyscard's PC/SC context now, and forget it if the daemon is gone.

    yubikit's ``close`` disconnects before it releases, so when pcscd has died the
    disconnect raises and the context is never released; pyscard then retries in
    ``__del__``, which raises again (the handle belonged to the dead daemon) and Python
    prints a traceback on stderr at some later garbage collection.  The handle is
    worthless once its daemon is gone, so it is dropped whatever release answers.
    """
    inner: object | None = getattr(connection, "connection", None)  # pyscard's, inside
    while inner is not None:
        if getattr(inner, "hcontext", None) is not None:
            with contextlib.suppress(Exception):
                inner.release()  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                inner.hcontext = None  # type: ignore[attr-defined]
        inner = getattr(inner, "component", None)  # a CardConnectionDecorator's target
