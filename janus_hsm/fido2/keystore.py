"""Opening software keystores with a FIDO2 security key (the hmac-secret extension).

:class:`Fido2HmacSecret` is the :class:`~janus_hsm.backends.software.keyfile.HmacSecretSource`
that the software keystore asks for hmac-secret outputs: it finds, among the connected
authenticators, the one holding an enrolled credential (a touch-free pre-flight), and
asks it (one touch, and the PIN when the credential was enrolled with UV).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from janus_hsm.backends.software.keyfile import HmacSecretRecipient
from janus_hsm.fido2.authenticator import Authenticator
from janus_hsm.fido2.devices import Fido2Device, list_devices
from janus_hsm.fido2.errors import NoDeviceError, UnknownCredentialError
from janus_hsm.fido2.pins import FIDO2_PIN_ENV, DevicePins, device_identity
from janus_hsm.fido2.registry import KEYSTORE_RP_ID
from janus_hsm.pin import PinSource

log = logging.getLogger(__name__)


class Fido2HmacSecret:
    """hmac-secret outputs from connected authenticators, for the credentials in ``enrolled``.

    ``devices`` lists the authenticators to use (default: discovery at each request, so a
    key plugged in after the keystore was opened is found).  ``on_touch`` is called with
    a "touch your key" message whenever an authenticator waits for presence.
    """

    def __init__(
        self,
        enrolled: Sequence[HmacSecretRecipient] = (),
        *,
        pin: PinSource | DevicePins | None = None,
        on_touch: Callable[[str], None] | None = None,
        devices: Callable[[], Sequence[Fido2Device]] | None = None,
    ) -> None:
        self._enrolled = list(enrolled)
        self._pin = pin
        self._on_touch = on_touch
        self._devices = devices or list_devices

    def enrolled(self) -> Sequence[HmacSecretRecipient]:
        return list(self._enrolled)

    def check_pin_targets(
        self, asks: Sequence[Sequence[HmacSecretRecipient]], *, doing: str
    ) -> None:
        """Refuse, before any PIN is sent or any touch asked, an operation that would give
        one fixed PIN (JANUS_FIDO2_PIN, a pin-source file) to several authenticators.

        ``asks`` lists the requests the operation makes, each answered (as in
        :meth:`hmac_secret`) by the first connected device holding one of its recipients;
        only recipients enrolled with UV need the PIN.  The look-up is touch-free.
        """
        pins = self._pin
        if not isinstance(pins, DevicePins) or not pins.fixed:
            return
        if not any(r.uv for ask in asks for r in ask):
            return
        devices = list(self._devices())
        identities: set[str] = set()
        try:
            authenticators = [Authenticator(d) for d in devices]
            for ask in asks:
                for device, authenticator in zip(devices, authenticators, strict=True):
                    answering = [
                        r
                        for r in ask
                        if authenticator.holds(r.rp_id, [r.credential_id]) is not None
                    ]
                    if answering:
                        if answering[0].uv:
                            identities.add(device_identity(device))
                        break
        finally:
            for device in devices:
                device.close()
        pins.check_one_device(identities, doing)

    def hmac_secret(
        self, recipients: Sequence[HmacSecretRecipient], salt: bytes
    ) -> tuple[int, bytes]:
        devices = list(self._devices())
        if not devices:
            raise NoDeviceError(
                "no FIDO2 authenticator is connected; plug in a security key enrolled for "
                "this key (" + ", ".join(repr(r.label) for r in recipients) + ")"
            )
        # Group by (RP ID, uv): one request per group, as each needs its own assertion.
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, recipient in enumerate(recipients):
            groups.setdefault((recipient.rp_id, recipient.uv), []).append(index)
        try:
            for device in devices:
                authenticator = Authenticator(device, pin=self._pin, on_touch=self._on_touch)
                for (rp_id, uv), indexes in groups.items():
                    ids = [recipients[i].credential_id for i in indexes]
                    held = authenticator.holds(rp_id, ids)
                    if held is None:
                        continue
                    used, output = authenticator.hmac_secret(rp_id, [held], salt, uv=uv)
                    for i in indexes:
                        if recipients[i].credential_id == used:
                            log.debug(
                                "unlocked with credential %r on %s",
                                recipients[i].label,
                                device.name,
                            )
                            return i, output
        finally:
            for device in devices:
                device.close()  # a PC/SC connection is not left open
        labels = ", ".join(repr(r.label) for r in recipients)
        raise UnknownCredentialError(
            f"none of the {len(devices)} connected authenticator(s) holds a credential this "
            f"key is enrolled for ({labels}); connect one of those security keys"
        )


def keystore_pin_source() -> DevicePins:
    """Each security key's own PIN: a prompt per key on a terminal, or JANUS_FIDO2_PIN
    for one key only (never JANUS_PIN); else none (UV credentials then fail with
    ``pin_required``; credentials enrolled without UV need only a touch)."""
    return DevicePins()


def keystore_opener(on_touch: Callable[[str], None] | None = None) -> Fido2HmacSecret:
    """What :func:`janus_hsm.open_provider` gives every software keystore: it opens
    FIDO2-protected keys with any connected enrolled security key, and seals nothing."""
    return Fido2HmacSecret((), pin=DevicePins(), on_touch=on_touch)


__all__ = [
    "FIDO2_PIN_ENV",
    "KEYSTORE_RP_ID",
    "Fido2HmacSecret",
    "keystore_opener",
    "keystore_pin_source",
]
