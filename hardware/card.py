"""A virtual ISO 7816-4 smart card that hosts applets (PIV, FIDO2), for CI.

The card does what a real card's operating system does and nothing more: it
routes SELECT by AID to an applet, reassembles command chaining (CLA bit 0x10)
and serves long responses through GET RESPONSE (61xx) when the reader talks
short APDUs. Applets therefore see one logical command and return one logical
response, whichever transport carries them: in process through
`InProcessConnection` (yubikit's `SmartCardConnection`) or through pcscd via
`hardware.vpcd`.

Written by hand because no Debian or PyPI package emulates a card at this level
(see docs/testing-hardware.md).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from yubikit.core import TRANSPORT
from yubikit.core.smartcard import SmartCardConnection

SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_FILE_NOT_FOUND = 0x6A82
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_WRONG_P1P2 = 0x6B00

# A YubiKey 5 ATR. ATR[1] & 0xF0 == 0xF0 tells ykman the card takes extended APDUs.
YUBIKEY_ATR = bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")

_SHORT_LE_MAX = 256


@dataclass(frozen=True)
class Command:
    """One logical command APDU, after chaining is undone."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes
    le: int  # 0 when absent; 256/65536 when the reader asked for "everything"
    extended: bool


class Applet(Protocol):
    """What a card application implements to be hosted by `VirtualCard`."""

    aid: bytes

    def select(self) -> tuple[bytes, int]:
        """Called on SELECT by (a prefix of) `aid`; returns (data, SW)."""
        ...

    def deselect(self) -> None:
        """Called on power off/reset or when another applet is selected."""
        ...

    def process(self, command: Command) -> tuple[bytes, int]:
        """Handles every command while selected; returns (data, SW)."""
        ...


class CardRemovedError(ConnectionError):
    """The virtual card was removed (tests simulate pulling a card mid-operation)."""


def parse_apdu(apdu: bytes) -> Command:
    """Decodes a short or extended command APDU (ISO 7816-4 §5.1)."""
    if len(apdu) < 4:
        raise ValueError("APDU shorter than its header")
    cla, ins, p1, p2 = apdu[0], apdu[1], apdu[2], apdu[3]
    body = apdu[4:]
    if not body:
        return Command(cla, ins, p1, p2, b"", 0, False)
    if len(body) == 1:  # case 2 short: Le only
        return Command(cla, ins, p1, p2, b"", body[0] or 256, False)
    if body[0] != 0:  # short with Lc
        lc = body[0]
        data = body[1 : 1 + lc]
        if len(data) != lc:
            raise ValueError("APDU shorter than its Lc")
        rest = body[1 + lc :]
        if len(rest) > 1:
            raise ValueError("trailing bytes after Le")
        le = (rest[0] or 256) if rest else 0
        return Command(cla, ins, p1, p2, data, le, False)
    # Extended: 00 then 2-byte Lc or Le.
    if len(body) == 3:  # case 2 extended
        n = int.from_bytes(body[1:3], "big")
        return Command(cla, ins, p1, p2, b"", n or 65536, True)
    lc = int.from_bytes(body[1:3], "big")
    data = body[3 : 3 + lc]
    if lc == 0 or len(data) != lc:
        raise ValueError("APDU shorter than its extended Lc")
    rest = body[3 + lc :]
    if len(rest) not in (0, 2):
        raise ValueError("bad extended Le")
    le = (int.from_bytes(rest, "big") or 65536) if rest else 0
    return Command(cla, ins, p1, p2, data, le, True)


class VirtualCard:
    """A card with an ATR and applets; thread-safe (one command at a time)."""

    def __init__(self, applets: list[Applet], atr: bytes = YUBIKEY_ATR) -> None:
        self.atr = atr
        self._applets = list(applets)
        self._selected: Applet | None = None
        self._chain: Command | None = None
        self._pending = b""  # response bytes still to be fetched with GET RESPONSE
        self._lock = threading.Lock()
        self.removed = False

    def power_off(self) -> None:
        with self._lock:
            self._reset_locked()

    def reset(self) -> None:
        self.power_off()

    def _reset_locked(self) -> None:
        if self._selected is not None:
            self._selected.deselect()
        self._selected = None
        self._chain = None
        self._pending = b""

    def transmit(self, apdu: bytes) -> bytes:
        """Processes one APDU and returns response data followed by SW1 SW2."""
        if self.removed:
            raise CardRemovedError("card removed")
        with self._lock:
            data, sw = self._transmit_locked(apdu)
        return data + sw.to_bytes(2, "big")

    def _transmit_locked(self, apdu: bytes) -> tuple[bytes, int]:
        try:
            cmd = parse_apdu(apdu)
        except ValueError:
            return b"", SW_WRONG_LENGTH
        if cmd.ins == 0xC0 and cmd.cla & 0x10 == 0:  # GET RESPONSE
            return self._next_chunk(cmd.le or 256)
        self._pending = b""
        if cmd.cla & 0x10:  # command chaining: more blocks follow
            if self._chain is None:
                self._chain = cmd
            elif (self._chain.ins, self._chain.p1, self._chain.p2) != (cmd.ins, cmd.p1, cmd.p2):
                self._chain = None
                return b"", SW_CONDITIONS_NOT_SATISFIED
            else:
                self._chain = Command(
                    self._chain.cla, cmd.ins, cmd.p1, cmd.p2,
                    self._chain.data + cmd.data, cmd.le, cmd.extended,
                )  # fmt: skip
            return b"", SW_OK
        if self._chain is not None:
            if (self._chain.ins, self._chain.p1, self._chain.p2) != (cmd.ins, cmd.p1, cmd.p2):
                self._chain = None
                return b"", SW_CONDITIONS_NOT_SATISFIED
            cmd = Command(
                cmd.cla, cmd.ins, cmd.p1, cmd.p2, self._chain.data + cmd.data, cmd.le, cmd.extended
            )
            self._chain = None
        data, sw = self._dispatch(cmd)
        if not cmd.extended and len(data) > _SHORT_LE_MAX and sw == SW_OK:
            self._pending = data
            return self._next_chunk(_SHORT_LE_MAX)
        return data, sw

    def _next_chunk(self, size: int) -> tuple[bytes, int]:
        chunk, self._pending = self._pending[:size], self._pending[size:]
        if self._pending:
            return chunk, 0x6100 | min(len(self._pending), 0xFF)
        return chunk, SW_OK

    def _dispatch(self, cmd: Command) -> tuple[bytes, int]:
        if cmd.ins == 0xA4 and cmd.p1 == 0x04:  # SELECT by DF name (AID)
            for applet in self._applets:
                if cmd.data and applet.aid.startswith(cmd.data):
                    if self._selected is not None and self._selected is not applet:
                        self._selected.deselect()
                    self._selected = applet
                    return applet.select()
            return b"", SW_FILE_NOT_FOUND
        if self._selected is None:
            return b"", SW_CONDITIONS_NOT_SATISFIED
        return self._selected.process(cmd)


class InProcessConnection(SmartCardConnection):
    """yubikit's connection interface over a `VirtualCard`, without PC/SC."""

    def __init__(self, card: VirtualCard, transport: TRANSPORT = TRANSPORT.USB) -> None:
        self._card = card
        self._transport = transport
        card.reset()

    @property
    def transport(self) -> TRANSPORT:
        return self._transport

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        response = self._card.transmit(apdu)
        return response[:-2], int.from_bytes(response[-2:], "big")

    def close(self) -> None:
        self._card.power_off()
