"""The p11-kit RPC wire format: frames, message headers, and the typed values inside.

Hand-written because no Python library speaks this protocol; the encoding follows
p11-kit's rpc-message.c and rpc-transport.c (draft-ueno-pkcs11-rpc). Everything is big
endian; a CK_ULONG travels as 64 bits whatever the peer's word size. Every read checks its
bounds and raises :class:`MalformedMessage`, so the server can drop a bad connection
without touching any state.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from agent.hsm_service.p11kit import constants as ck
from agent.hsm_service.p11kit.calls import CALLS, ERROR_CALL
from agent.hsm_service.p11kit.errors import MalformedMessage

# The client sends this in C_Initialize; anything else is not a p11-kit client.
HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
# Protocol versions this server speaks (version 1 only adds C_InitToken2).
PROTOCOL_VERSION_MAX = 1
FRAME_HEADER = struct.Struct(">III")
# A sign request carries at most the data to sign; nothing legitimate comes close.
MAX_MESSAGE = 1 << 20
MAX_OPTIONS = 4096
MAX_ARRAY = 4096
MAX_ATTRIBUTE_DEPTH = 2
_NULL_LENGTH = 0xFFFFFFFF

# How an attribute's value travels (p11-kit's map_attribute_to_value_type); every type not
# listed here is a byte array.
_BOOL_ATTRIBUTES = frozenset(
    {
        ck.CKA_TOKEN,
        ck.CKA_PRIVATE,
        0x86,  # CKA_TRUSTED
        ck.CKA_SENSITIVE,
        ck.CKA_ENCRYPT,
        ck.CKA_DECRYPT,
        ck.CKA_WRAP,
        ck.CKA_UNWRAP,
        ck.CKA_SIGN,
        ck.CKA_SIGN_RECOVER,
        ck.CKA_VERIFY,
        ck.CKA_VERIFY_RECOVER,
        ck.CKA_DERIVE,
        ck.CKA_EXTRACTABLE,
        ck.CKA_LOCAL,
        ck.CKA_NEVER_EXTRACTABLE,
        ck.CKA_ALWAYS_SENSITIVE,
        ck.CKA_MODIFIABLE,
        ck.CKA_COPYABLE,
        0x200,  # CKA_SECONDARY_AUTH
        ck.CKA_ALWAYS_AUTHENTICATE,
        ck.CKA_WRAP_WITH_TRUSTED,
        0x301,  # CKA_RESET_ON_INIT
        0x302,  # CKA_HAS_RESET
        0x405,  # CKA_COLOR
    }
)
_ULONG_ATTRIBUTES = frozenset(
    {
        ck.CKA_CLASS,
        0x80,  # CKA_CERTIFICATE_TYPE
        0x87,  # CKA_CERTIFICATE_CATEGORY
        0x88,  # CKA_JAVA_MIDP_SECURITY_DOMAIN
        ck.CKA_KEY_TYPE,
        0x121,  # CKA_MODULUS_BITS
        0x133,  # CKA_PRIME_BITS
        0x134,  # CKA_SUB_PRIME_BITS
        0x160,  # CKA_VALUE_BITS
        0x161,  # CKA_VALUE_LEN
        0x166,  # CKA_KEY_GEN_MECHANISM
        0x201,  # CKA_AUTH_PIN_FLAGS
        0x300,  # CKA_HW_FEATURE_TYPE
        0x400,  # CKA_PIXEL_X
        0x401,  # CKA_PIXEL_Y
        0x402,  # CKA_RESOLUTION
        0x403,  # CKA_CHAR_ROWS
        0x404,  # CKA_CHAR_COLUMNS
        0x406,  # CKA_BITS_PER_PIXEL
        0x500,  # CKA_MECHANISM_TYPE
    }
)
_TEMPLATE_ATTRIBUTES = frozenset(
    {ck.CKA_WRAP_TEMPLATE, ck.CKA_UNWRAP_TEMPLATE, ck.CKA_DERIVE_TEMPLATE}
)
_DATE_ATTRIBUTES = frozenset({0x110, 0x111})  # CKA_START_DATE, CKA_END_DATE

AttributeValue = bool | int | bytes | tuple[int, ...] | tuple["Attribute", ...]


class Attribute(NamedTuple):
    """One attribute of a template; ``value`` None is "unavailable" (ulValueLen = -1)."""

    type: int
    value: AttributeValue | None


class Frame(NamedTuple):
    """One transport frame: the caller's serial (echoed back) and the message."""

    code: int
    message: bytes


