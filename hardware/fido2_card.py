"""CTAP over ISO 7816: the FIDO applet that makes `SoftwareAuthenticator` a smart card.

Why: USB HID cannot be emulated here (no ``/dev/uhid``), but fido2's PC/SC transport
(``fido2.pcsc.CtapPcscDevice``, what NFC readers and a YubiKey's CCID interface use)
can be driven through pcscd and vpcd.  Hosted in a `hardware.card.VirtualCard`, next
to the virtual PIV applet as on a real YubiKey, this applet lets the real client stack
(``Ctap2``, ``ClientPin``, ``Fido2Client``) reach the authenticator through PC/SC.

What it implements (CTAP 2.1 §11.3, "NFC"; the framing of long messages, command
chaining and GET RESPONSE, is the card's job in `VirtualCard`):

* SELECT of AID ``A0000006472F0001`` answers the version string ``FIDO_2_0``: this
  authenticator has no CTAP1/U2F, and fido2's client reads ``U2F_V2`` as "U2F too".
* NFCCTAP_MSG (CLA 80, INS 10) carries a CTAP2 command byte + CBOR and answers the
  status byte + CBOR, computed by the authenticator's own ``call(CTAPHID.CBOR, ...)``:
  no CTAP logic is duplicated here.
* With P1 bit 0x80 ("the platform supports NFCCTAP_GETRESPONSE") a command that is
  still running after :attr:`Fido2Applet.update_interval` (waiting for user presence)
  is answered with SW 9100 and a one-byte keepalive status (PROCESSING or UPNEEDED);
  the platform then polls with NFCCTAP_GETRESPONSE (CLA 80, INS 11), whose P1 0x11
  cancels the command (the authenticator then answers CTAP2_ERR_KEEPALIVE_CANCEL).
  Without the bit, NFCCTAP_MSG blocks until the command finishes.

CTAP1/U2F APDUs (CLA 00, INS 01-03) get SW 6D00.  Deselecting the applet (another
applet selected, the card powered off or reset) cancels a pending command.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Final

from fido2.ctap import STATUS, CtapError
from fido2.hid import CTAPHID

from hardware.card import (
    SW_CONDITIONS_NOT_SATISFIED,
    SW_INS_NOT_SUPPORTED,
    SW_OK,
    SW_WRONG_P1P2,
    Command,
)
from hardware.fido2_authenticator import SoftwareAuthenticator

__all__ = [
    "FIDO_AID",
    "INS_NFCCTAP_GETRESPONSE",
    "INS_NFCCTAP_MSG",
    "SW_STATUS_UPDATE",
    "Fido2Applet",
]

FIDO_AID: Final = bytes.fromhex("A0000006472F0001")
CLA_PROPRIETARY: Final = 0x80
INS_NFCCTAP_MSG: Final = 0x10
INS_NFCCTAP_GETRESPONSE: Final = 0x11
P1_GETRESPONSE_SUPPORTED: Final = 0x80
P1_CANCEL: Final = 0x11
#: "Status update": the command is still running; the data byte is a keepalive status.
SW_STATUS_UPDATE: Final = 0x9100
_SW_CLA_NOT_SUPPORTED: Final = 0x6E00
#: How long a deselect waits for a cancelled command before giving up on it.
_CANCEL_JOIN_TIMEOUT: Final = 5.0


@dataclass
class _Pending:
    """A CTAP command running in its own thread while the platform polls for it."""

    thread: threading.Thread
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    status: STATUS = STATUS.PROCESSING
    response: bytes = b""


class Fido2Applet:
    """The FIDO applet (CTAP 2.1 §11.3) in front of a `SoftwareAuthenticator`.

    :param authenticator: the authenticator answering CTAP commands; a fresh one (approving
        every presence test) by default.  Tests keep a reference to script presence and
        inspect credentials, as with the in-process device.
    :param update_interval: how long NFCCTAP_MSG and NFCCTAP_GETRESPONSE wait for the
        command before answering a status update (only when the platform set P1 0x80).
    :param version: what SELECT answers (``b"U2F_V2"`` would claim CTAP1 support).
    """

    aid: bytes = FIDO_AID

    def __init__(
        self,
        authenticator: SoftwareAuthenticator | None = None,
        *,
        update_interval: float = 0.1,
        version: bytes = b"FIDO_2_0",
    ) -> None:
        self.authenticator = authenticator if authenticator is not None else SoftwareAuthenticator()
        self.update_interval = update_interval
        self.version = version
        self._pending: _Pending | None = None

    # ------------------------------------------------------------------ Applet protocol

    def select(self) -> tuple[bytes, int]:
        self._cancel_pending()
        return self.version, SW_OK

    def deselect(self) -> None:
        self._cancel_pending()

    def process(self, command: Command) -> tuple[bytes, int]:
        if command.cla & ~0x10 != CLA_PROPRIETARY:  # chaining bit aside
            if command.cla & ~0x10 == 0x00:
                return b"", SW_INS_NOT_SUPPORTED  # CTAP1/U2F: not offered
            return b"", _SW_CLA_NOT_SUPPORTED
        if command.ins == INS_NFCCTAP_MSG:
            return self._msg(command)
        if command.ins == INS_NFCCTAP_GETRESPONSE:
            return self._get_response(command)
        return b"", SW_INS_NOT_SUPPORTED

    # ------------------------------------------------------------------ commands

    def _msg(self, command: Command) -> tuple[bytes, int]:
        if command.p1 & ~P1_GETRESPONSE_SUPPORTED or command.p2:
            return b"", SW_WRONG_P1P2
        if self._pending is not None and not self._pending.done.is_set():
            return b"", SW_CONDITIONS_NOT_SATISFIED  # one command at a time
        pending = self._start(command.data)
        if command.p1 & P1_GETRESPONSE_SUPPORTED:
            return self._answer(pending)
        pending.done.wait()
        return self._answer(pending)

    def _get_response(self, command: Command) -> tuple[bytes, int]:
        if command.p1 not in (0x00, P1_CANCEL) or command.p2:
            return b"", SW_WRONG_P1P2
        pending = self._pending
        if pending is None:
            return b"", SW_CONDITIONS_NOT_SATISFIED
        if command.p1 == P1_CANCEL:
            pending.cancel.set()
        return self._answer(pending)

    def _answer(self, pending: _Pending) -> tuple[bytes, int]:
        if pending.done.wait(self.update_interval):
            self._pending = None
            return pending.response, SW_OK
        return bytes([pending.status]), SW_STATUS_UPDATE

    # ------------------------------------------------------------------ plumbing

    def _start(self, request: bytes) -> _Pending:
        pending = _Pending(thread=threading.Thread(target=lambda: None))

        def keepalive(status: STATUS) -> None:
            pending.status = status

        def run() -> None:
            try:
                pending.response = self.authenticator.call(
                    CTAPHID.CBOR, request, pending.cancel, keepalive
                )
            except CtapError as exc:  # e.g. CHANNEL_BUSY: reported as the status byte
                pending.response = bytes([exc.code])
            except Exception:  # a bug must not leave the platform polling forever
                pending.response = bytes([CtapError.ERR.OTHER])
                raise
            finally:
                pending.done.set()

        pending.thread = threading.Thread(target=run, name="fido2-applet", daemon=True)
        self._pending = pending
        pending.thread.start()
        return pending

    def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done.is_set():
            pending.cancel.set()
            pending.thread.join(_CANCEL_JOIN_TIMEOUT)
