"""Finding PIV cards through PC/SC: YubiKeys by serial, any PIV card by reader name.

Uses ykman's PC/SC layer (pyscard underneath), which opens readers exclusively so that
another program cannot interleave APDUs with ours.  Every reader is considered, not only
those named "Yubico YubiKey": other PIV cards (and YubiKeys over NFC readers) are reached
by reader name, and a YubiKey's serial is read from the card itself (firmware 5.0.3+).

Reconnecting (after a pcscd restart or a USB reset) checks that the reader still holds
the same card before the PIN can go to it: by serial, or for a card without one by
what it showed at the first connect (:class:`CardIdentity`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from yubikit.core.smartcard import SmartCardConnection
from yubikit.piv import PivSession

from janus_hsm.errors import TokenLostError, TokenNotFoundError

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
    #: What the card looked like at the first connect, for cards without a serial.
    first_seen: list[CardIdentity] = []

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
                if info.serial is None:
                    try:
                        _check_identity(connection, info, first_seen)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            connection.close()
                        raise
                return connection
        raise TokenNotFoundError(f"{info.describe()} was removed")

    return info, connect


# --- recognising a card that has no serial ------------------------------------------------


@dataclass(frozen=True)
class CardIdentity:
    """What tells a card without a serial from another: its CHUID object (which holds
    the card's GUID), or else the public keys in its occupied slots.

    Both are public data: this recognises another card put into the reader, not a card
    prepared to copy them (only a key-possession challenge would).
    """

    chuid: bytes | None
    keys: tuple[tuple[int, bytes], ...]

    @property
    def empty(self) -> bool:
        return self.chuid is None and not self.keys

    def matches(self, now: CardIdentity) -> bool:
        """Same CHUID; and every key seen at first stays in its slot (new keys may
        appear: Janus generates into empty slots)."""
        if self.chuid is not None or now.chuid is not None:
            return self.chuid == now.chuid
        return set(self.keys) <= set(now.keys)


def card_identity(connection: SmartCardConnection) -> CardIdentity:
    """Read the CHUID (GET DATA 5FC102) or, without one, every key slot's public key.

    Nothing here needs the PIN or the management key; nothing is written.
    """
    from cryptography.hazmat.primitives import serialization
    from yubikit.core import BadResponseError
    from yubikit.core.smartcard import ApduError
    from yubikit.piv import OBJECT_ID

    from .uri import KEY_SLOTS

    session = PivSession(connection)
    try:
        chuid: bytes | None = session.get_object(OBJECT_ID.CHUID)
    except (ApduError, BadResponseError):
        chuid = None
    if chuid:
        return CardIdentity(chuid=chuid, keys=())
    keys = []
    for slot in KEY_SLOTS:
        try:
            if session.version >= (5, 3, 0):
                public: Any = session.get_slot_metadata(slot).public_key
            else:
                public = session.get_certificate(slot).public_key()
            spki = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except (ApduError, BadResponseError, ValueError, TypeError):
            continue  # empty slot, no certificate, or one Janus cannot read
        keys.append((int(slot), spki))
    return CardIdentity(chuid=None, keys=tuple(keys))


def _check_identity(
    connection: SmartCardConnection, info: CardInfo, first_seen: list[CardIdentity]
) -> None:
    """Remember a serial-less card at its first connect; refuse another one later.

    Runs before anything else is sent on the connection: a card that is not the one
    first opened never sees the PIN or the management key.
    """
    try:
        now = card_identity(connection)
    except CONNECTION_LOST as exc:
        raise TokenNotFoundError(
            f"{info.describe()} is no longer reachable ({type(exc).__name__})"
        ) from None
    except Exception as exc:
        raise TokenLostError(
            f"cannot tell whether reader {info.reader!r} still holds the card first "
            f"opened ({type(exc).__name__}: {exc}); nothing was sent to it. Check the "
            "card, then run the command again"
        ) from None
    if not first_seen:
        first_seen.append(now)
        return
    first = first_seen[0]
    if first.empty:
        raise TokenLostError(
            f"the connection to {info.describe()} was lost, and the card has no serial, "
            "no CHUID and had no keys when first opened, so nothing tells whether the "
            "card now in the reader is the same one; nothing was sent to it. Run the "
            "command again to open the card afresh"
        )
    if not first.matches(now):
        raise TokenLostError(
            f"reader {info.reader!r} now holds another card than the one first opened "
            "(its CHUID or slot keys differ); nothing was sent to it, no PIN. Put the "
            "original card back and retry"
        )