def frame_lengths(header: bytes) -> tuple[int, int, int]:
    """Check a frame header; return (code, options length, message length)."""
    code, options_length, message_length = FRAME_HEADER.unpack(header)
    if options_length > MAX_OPTIONS:
        raise MalformedMessage("frame options too long")
    if message_length > MAX_MESSAGE or message_length < 4:
        raise MalformedMessage("frame message length out of range")
    return code, options_length, message_length


def encode_frame(code: int, message: bytes) -> bytes:
    return FRAME_HEADER.pack(code, 0, len(message)) + message


class Reader:
    """Reads a request's arguments in order; every method checks bounds."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.call_id = self.uint32()
        if self.call_id == ERROR_CALL or self.call_id >= len(CALLS):
            raise MalformedMessage("unknown call id")
        signature = self.byte_array()
        expected = CALLS[self.call_id].request
        if signature is None or expected is None or signature != expected.encode():
            raise MalformedMessage("call signature does not match the call")

    @property
    def name(self) -> str:
        return CALLS[self.call_id].name

    def _take(self, count: int) -> bytes:
        if count < 0 or self._pos + count > len(self._data):
            raise MalformedMessage("message too short")
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def byte(self) -> int:
        return self._take(1)[0]

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self._take(4))[0]
        return value

    def ulong(self) -> int:
        value: int = struct.unpack(">Q", self._take(8))[0]
        return value

    def byte_array(self) -> bytes | None:
        """A length-prefixed byte string; the length 0xffffffff is NULL."""
        length = self.uint32()
        if length == _NULL_LENGTH:
            return None
        if length >= 0x7FFFFFFF:
            raise MalformedMessage("byte array length out of range")
        return self._take(length)

    def bytes_argument(self) -> bytes:
        """An ``ay`` argument: a presence byte, then the bytes (or only a length)."""
        present = self.byte()
        if not present:
            self.uint32()
            return b""
        return self.byte_array() or b""

    def output_size(self) -> int | None:
        """An ``fy`` / ``fu`` argument: room the caller has; None when it asks for the size."""
        size = self.uint32()
        if size == 0:
            return None
        if size == _NULL_LENGTH:
            return 0
        return size

    def attribute_template(self, depth: int = 0) -> list[tuple[int, int]]:
        """An ``fA`` argument: the attribute types asked for and the caller's buffer sizes."""
        count = self.uint32()
        if count > MAX_ARRAY:
            raise MalformedMessage("too many attributes")
        result = []
        for _ in range(count):
            kind = self.uint32()
            length = self.uint32()
            # p11-kit's client always follows a template-valued attribute with its nested
            # buffer description, even when it only asks for the length.
            if kind in _TEMPLATE_ATTRIBUTES:
                if depth >= MAX_ATTRIBUTE_DEPTH:
                    raise MalformedMessage("attribute templates nested too deep")
                self.attribute_template(depth + 1)
            result.append((kind, length))
        return result

    def attributes(self, depth: int = 0) -> list[Attribute]:
        """An ``aA`` argument: attributes with typed values."""
        count = self.uint32()
        if count > MAX_ARRAY:
            raise MalformedMessage("too many attributes")
        return [self._attribute(depth) for _ in range(count)]

    def _attribute(self, depth: int) -> Attribute:
        kind = self.uint32()
        if not self.byte():
            return Attribute(kind, None)
        length = self.uint32()
        value: AttributeValue
        if kind in _BOOL_ATTRIBUTES:
            value = bool(self.byte())
        elif kind in _ULONG_ATTRIBUTES:
            value = self.ulong()
        elif kind == ck.CKA_ALLOWED_MECHANISMS:
            count = self.uint32()
            if count > MAX_ARRAY:
                raise MalformedMessage("too many mechanisms")
            value = tuple(self.ulong() for _ in range(count))
        elif kind in _TEMPLATE_ATTRIBUTES:
            if depth >= MAX_ATTRIBUTE_DEPTH:
                raise MalformedMessage("attribute templates nested too deep")
            value = tuple(self.attributes(depth + 1))
        else:
            raw = self.byte_array() or b""
            if kind in _DATE_ATTRIBUTES and len(raw) not in (0, 8):
                raise MalformedMessage("bad date attribute")
            if len(raw) > length:
                raise MalformedMessage("attribute value longer than announced")
            value = raw
        return Attribute(kind, value)

    def mechanism_type(self) -> int:
        """The type of an ``M`` argument; its parameters follow and depend on it."""
        return self.uint32()

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedMessage("trailing bytes after the arguments")


