"""Finding FIDO2 authenticators: USB HID, PC/SC (CTAP over CCID or NFC readers), in process.

Why each transport is guarded: a machine without hidraw access, without pyscard or
without a running pcscd is normal, and must mean "no devices of that kind" rather than
a crash; the reason is logged at debug level (``janus -v``) for whoever wonders why a
key is not seen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from fido2.ctap import CtapDevice

from janus_hsm.fido2.errors import AmbiguousDeviceError, NoDeviceError, SoftwareDeviceRefusedError

log = logging.getLogger(__name__)

HID = "usb-hid"
PCSC = "pcsc"
IN_PROCESS = "in-process"

#: TEST ONLY.  A list of state files (separated by ``os.pathsep``) of software
#: authenticators that discovery adds to the real devices, so CLI tests run without USB
#: or pcscd.  Never set in production: the state file holds the credential keys in the
#: clear.  Honoured only with :data:`INSECURE_TESTING_ENV` ``=1`` as well; without it
#: discovery refuses to run.
SOFTWARE_AUTHENTICATOR_ENV = "JANUS_FIDO2_SOFTWARE_AUTHENTICATOR"
#: The entry-point group that provides the software authenticator: one callable
#: ``(state_path, presence) -> CtapDevice``.  The test-only implementation lives outside
#: this package (hardware/fido2_software_devices.py, registered in pyproject.toml), so
#: janus_hsm imports nothing of ``hardware`` and an install without it works unchanged.
SOFTWARE_AUTHENTICATOR_GROUP = "janus.fido2_software_authenticators"
_PRESENCE_ANSWERS = ("approve", "deny", "timeout")
#: TEST ONLY: what the software authenticators' "person" does: approve, deny or timeout.
SOFTWARE_PRESENCE_ENV = "JANUS_FIDO2_SOFTWARE_PRESENCE"
#: TEST ONLY.  ``1`` marks a test run: the only way software authenticators are found
#: by discovery, registered (``janus fido2 register``) or asked for approvals.  The
#: second, deliberately separate switch, so one stray variable cannot swap a security
#: key for a file (docs/testing-hardware.md).
INSECURE_TESTING_ENV = "JANUS_INSECURE_TESTING"


def insecure_testing() -> bool:
    """True only in a test run (:data:`INSECURE_TESTING_ENV` is exactly ``1``)."""
    return os.environ.get(INSECURE_TESTING_ENV) == "1"


def require_real_device(device: Fido2Device, doing: str) -> None:
    """Refuse an in-process (software) authenticator for ``doing`` outside a test run."""
    if device.transport == IN_PROCESS and not insecure_testing():
        raise SoftwareDeviceRefusedError(
            f"{doing}: {device.name!r} is an in-process software authenticator (test only: "
            "its keys sit in a file and its touch is scripted); refused unless "
            f"{INSECURE_TESTING_ENV}=1 marks a test run"
        )


@dataclass
class Fido2Device:
    """One authenticator and how it was reached; ``device`` is what fido2 talks to."""

    device: CtapDevice
    transport: str
    name: str

    @classmethod
    def in_process(cls, device: CtapDevice, name: str = "in-process authenticator") -> Fido2Device:
        """Wrap a CtapDevice built in this process (tests use the software authenticator)."""
        return cls(device, IN_PROCESS, name)

    def close(self) -> None:
        close = getattr(self.device, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:
                log.debug("closing %s failed: %r", self.name, exc)


def _hid_devices() -> list[Fido2Device]:
    try:
        from fido2.hid import CtapHidDevice

        found = list(CtapHidDevice.list_devices())
    except Exception as exc:
        log.debug("no USB HID FIDO devices: %r", exc)
        return []
    return [
        Fido2Device(d, HID, d.descriptor.product_name or f"USB HID {d.descriptor.path!r}")
        for d in found
    ]


def _pcsc_devices() -> list[Fido2Device]:
    try:
        from fido2.pcsc import CtapPcscDevice
    except ImportError as exc:
        log.debug("no PC/SC FIDO devices: pyscard is not installed (%s)", exc)
        return []
    try:
        found = list(CtapPcscDevice.list_devices())
    except Exception as exc:
        log.debug("no PC/SC FIDO devices: %r", exc)
        return []
    return [Fido2Device(d, PCSC, getattr(d, "_name", None) or repr(d)) for d in found]


def _software_devices() -> list[Fido2Device]:
    spec = os.environ.get(SOFTWARE_AUTHENTICATOR_ENV)
    if not spec:
        return []
    if not insecure_testing():
        raise SoftwareDeviceRefusedError(
            f"{SOFTWARE_AUTHENTICATOR_ENV} is set, which is for tests only (a software "
            "authenticator keeps its credential keys in a file and approves without a "
            f"touch), and {INSECURE_TESTING_ENV}=1 is not: refused. Unset "
            f"{SOFTWARE_AUTHENTICATOR_ENV}"
        )
    log.warning("%s is set: using software authenticators (test only)", SOFTWARE_AUTHENTICATOR_ENV)
    answer = os.environ.get(SOFTWARE_PRESENCE_ENV, "approve")
    if answer not in _PRESENCE_ANSWERS:
        raise SoftwareDeviceRefusedError(
            f"{SOFTWARE_PRESENCE_ENV} must be one of {', '.join(_PRESENCE_ANSWERS)}"
        )
    factory = _software_authenticator_factory()
    devices = []
    for path in spec.split(os.pathsep):
        device = factory(path, answer)
        devices.append(Fido2Device(device, IN_PROCESS, f"software authenticator {Path(path).name}"))
    return devices


def _software_authenticator_factory() -> Callable[[str, str], CtapDevice]:
    """The one registered software authenticator (see :data:`SOFTWARE_AUTHENTICATOR_GROUP`)."""
    found = list(entry_points(group=SOFTWARE_AUTHENTICATOR_GROUP))
    if len(found) != 1:
        raise SoftwareDeviceRefusedError(
            f"{SOFTWARE_AUTHENTICATOR_ENV} is set, but {len(found)} software authenticators "
            f"are registered (entry-point group {SOFTWARE_AUTHENTICATOR_GROUP}); exactly one "
            "must be: install the package from a source checkout, which registers the "
            "test authenticator"
        )
    try:
        factory: Callable[[str, str], CtapDevice] = found[0].load()
    except ImportError as exc:
        raise SoftwareDeviceRefusedError(
            f"the software authenticator {found[0].value} cannot be imported ({exc.name}): "
            "it ships with the source checkout only"
        ) from None
    return factory


#: The discovery functions, in order; tests may replace them.
SOURCES: list[Callable[[], list[Fido2Device]]] = [_hid_devices, _pcsc_devices, _software_devices]


def list_devices() -> list[Fido2Device]:
    """Every connected authenticator that speaks CTAP2 (CTAP1-only keys are left out:
    they have no PIN protocol 2 and no hmac-secret)."""
    from fido2.hid import CAPABILITY

    devices: list[Fido2Device] = []
    for source in SOURCES:
        for dev in source():
            if CAPABILITY.CBOR in CAPABILITY(dev.device.capabilities):
                devices.append(dev)
            else:
                log.debug("skipping %s: CTAP1/U2F only", dev.name)
                dev.close()
    return devices


def select_device(devices: Iterable[Fido2Device], name: str | None = None) -> Fido2Device:
    """The one device to use: the only one connected, or the one whose name contains
    ``name``.  No guessing between several: a touch on the wrong key is a wasted touch."""
    candidates = [d for d in devices if name is None or name in d.name]
    if not candidates:
        raise NoDeviceError(
            "no FIDO2 authenticator found"
            + (f" matching {name!r}" if name else "")
            + ": plug in your security key (USB) or put it on the reader (NFC/PC-SC); "
            "`janus fido2 list` shows what is connected"
        )
    if len(candidates) > 1:
        names = ", ".join(repr(d.name) for d in candidates)
        raise AmbiguousDeviceError(
            f"{len(candidates)} authenticators are connected ({names}); pick one with --device"
        )
    return candidates[0]


__all__ = [
    "HID",
    "INSECURE_TESTING_ENV",
    "IN_PROCESS",
    "PCSC",
    "SOFTWARE_AUTHENTICATOR_ENV",
    "SOFTWARE_AUTHENTICATOR_GROUP",
    "SOFTWARE_PRESENCE_ENV",
    "Fido2Device",
    "insecure_testing",
    "list_devices",
    "require_real_device",
    "select_device",
]
