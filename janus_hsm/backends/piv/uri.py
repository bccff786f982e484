"""``piv:`` key URIs: which card (serial or reader) and which slot.

Grammar, in the spirit of RFC 7512 (same character classes and percent-encoding)::

    piv-uri   = "piv:" attr *( ";" attr ) [ "?" query *( "&" query ) ]
    attr      = "serial=" 1*DIGIT                 ; a YubiKey's serial number
              / "reader=" pct-encoded-text        ; the PC/SC reader name
              / "slot=" slot                      ; 9a 9c 9d 9e 82..95 (hex)
    query     = "pin-source=" uri                 ; file:/path or /path of a PIN file
              / "management-key-source=" uri     ; file holding the management key (hex)

Examples: ``piv:serial=12345678;slot=9c``,
``piv:reader=Yubico%20YubiKey%20OTP%2BFIDO%2BCCID%2000%2000;slot=9a``.

The attributes are split, decoded and refused by the grammar all key URIs share
(:mod:`janus_hsm.uri_grammar`): an attribute Janus does not know is refused by name,
never ignored, and no error repeats a value.  A PIN or management key itself is never
accepted in the URI (it would leak into shell history and process lists).
"""

from __future__ import annotations

from dataclasses import dataclass

from yubikit.piv import SLOT

from janus_hsm.errors import UriError
from janus_hsm.pin import pin_source_path
from janus_hsm.uri_grammar import PATH_SAFE, QUERY_SAFE, Grammar, percent_encode

SCHEME = "piv"
PATH_ATTRIBUTES = ("serial", "reader", "slot")
QUERY_ATTRIBUTES = ("pin-source", "management-key-source")

#: The slots that hold user keys: the four PIV slots and the twenty retired ones.
KEY_SLOTS: tuple[SLOT, ...] = (
    SLOT.AUTHENTICATION,
    SLOT.SIGNATURE,
    SLOT.KEY_MANAGEMENT,
    SLOT.CARD_AUTH,
    *(SLOT(s) for s in range(0x82, 0x96)),
)
GRAMMAR = Grammar(
    SCHEME,
    PATH_ATTRIBUTES,
    QUERY_ATTRIBUTES,
    advice="Use pin-source=file:/path (or JANUS_PIN) for the PIN and "
    "management-key-source=file:/path (or JANUS_PIV_MANAGEMENT_KEY) for the management key",
)
#: A YubiKey reports its serial in four bytes.
MAX_SERIAL = 0xFFFFFFFF


def _valid_serial(text: str) -> bool:
    # str.isdigit() also accepts other scripts' digits and superscripts ("١٢٣", "²"),
    # which int() reads as another number or refuses with a bare ValueError.
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_SERIAL


def parse_slot(text: str) -> SLOT:
    """A slot in hex (``9c``, ``0x9c``) or by its PIV name (``signature``)."""
    value = text.strip().lower()
    names = {
        "authentication": SLOT.AUTHENTICATION,
        "signature": SLOT.SIGNATURE,
        "key-management": SLOT.KEY_MANAGEMENT,
        "card-authentication": SLOT.CARD_AUTH,
    }
    if value in names:
        return names[value]
    digits = value.removeprefix("0x")
    try:
        number = int(digits, 16) if digits and len(digits) <= 2 else -1
    except ValueError:
        number = -1
    if number not in {int(s) for s in KEY_SLOTS}:
        # The value is not repeated: see janus_hsm.uri_grammar.
        raise UriError("slot= is not a PIV key slot: use 9a, 9c, 9d, 9e or 82..95 (hex)")
    return SLOT(number)


@dataclass(frozen=True)
class PivUri:
    """A parsed ``piv:`` URI. Every attribute is optional; ``slot`` names the key."""

    serial: int | None = None
    reader: str | None = None
    slot: SLOT | None = None
    pin_source: str | None = None
    management_key_source: str | None = None

    @classmethod
    def parse(cls, text: str) -> PivUri:
        attributes = GRAMMAR.parse(text)
        serial = attributes.text("serial")
        if serial is not None and not _valid_serial(serial):
            raise UriError(
                f"serial= must be a decimal number (ASCII digits 0-9, at most {MAX_SERIAL})"
            )
        reader = attributes.text("reader")
        if reader is not None and not reader:
            raise UriError("reader= must not be empty")
        for source in ("pin-source", "management-key-source"):
            value = attributes.text(source)
            if value is not None:
                pin_source_path(value)  # a file: URI or an absolute path, else UriError
        slot = attributes.text("slot")
        return cls(
            serial=int(serial) if serial is not None else None,
            reader=reader,
            slot=parse_slot(slot) if slot is not None else None,
            pin_source=attributes.text("pin-source"),
            management_key_source=attributes.text("management-key-source"),
        )

    def __str__(self) -> str:
        parts = []
        if self.serial is not None:
            parts.append(f"serial={self.serial}")
        if self.reader is not None:
            parts.append(f"reader={percent_encode(self.reader.encode(), _READER_SAFE)}")
        if self.slot is not None:
            parts.append(f"slot={self.slot:02x}")
        text = f"{SCHEME}:" + ";".join(parts)
        query = []
        if self.pin_source is not None:
            query.append(f"pin-source={percent_encode(self.pin_source.encode(), QUERY_SAFE)}")
        if self.management_key_source is not None:
            encoded = percent_encode(self.management_key_source.encode(), QUERY_SAFE)
            query.append(f"management-key-source={encoded}")
        if query:
            text += "?" + "&".join(query)
        return text

    def card_uri(self) -> PivUri:
        """The same URI without the slot: it names the card only."""
        return PivUri(self.serial, self.reader, None, self.pin_source, self.management_key_source)

    def with_slot(self, slot: SLOT | None) -> PivUri:
        return PivUri(self.serial, self.reader, slot, self.pin_source, self.management_key_source)

    def public(self) -> PivUri:
        """The URI a handle prints: card and slot only (no file paths to secrets)."""
        return PivUri(self.serial, self.reader if self.serial is None else None, self.slot)


# Reader names contain spaces and '+'; encode those, keep the rest readable.
_READER_SAFE = frozenset(PATH_SAFE - {"+", "&", "="})
