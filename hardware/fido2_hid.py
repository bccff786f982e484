"""The software authenticator behind CTAPHID framing: a USB HID security key for tests.

These machines have no ``/dev/uhid``, so a real HID device cannot be created; instead
this is the device side of the CTAPHID transport (CTAP 2.1 §11.2.4: 64-byte reports,
an initialisation packet then continuation packets, channel ids), plugged into
python-fido2's own ``CtapHidDevice`` as its ``CtapHidConnection``.  Everything above the
raw reports (framing, channel allocation, errors) is then python-fido2's real HID code,
which is what Janus's USB discovery hands out.

Written by hand because no package provides a HID-level CTAP emulator.
"""

from __future__ import annotations

import struct
from collections import deque

from fido2.ctap import CtapError
from fido2.hid import CtapHidDevice
from fido2.hid.base import CtapHidConnection, HidDescriptor

from hardware.fido2_authenticator import SoftwareAuthenticator

REPORT_SIZE = 64
_TYPE_INIT = 0x80
_ERROR = 0x3F
_INIT_HEADER = struct.Struct(">IBH")  # channel, command | 0x80, payload length
_CONT_HEADER = struct.Struct(">IB")  # channel, sequence number


class SoftwareHidConnection(CtapHidConnection):
    """Reports in and out of a :class:`SoftwareAuthenticator`, as its USB firmware would.

    Requests are handled synchronously when their last packet arrives; the response
    packets wait in a queue for ``read_packet``.
    """

    def __init__(self, authenticator: SoftwareAuthenticator) -> None:
        self.authenticator = authenticator
        self._outgoing: deque[bytes] = deque()
        self._request: tuple[int, int, int, bytearray] | None = None  # ch, cmd, len, data
        self._sequence = 0
        self.closed = False

    def write_packet(self, data: bytes) -> None:
        if len(data) != REPORT_SIZE:
            raise ValueError(f"a CTAPHID report is {REPORT_SIZE} bytes, not {len(data)}")
        channel = struct.unpack_from(">I", data)[0]
        if data[4] & _TYPE_INIT:
            _, command, length = _INIT_HEADER.unpack_from(data)
            body = data[_INIT_HEADER.size :]
            self._request = (channel, command & 0x7F, length, bytearray(body[:length]))
            self._sequence = 0
        else:
            if self._request is None or channel != self._request[0]:
                return  # a stray continuation: a real key ignores it too
            if data[4] != self._sequence:
                self._reply(channel, _ERROR, bytes([CtapError.ERR.INVALID_SEQ]))
                self._request = None
                return
            self._sequence += 1
            self._request[3].extend(data[_CONT_HEADER.size :])
        channel, command, length, payload = self._request
        if len(payload) < length:
            return  # more continuation packets to come
        self._request = None
        try:
            response = self.authenticator.call(command, bytes(payload[:length]))
        except CtapError as exc:
            self._reply(channel, _ERROR, bytes([exc.code]))
            return
        self._reply(channel, command, response)

    def _reply(self, channel: int, command: int, payload: bytes) -> None:
        first = REPORT_SIZE - _INIT_HEADER.size
        self._outgoing.append(
            _INIT_HEADER.pack(channel, _TYPE_INIT | command, len(payload))
            + payload[:first].ljust(first, b"\0")
        )
        rest, sequence = payload[first:], 0
        step = REPORT_SIZE - _CONT_HEADER.size
        while rest:
            chunk, rest = rest[:step], rest[step:]
            self._outgoing.append(_CONT_HEADER.pack(channel, sequence) + chunk.ljust(step, b"\0"))
            sequence += 1

    def read_packet(self) -> bytes:
        if not self._outgoing:
            raise OSError("no CTAPHID report to read: the request was not complete")
        return self._outgoing.popleft()

    def close(self) -> None:
        self.closed = True


def software_hid_device(
    authenticator: SoftwareAuthenticator, *, path: str = "/dev/hidraw-janus-test"
) -> CtapHidDevice:
    """python-fido2's HID device over the software authenticator (it sends CTAPHID_INIT)."""
    descriptor = HidDescriptor(
        path=path,
        vid=0xF1D0,
        pid=0x0001,
        report_size_in=REPORT_SIZE,
        report_size_out=REPORT_SIZE,
        product_name="Janus software security key (HID)",
        serial_number=None,
    )
    return CtapHidDevice(descriptor, SoftwareHidConnection(authenticator))
