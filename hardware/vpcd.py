"""The card side of vsmartcard's vpcd protocol: puts a `VirtualCard` into a PC/SC reader.

Why: pyscard, ``ykman.pcsc``, ``fido2.pcsc``, ykcs11 and yubico-piv-tool only talk to
cards through pcscd.  vsmartcard's ``vpcd`` is a pcscd reader driver that listens on a
TCP port (one per slot) and forwards whatever pcscd asks of the slot to whoever
connected there.  `VpcdCardBridge` is that "whoever": it connects to the driver and
answers from a `VirtualCard`, so the real client stacks can be tested without hardware.

The protocol (vsmartcard's ``vpcd.c``; there is no other specification): each message,
in both directions, is a 2-byte big-endian length followed by that many bytes.  From the
driver, a 1-byte message is a control code: 0 power off, 1 power on, 2 reset (none of
them answered) and 4 "send the ATR" (answered with the ATR); a longer message is a
command APDU, answered with the response APDU (data + SW1 SW2).  The card is present for
pcscd while the connection is up; closing it is pulling the card.

Written by hand: vsmartcard ships its card side only inside its own Python emulator
(``vicc``), which brings its own card OS instead of ours and is not packaged for pip.

Latency: the driver writes the length and the payload with separate ``send`` calls on
some versions, and with delayed ACKs on loopback every APDU then waits ~40 ms for the
peer's ACK timer.  Setting ``TCP_QUICKACK`` before each ``recv`` (Linux clears it again
on its own) brings an APDU round trip down to well under a millisecond here.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from types import TracebackType

from hardware.card import CardRemovedError, VirtualCard

__all__ = [
    "CTRL_ATR",
    "CTRL_OFF",
    "CTRL_ON",
    "CTRL_RESET",
    "DEFAULT_PORT",
    "MIN_ABSENCE",
    "VpcdCardBridge",
    "VpcdError",
]

logger = logging.getLogger(__name__)

#: vpcd's default port (0x8C7B); tests use a free port of their own instead.
DEFAULT_PORT = 0x8C7B

CTRL_OFF = 0
CTRL_ON = 1
CTRL_RESET = 2
CTRL_ATR = 4

# An internal error of the card, answered instead of letting the bridge thread die.
_SW_NO_PRECISE_DIAGNOSIS = bytes.fromhex("6F00")
_RETRY_INTERVAL = 0.05
#: pcscd polls vpcd for the card every 0.4 s and only notices a removal when a poll finds
#: the reader empty; a card back before that is never seen again (the reader stays
#: "empty", measured), so a pulled card stays out this long.
MIN_ABSENCE = 1.0


class VpcdError(ConnectionError):
    """The bridge could not reach the vpcd driver (pcscd not running, wrong port)."""


class _Disconnected(Exception):
    """The driver closed the connection (pcscd stopped or restarted)."""


class VpcdCardBridge:
    """Connects a `VirtualCard` to a vpcd slot and serves it from a background thread.

    ``min_absence``: seconds a card stays out after leaving the reader, however it left
    (see `MIN_ABSENCE`).

    The card is present in the reader while the bridge is connected.  :meth:`remove`
    and :meth:`insert` pull and reinsert it; a card whose ``removed`` flag is set is
    pulled the same way at its next APDU and comes back when the flag is cleared.  If
    the driver drops the connection (pcscd restarted) the bridge reconnects until
    :meth:`stop`.

    :attr:`card` may be replaced at any time, e.g. between tests sharing one pcscd: the
    next message from the driver goes to the new card, and pcscd sees no removal (so
    open PC/SC handles stay valid and the cached ATR is kept: give cards with another
    ATR a :meth:`remove`/:meth:`insert` cycle).
    """

    def __init__(
        self,
        card: VirtualCard,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        min_absence: float = MIN_ABSENCE,
    ) -> None:
        self.host = host
        self.port = port
        self.min_absence = min_absence
        self._left_at = -min_absence  # when the card last left the reader (monotonic)
        self._card = card
        self._state = threading.Condition()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pulled = False
        self._connected = False
        self.apdus = 0  # APDUs answered so far, for tests and diagnostics
        self.last_error: BaseException | None = None

    # ------------------------------------------------------------------ public API

    @property
    def card(self) -> VirtualCard:
        """The card that answers the next message from the driver."""
        return self._card

    @card.setter
    def card(self, card: VirtualCard) -> None:
        card.reset()  # as after power-up: no applet selected
        self._card = card

    @property
    def connected(self) -> bool:
        """Whether the card is in the reader (the driver's connection is up)."""
        with self._state:
            return self._connected

    def start(self) -> VpcdCardBridge:
        """Starts the background thread, which connects (and keeps reconnecting)."""
        with self._state:
            if self._thread is not None:
                raise RuntimeError("bridge already started")
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name=f"vpcd-bridge:{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Blocks until the driver accepted the connection; raises `VpcdError` if not."""
        with self._state:
            if not self._state.wait_for(lambda: self._connected or self._stopping, timeout):
                detail = f" ({self.last_error})" if self.last_error else ""
                raise VpcdError(
                    f"vpcd on {self.host}:{self.port} did not accept the card within"
                    f" {timeout:g} s: is pcscd running with a vpcd reader on that port?{detail}"
                )
            if not self._connected:
                raise VpcdError("bridge stopped")

    def remove(self) -> None:
        """Pulls the card: closes the connection and stays out until :meth:`insert`."""
        with self._state:
            self._pulled = True
            self._close_locked()
            self._state.wait_for(lambda: not self._connected, 5.0)

    def insert(self) -> None:
        """Puts the card back after :meth:`remove` (reconnects in the background)."""
        with self._state:
            self._pulled = False
            self._state.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """Pulls the card and ends the thread; idempotent."""
        with self._state:
            self._stopping = True
            self._close_locked()
            self._state.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("vpcd bridge thread did not stop")

    def __enter__(self) -> VpcdCardBridge:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ the thread

    def _close_locked(self) -> None:
        sock = self._sock
        if sock is not None:
            # shutdown wakes a recv blocked in the bridge thread; close alone would not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _wants_card_in(self) -> bool:
        return (
            not self._stopping
            and not self._pulled
            and not self._card.removed
            and time.monotonic() >= self._left_at + self.min_absence
        )

    def _run(self) -> None:
        while True:
            with self._state:
                # A card flagged `removed` is polled, as a person would push it back in.
                self._state.wait_for(
                    lambda: self._stopping or self._wants_card_in(), _RETRY_INTERVAL
                )
                if self._stopping:
                    return
                if not self._wants_card_in():
                    continue
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError as exc:
                self.last_error = exc
                time.sleep(_RETRY_INTERVAL)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._state:
                if not self._wants_card_in():
                    sock.close()
                    continue
                self._sock = sock
                self._connected = True
                self._state.notify_all()
            try:
                self._serve(sock)
            except (_Disconnected, OSError) as exc:
                logger.debug("vpcd connection on port %d ended: %r", self.port, exc)
            finally:
                with self._state:
                    self._sock = None
                    self._connected = False
                    self._left_at = time.monotonic()
                    self._state.notify_all()
                sock.close()

    def _serve(self, sock: socket.socket) -> None:
        while True:
            header = self._recv_exact(sock, 2)
            length = int.from_bytes(header, "big")
            payload = self._recv_exact(sock, length)
            card = self._card
            is_control = length == 1
            reply = self._control(card, payload[0]) if is_control else self._apdu(card, payload)
            if reply is None:
                continue
            sock.sendall(len(reply).to_bytes(2, "big") + reply)

    @staticmethod
    def _recv_exact(sock: socket.socket, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            # Linux turns quick ACK mode off again by itself, so it is set before each recv.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            chunk = sock.recv(size - len(chunks))
            if not chunk:
                raise _Disconnected("driver closed the connection")
            chunks += chunk
        return bytes(chunks)

    def _control(self, card: VirtualCard, code: int) -> bytes | None:
        if card.removed:
            raise _Disconnected("card removed")
        if code in (CTRL_OFF, CTRL_ON):
            card.power_off()  # both: the card comes up with no applet selected
            return None
        if code == CTRL_RESET:
            card.reset()
            return None
        if code == CTRL_ATR:
            return card.atr
        logger.warning("vpcd: unknown control code %d", code)
        return None

    def _apdu(self, card: VirtualCard, apdu: bytes) -> bytes:
        try:
            response = card.transmit(apdu)
        except CardRemovedError as exc:
            raise _Disconnected("card removed") from exc
        except Exception as exc:  # a bug in an applet must not take the reader down
            logger.exception("vpcd: the virtual card failed on APDU %s", apdu.hex())
            self.last_error = exc
            response = _SW_NO_PRECISE_DIAGNOSIS
        self.apdus += 1
        return response


def main(argv: list[str] | None = None) -> int:
    """``python -m hardware.vpcd [--port N] [--state FILE]``: a FIDO2 key for a running pcscd.

    For trying the virtual key with other tools by hand, e.g. against the machine's own
    pcscd and Debian's default vpcd reader (``/etc/reader.conf.d/vpcd``, port 0x8C7B).
    Serves until interrupted.
    """
    import argparse

    from hardware.fido2_authenticator import SoftwareAuthenticator
    from hardware.fido2_card import Fido2Applet

    parser = argparse.ArgumentParser(prog="python -m hardware.vpcd", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=lambda s: int(s, 0), default=DEFAULT_PORT)
    parser.add_argument("--state", help="JSON file keeping the key's credentials and PIN")
    args = parser.parse_args(argv)
    card = VirtualCard([Fido2Applet(SoftwareAuthenticator(state_path=args.state))])
    with VpcdCardBridge(card, args.host, args.port) as bridge:
        try:
            bridge.wait_connected()
            print(f"virtual FIDO2 key in the vpcd reader on port {args.port}; Ctrl-C ends")
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
        except VpcdError as exc:
            print(exc)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