class Writer:
    """Builds a response message: the call id, its signature, then the values."""

    def __init__(self, call_id: int) -> None:
        signature = CALLS[call_id].response.encode()
        self._parts: list[bytes] = [struct.pack(">II", call_id, len(signature)), signature]

    @classmethod
    def error(cls, rv: int) -> bytes:
        writer = cls(ERROR_CALL)
        writer.ulong(rv)
        return writer.getvalue()

    def getvalue(self) -> bytes:
        return b"".join(self._parts)

    def byte(self, value: int) -> None:
        self._parts.append(bytes((value & 0xFF,)))

    def uint32(self, value: int) -> None:
        self._parts.append(struct.pack(">I", value))

    def ulong(self, value: int) -> None:
        self._parts.append(struct.pack(">Q", value))

    def byte_array(self, value: bytes | None) -> None:
        if value is None:
            self.uint32(_NULL_LENGTH)
        else:
            self.uint32(len(value))
            self._parts.append(value)

    def version(self, major: int, minor: int) -> None:
        self._parts.append(bytes((major, minor)))

    def space_string(self, text: str, width: int) -> None:
        """A fixed-width, blank-padded PKCS#11 string (truncated to fit)."""
        raw = text.encode("utf-8")[:width]
        self.byte_array(raw.ljust(width, b" "))

    def bytes_result(self, value: bytes | None, length: int) -> None:
        """An ``ay`` result: the bytes, or (value None) only the length it needs."""
        if value is None:
            self.byte(0)
            self.uint32(length)
        else:
            self.byte(1)
            self.byte_array(value)

    def ulongs_result(self, values: Sequence[int], *, room: int | None) -> None:
        """An ``au`` result; only the count when the caller asked for it or lacks room."""
        if room is None or room < len(values):
            self.byte(0)
            self.uint32(len(values))
            return
        self.byte(1)
        self.uint32(len(values))
        for value in values:
            self.ulong(value)

    def attributes(self, attributes: Sequence[Attribute]) -> None:
        self.uint32(len(attributes))
        for attribute in attributes:
            self._attribute(attribute)

    def _attribute(self, attribute: Attribute) -> None:
        kind, value = attribute
        self.uint32(kind)
        if value is None:
            self.byte(0)
            return
        self.byte(1)
        if isinstance(value, bool):
            self.uint32(1)
            self.byte(int(value))
        elif isinstance(value, int):
            self.uint32(8)
            self.ulong(value)
        elif isinstance(value, bytes):
            self.uint32(len(value))
            self.byte_array(value)
        elif kind == ck.CKA_ALLOWED_MECHANISMS:
            self.uint32(8 * len(value))
            self.uint32(len(value))
            for mechanism in value:
                assert isinstance(mechanism, int)
                self.ulong(mechanism)
        else:
            raise ValueError(f"cannot encode attribute {kind:#x}")
