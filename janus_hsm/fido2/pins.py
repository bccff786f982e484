"""FIDO2 PINs, one per authenticator: never one PIN tried on several security keys.

Why not :func:`janus_hsm.pin.resolve_pin_source`: that answers for *one* token (it
caches a prompted PIN so a dropped session can log in again), and reads ``JANUS_PIN``,
which is the keystore passphrase or a PIV/PKCS#11 PIN.  FIDO2 operations often touch
several authenticators in one go (sealing for a primary and a backup key, approvals by
several people), each with its own PIN and its own retry counter: 8 wrong PINs and the
FIDO2 application must be reset, erasing its credentials.  So here:

* a prompt is per device, names the device, and the answer is cached per device;
* ``JANUS_FIDO2_PIN`` (never ``JANUS_PIN``) or a ``--pin-source`` file is *one* PIN,
  used for one authenticator only: a second, different authenticator asking for it is
  refused (:class:`~janus_hsm.fido2.errors.Fido2SharedPinError`) before the PIN is sent.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable

from janus_hsm.errors import PinUnavailableError
from janus_hsm.fido2.devices import Fido2Device
from janus_hsm.fido2.errors import Fido2SharedPinError
from janus_hsm.pin import PinSource, pin_source_path, read_pin_file

#: The security key's PIN.  Its own variable: JANUS_PIN is the keystore passphrase or a
#: token PIN, and trying one of those as a FIDO2 PIN would burn the key's PIN retries.
FIDO2_PIN_ENV = "JANUS_FIDO2_PIN"


def device_identity(device: Fido2Device) -> str:
    """What tells two authenticators apart: the transport and its path (HID device node,
    PC/SC reader, software authenticator state file), else the object itself."""
    inner = device.device
    descriptor = getattr(inner, "descriptor", None)
    path = getattr(descriptor, "path", None)
    if path is None:
        path = getattr(inner, "_name", None)  # CtapPcscDevice: the reader name
    if path is None:
        path = getattr(inner, "_state_path", None)  # the software authenticator
    if path is None:
        path = f"object {id(inner):#x}"
    return f"{device.transport}:{path}"


def device_label(device: Fido2Device, aaguid: str | None = None) -> str:
    """How a prompt names the device: product name, AAGUID, transport and path."""
    parts = [device.transport]
    if aaguid:
        parts.insert(0, f"AAGUID {aaguid}")
    return f"{device.name!r} ({', '.join(parts)}; {device_identity(device)})"


class DevicePins:
    """Where each authenticator's PIN comes from.

    ``pin_file`` (``--pin-source``), else :data:`FIDO2_PIN_ENV`, else a prompt when
    ``interactive`` (default: stdin is a terminal), else nothing (credentials that need
    UV then fail with ``pin_required``).  The environment is read when a PIN is first
    needed, so an object made early (``keystore_opener``) sees the variable of the moment.
    """

    def __init__(
        self,
        pin_file: str | None = None,
        *,
        interactive: bool | None = None,
        prompt: Callable[[str], str] | None = None,
    ) -> None:
        self._file = pin_source_path(pin_file) if pin_file else None
        self._interactive = interactive
        self._prompt = prompt
        self._prompted: dict[str, str] = {}
        self._bound: str | None = None  # the one device a fixed PIN went to

    @property
    def where(self) -> str | None:
        """The single fixed PIN's origin (a file or the variable), or None (per-device)."""
        if self._file is not None:
            return f"pin-source {self._file}"
        if os.environ.get(FIDO2_PIN_ENV):
            return FIDO2_PIN_ENV
        return None

    @property
    def fixed(self) -> bool:
        """True when one PIN (file or environment) would answer for every device."""
        return self.where is not None

    def check_one_device(self, identities: set[str], doing: str) -> None:
        """Refuse, before anything is sent, a fixed PIN for more than one device."""
        where = self.where
        if where is None or len(identities) <= 1:
            return
        raise Fido2SharedPinError(
            f"{doing} would ask {len(identities)} different authenticators for their PIN, "
            f"and {where} is one PIN: refused, so no key's PIN retries are spent on another "
            "key's PIN. Run on a terminal to be asked for each key's PIN, or do it one "
            "key at a time"
        )

    def for_device(
        self, device: Fido2Device, aaguid: Callable[[], str | None] | None = None
    ) -> PinSource:
        """The PIN source of one authenticator."""
        identity = device_identity(device)

        def pin() -> str:
            return self._pin(device, identity, aaguid)

        return pin

    def _pin(
        self, device: Fido2Device, identity: str, aaguid: Callable[[], str | None] | None
    ) -> str:
        where = self.where
        if where is not None:
            if self._bound is not None and self._bound != identity:
                raise Fido2SharedPinError(
                    f"{where} already went to {self._bound}; {device.name!r} ({identity}) is "
                    "another authenticator and is not sent the same PIN (its retries would "
                    "be spent). Run on a terminal to be asked for each key's PIN"
                )
            value = read_pin_file(self._file) if self._file is not None else _environment()
            self._bound = identity
            return value
        if identity in self._prompted:
            return self._prompted[identity]
        interactive = self._interactive
        if interactive is None:
            interactive = sys.stdin.isatty()
        if not interactive:
            raise PinUnavailableError(
                f"{device.name!r} needs its PIN: set {FIDO2_PIN_ENV} (one key only) or "
                "run on a terminal to be prompted (PINs are never taken from argv)"
            )
        label = device_label(device, _safe(aaguid))
        value = (self._prompt or getpass.getpass)(f"PIN of the security key {label}: ")
        if not value:
            raise PinUnavailableError(f"no PIN entered for {device.name!r}")
        self._prompted[identity] = value
        return value


def _environment() -> str:
    value = os.environ.get(FIDO2_PIN_ENV, "")
    if not value:
        raise PinUnavailableError(f"{FIDO2_PIN_ENV} is empty")
    return value


def _safe(aaguid: Callable[[], str | None] | None) -> str | None:
    if aaguid is None:
        return None
    try:
        return aaguid()
    except Exception:  # the AAGUID only decorates the prompt
        return None


__all__ = ["FIDO2_PIN_ENV", "DevicePins", "device_identity", "device_label"]
