"""The PIV key provider: keys in the slots of one PIV card (YubiKey or other).

Generation happens on the card (never import), with the PIN and touch policies the caller
asks for; a certificate for the new public key is then written into the slot so that the
key can be found again on cards that keep no metadata (firmware before 5.3), as every PIV
middleware expects.  Keys are named by slot (``piv:serial=…;slot=9c``).
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from yubikit.core import NotSupportedError
from yubikit.core.smartcard import SmartCardConnection
from yubikit.piv import PIN_POLICY, SLOT, TOUCH_POLICY, PivSession

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import (
    KeyExistsError,
    KeyNotFoundError,
    MechanismUnsupportedError,
    TokenNotFoundError,
    UriError,
)
from janus_hsm.pin import PinSource, resolve_pin_source
from janus_hsm.provider import KeyProvider

from . import management
from .card import PivCard, TouchCallback, log_touch
from .discovery import CardInfo
from .handle import PivKeyHandle
from .slots import (
    KEY_TYPES,
    SlotInfo,
    read_slot,
    resolve_pin_policy,
    resolve_touch_policy,
)
from .uri import KEY_SLOTS, PivUri

log = logging.getLogger(__name__)

# Cards found by discovery, by reader name: one PivCard (one lock, one PIN state) each.
# The cards this process has opened, by reader, with what discovery said about them.
_cards: dict[str, tuple[CardInfo, PivCard]] = {}
_cards_lock = threading.Lock()
#: A slot certificate's end: RFC 5280's "no well-defined expiration date".
_NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def _locate(uri: PivUri) -> tuple[CardInfo, Callable[[], SmartCardConnection] | None]:
    """The card a URI selects: by discovery, or among those this process holds open.

    A card is opened exclusively, so discovery cannot see one this process already
    holds (e.g. a second key of the same card in one command); then there is nothing to
    connect to anew (None).
    """
    from .discovery import find_card

    try:
        return find_card(serial=uri.serial, reader=uri.reader)
    except TokenNotFoundError:
        with _cards_lock:
            held = [
                info
                for info, card in _cards.values()
                if card.connected
                and (uri.serial is None or info.serial == uri.serial)
                and (uri.reader is None or info.reader == uri.reader)
            ]
        if len(held) != 1:
            raise
        return held[0], None


class PivProvider(KeyProvider):
    """Keys on one PIV card. Thread-safe: every card operation holds the card's lock."""

    def __init__(
        self,
        card: PivCard,
        base_uri: PivUri,
        *,
        allow_extractable: bool = False,
        management_key_source: management.ManagementKeySource | None = None,
        pin_source: PinSource,
        on_touch: TouchCallback | None = None,
    ) -> None:
        self._card = card
        self._base_uri = base_uri
        #: This provider's own: one card opened twice (two providers) keeps one lock
        #: and one PIN state, but each provider verifies with its own source.
        self._pin_source = pin_source
        self._on_touch: TouchCallback = on_touch or log_touch
        self.allow_extractable = allow_extractable
        self._management_key_source = management_key_source
        #: After the first management-key use: True when it was the factory default key
        #: (the CLI prints a warning), None before any use.
        self.default_management_key: bool | None = None
        self._warned_default = False

    # --- opening --------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        uri: str | PivUri,
        *,
        pin_source: PinSource | None = None,
        allow_extractable: bool = False,
        on_touch: TouchCallback | None = None,
        management_key_source: management.ManagementKeySource | None = None,
    ) -> PivProvider:
        """Find the card a URI names through PC/SC (by serial= and/or reader=)."""
        parsed = _as_uri(uri)
        info, connect = _locate(parsed)
        if pin_source is None:
            pin_source = resolve_pin_source(
                parsed.pin_source, prompt=f"PIV PIN for {info.describe()}: "
            )
        # Never take a card's lock here: it may be held for seconds (a touch wait), and
        # _cards_lock would then block opening every other card too.
        with _cards_lock:
            known = _cards.get(info.reader)
            if known is None:
                if connect is None:  # held a moment ago, closed since: look again
                    raise TokenNotFoundError(f"{info.describe()} was closed; try again")
                card = PivCard(description=info.describe(), connect=connect)
                _cards[info.reader] = (info, card)
            else:
                card = known[1]
        base = PivUri(serial=info.serial, reader=None if info.serial else info.reader)
        return cls(
            card,
            base,
            allow_extractable=allow_extractable,
            management_key_source=management_key_source
            or management.resolve_management_key_source(parsed.management_key_source),
            pin_source=pin_source,
            on_touch=on_touch,
        )

    @classmethod
    def from_connection(
        cls,
        connection: SmartCardConnection,
        *,
        uri: str | PivUri = "piv:",
        pin_source: PinSource | None = None,
        allow_extractable: bool = False,
        on_touch: TouchCallback | None = None,
        management_key_source: management.ManagementKeySource | None = None,
        description: str | None = None,
    ) -> PivProvider:
        """A provider over a connection the caller opened (a virtual card, a custom reader).

        The connection stays the caller's: closing the provider does not close it, and a
        lost connection is not reopened.
        """
        parsed = _as_uri(uri)
        serial: int | None = None
        try:
            serial = PivSession(connection).get_serial()
        except Exception:  # not a YubiKey or firmware before 5.0.3
            serial = parsed.serial
        if parsed.serial is not None and serial != parsed.serial:
            from janus_hsm.errors import TokenNotFoundError

            raise TokenNotFoundError(f"the card is serial {serial}, not {parsed.serial}")
        where = description or (f"YubiKey {serial}" if serial else "PIV card")
        if pin_source is None:
            pin_source = resolve_pin_source(parsed.pin_source, prompt=f"PIV PIN for {where}: ")
        card = PivCard(description=where, connection=connection)
        base = PivUri(serial=serial, reader=None if serial else parsed.reader)
        return cls(
            card,
            base,
            allow_extractable=allow_extractable,
            management_key_source=management_key_source
            or management.resolve_management_key_source(parsed.management_key_source),
            pin_source=pin_source,
            on_touch=on_touch,
        )

    # --- facts ------------------------------------------------------------------------

    @property
    def card(self) -> PivCard:
        return self._card

    @property
    def card_uri(self) -> str:
        return str(self._base_uri)

    @property
    def version(self) -> tuple[int, int, int]:
        version = self._card.run("reading the version", lambda s: s.version)
        return (version.major, version.minor, version.patch)

    def describe(self) -> str:
        return self._card.description

    # --- KeyProvider ------------------------------------------------------------------

    def generate(
        self,
        uri: str | PivUri,
        algorithm: Algorithm,
        *,
        pin_policy: PIN_POLICY = PIN_POLICY.DEFAULT,
        touch_policy: TOUCH_POLICY = TOUCH_POLICY.DEFAULT,
    ) -> PivKeyHandle:
        """Generate a key in the URI's slot, then store a certificate for it there."""
        slot = self._slot(uri, "to generate a key")
        key_type = KEY_TYPES[algorithm]

        def generate(session: PivSession) -> Any:
            if read_slot(session, slot) is not None:
                raise KeyExistsError(
                    f"slot {slot:02x} on {self.describe()} already holds a key; Janus never "
                    "overwrites one. Pick another slot, or delete the old key first"
                )
            try:
                session.check_key_support(key_type, pin_policy, touch_policy, True)
            except NotSupportedError as exc:
                raise MechanismUnsupportedError(
                    f"{self.describe()} (firmware {session.version}) cannot generate "
                    f"{algorithm.value} keys with these policies: {exc}. Ed25519 and X25519 "
                    "need YubiKey firmware 5.7 or later"
                ) from None
            self._authenticate(session)
            return session.generate_key(slot, key_type, pin_policy, touch_policy)

        public = self._card.run(f"{algorithm.value} key generation", generate, retry=False)
        info = SlotInfo(
            slot=slot,
            algorithm=algorithm,
            public_key=public,
            pin_policy=resolve_pin_policy(slot, pin_policy),
            touch_policy=resolve_touch_policy(touch_policy),
            generated=True,
        )
        handle = self._handle(info)
        certificate = self._slot_certificate(handle)

        def store(session: PivSession) -> None:
            self._authenticate(session)
            session.put_certificate(slot, certificate)

        self._card.run("storing the slot certificate", store, retry=False)
        return handle

    def lookup(self, uri: str | PivUri) -> PivKeyHandle:
        slot = self._slot(uri, "to name a key")
        info = self._card.run(f"reading slot {slot:02x}", lambda s: read_slot(s, slot))
        if info is None:
            raise KeyNotFoundError(
                f"slot {slot:02x} on {self.describe()} holds no key; "
                f"`janus keys list {self._base_uri}` shows the occupied slots"
            )
        return self._handle(info)

    def list_keys(self) -> list[PivKeyHandle]:
        def read_all(session: PivSession) -> list[SlotInfo]:
            found = []
            for slot in KEY_SLOTS:
                try:
                    info = read_slot(session, slot)
                except MechanismUnsupportedError:
                    continue  # RSA keys and other types Janus does not use
                if info is not None:
                    found.append(info)
            return found

        return [self._handle(i) for i in self._card.run("listing slots", read_all)]

    def delete(self, uri: str | PivUri) -> None:
        handle = self.lookup(uri)
        slot = handle.slot

        def delete(session: PivSession) -> None:
            if session.version < (5, 7, 0):
                raise MechanismUnsupportedError(
                    f"{self.describe()} has firmware {session.version}, which cannot delete "
                    "a single PIV key (5.7+ can). Generate over it with `ykman piv keys "
                    "generate`, or reset the PIV application (`ykman piv reset`, destroys "
                    "every PIV key)"
                )
            self._authenticate(session)
            session.delete_key(slot)
            session.delete_certificate(slot)

        self._card.run(f"deleting slot {slot:02x}", delete, retry=False)

    def close(self) -> None:
        self._card.close()

    # --- helpers ----------------------------------------------------------------------

    def _slot(self, uri: str | PivUri, why: str) -> SLOT:
        parsed = _as_uri(uri)
        for name in ("serial", "reader"):
            wanted, have = getattr(parsed, name), getattr(self._base_uri, name)
            if wanted is not None and have is not None and wanted != have:
                raise UriError(f"{uri} names {name} {wanted}, but this provider is {have}")
        if parsed.slot is None:
            raise UriError(f"{why} the URI must name a slot, e.g. {self._base_uri};slot=9c")
        return parsed.slot

    def _handle(self, info: SlotInfo) -> PivKeyHandle:
        uri = str(self._base_uri.with_slot(info.slot).public())
        return PivKeyHandle(
            self._card,
            info,
            uri=uri,
            allow_extractable=self.allow_extractable,
            pin_source=self._pin_source,
            on_touch=self._on_touch,
        )

    def _authenticate(self, session: PivSession) -> None:
        try:
            meta = session.get_management_key_metadata()
            if meta.touch_policy in (TOUCH_POLICY.ALWAYS, TOUCH_POLICY.CACHED):
                self._on_touch(f"Touch your YubiKey ({self.describe()}) to use its management key")
        except Exception:  # no metadata before 5.3: no touch policy to announce
            log.debug("no management key metadata on %s", self.describe())
        default = management.authenticate(
            session,
            source=self._management_key_source,
            verify_pin=lambda: self._card.verify_pin(session, self._pin_source),
            where=self.describe(),
        )
        self.default_management_key = default
        if default and not self._warned_default:
            self._warned_default = True
            management.warn_default(self.describe())

    def _slot_certificate(self, handle: PivKeyHandle) -> x509.Certificate:
        """A certificate holding the slot's public key, signed by the key where it can sign.

        It is a container for the public key (PIV middleware finds keys by their
        certificates), not a trust statement: attestation is the evidence of origin.
        X25519 keys cannot sign, so theirs is signed by a throwaway Ed25519 key.
        """
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, f"Janus PIV key {handle.slot:02x}")]
        )
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .public_key(handle.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(_NO_EXPIRY)
        )
        if handle.algorithm.can_sign:
            signer: Any = handle.as_cryptography_key()
            builder = builder.issuer_name(name)
        else:
            signer = ed25519.Ed25519PrivateKey.generate()
            builder = builder.issuer_name(
                x509.Name(
                    [x509.NameAttribute(NameOID.COMMON_NAME, "Janus X25519 public key holder")]
                )
            )
        return builder.sign(signer, handle.algorithm.hash_algorithm)  # type: ignore[arg-type]


def _as_uri(uri: str | PivUri) -> PivUri:
    return uri if isinstance(uri, PivUri) else PivUri.parse(uri)
