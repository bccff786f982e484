"""Finding PIV cards through PC/SC: YubiKeys by serial, any PIV card by reader name.

Uses ykman's PC/SC layer (pyscard underneath), which opens readers exclusively so that
another program cannot interleave APDUs with ours.  Every reader is considered, not only
those named "Yubico YubiKey": other PIV cards (and YubiKeys over NFC readers) are reached
by reader name, and a YubiKey's serial is read from the card itself (firmware 5.0.3+).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yubikit.core.smartcard import SmartCardConnection
from yubikit.piv import PivSession

from janus_hsm.errors import TokenNotFoundError

from .errors import CONNECTION_LOST


@dataclass(frozen=True)
class CardInfo:
    """One reader with a PIV card in it."""

    reader: str
    serial: int | None
    version: str

    def describe(self) -> str:
        if self.serial is not None:
            return f"YubiKey {self.serial} (PIV {self.version}, reader {self.reader!r})"
        return f"PIV card in reader {self.reader!r}"


def _readers() -> list[Any]:
    try:
        from ykman.pcsc import list_devices
    except ImportError as exc:  # pyscard missing
        raise TokenNotFoundError(
            f"PC/SC support is not installed ({exc}); install janus[piv] (pyscard)"
        ) from None
    try:
        return list(list_devices(name_filter=""))  # type: ignore[no-untyped-call]
    except Exception as exc:  # pcscd not running, no readers
        raise TokenNotFoundError(
            f"cannot list smart card readers ({type(exc).__name__}: {exc}). "
            "Is pcscd running and the card inserted?"
        ) from None


def _open(device: Any) -> SmartCardConnection:
    connection: SmartCardConnection = device.open_connection(SmartCardConnection)
    return connection


def _probe(device: Any) -> CardInfo | None:
    try:
        connection = _open(device)
    except Exception:  # empty reader, or a card held by someone else
        return None
    try:
        session = PivSession(connection)
        serial: int | None
        try:
            serial = session.get_serial()
        except Exception:  # not a YubiKey, or firmware older than 5.0.3
            serial = None
        return CardInfo(str(device.fingerprint), serial, str(session.version))
    except Exception:  # no PIV application on this card
        return None
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def _serial_of(connection: SmartCardConnection) -> int | None:
    try:
        return PivSession(connection).get_serial()
    except Exception:
        return None


def list_cards() -> list[CardInfo]:
    """Every reader holding a card with a PIV application."""
    return [info for info in map(_probe, _readers()) if info is not None]


def find_card(
    *, serial: int | None, reader: str | None
) -> tuple[CardInfo, Callable[[], SmartCardConnection]]:
    """The one card the URI's serial / reader select, and a way to (re)connect to it."""
    cards = list_cards()
    matches = [
        c
        for c in cards
        if (serial is None or c.serial == serial) and (reader is None or c.reader == reader)
    ]
    wanted = (
        " and ".join(
            p
            for p in (
                f"serial={serial}" if serial is not None else "",
                f"reader={reader!r}" if reader is not None else "",
            )
            if p
        )
        or "(any)"
    )
    if not matches:
        seen = ", ".join(c.describe() for c in cards) or "none"
        raise TokenNotFoundError(
            f"no PIV card matches {wanted} (cards present: {seen}). Insert the card, or "
            "check serial= / reader= in the URI (`janus keys list piv:` shows them)"
        )
    if len(matches) > 1:
        raise TokenNotFoundError(
            f"{len(matches)} PIV cards match {wanted}; add serial= or reader= to the URI"
        )
    info = matches[0]

    def connect() -> SmartCardConnection:
        for device in _readers():
            if str(device.fingerprint) == info.reader:
                try:
                    connection = _open(device)
                except CONNECTION_LOST as exc:
                    raise TokenNotFoundError(
                        f"{info.describe()} is no longer reachable ({type(exc).__name__})"
                    ) from None
                except Exception as exc:
                    raise TokenNotFoundError(f"cannot open {info.describe()}: {exc}") from None
                if info.serial is not None and _serial_of(connection) != info.serial:
                    with contextlib.suppress(Exception):
                        connection.close()
                    raise TokenNotFoundError(
                        f"reader {info.reader!r} now holds another card than YubiKey {info.serial}"
                    )
                return connection
        raise TokenNotFoundError(f"{info.describe()} was removed")

    return info, connect
