"""One authenticator, driven through python-fido2's real client (``Fido2Client``).

Why the real client rather than raw CTAP: it negotiates the PIN/UV auth protocol (2
first), encrypts the hmac-secret salts, filters allow lists with an up=false
pre-flight and handles the PIN token exactly as browsers do; re-implementing that is
where subtle bugs would live.  This module adds what Janus needs around it: PINs
only from a :data:`~janus_hsm.pin.PinSource` (never argv), a "touch your key" callback,
and typed errors (:mod:`janus_hsm.fido2.errors`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import CtapError
from fido2.ctap2.base import Ctap2, Info
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2.pin import ClientPin, PinProtocolV2
from fido2.webauthn import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialCreationOptions,
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialParameters,
    PublicKeyCredentialRequestOptions,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialType,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from janus_hsm.errors import PinUnavailableError
from janus_hsm.fido2.devices import Fido2Device
from janus_hsm.fido2.errors import (
    Fido2Error,
    Fido2PinInvalidError,
    Fido2UnsupportedError,
    UnknownCredentialError,
    from_fido2_exception,
)
from janus_hsm.fido2.pins import DevicePins
from janus_hsm.pin import PinSource

log = logging.getLogger(__name__)

TOUCH_MESSAGE = "Touch your security key…"
_ES256 = -7
_EDDSA = -8
_HMAC_SECRET = "hmac-secret"  # noqa: S105 - an extension name


def origin_for(rp_id: str) -> str:
    """The WebAuthn origin Janus uses for an RP ID: ``https://<rp id>``."""
    return f"https://{rp_id}"


@dataclass(frozen=True)
class NewCredential:
    """What registration returns: nothing secret (the private key stays in the key)."""

    credential_id: bytes
    public_key: Mapping[int, Any]  # COSE key
    aaguid: str
    uv: bool
    hmac_secret: bool


class _Person(UserInteraction):
    """fido2's view of the person: asked for the PIN (from the PinSource) and told to touch."""

    def __init__(
        self,
        pin: PinSource | None,
        on_touch: Callable[[str], None] | None,
        refused: Callable[[Fido2Error], None] | None = None,
    ) -> None:
        self._pin = pin
        self._on_touch = on_touch
        self._refused = refused

    def prompt_up(self) -> None:
        if self._on_touch is not None:
            self._on_touch(TOUCH_MESSAGE)

    def request_pin(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> str | None:
        if self._pin is None:
            return None
        try:
            return self._pin()
        except PinUnavailableError:
            return None  # fido2 turns this into PinRequiredError, mapped to pin_required
        except Fido2Error as exc:
            # A refusal (a PIN meant for another authenticator): nothing is sent; fido2
            # raises PinRequiredError and map_error reports this error instead.
            if self._refused is not None:
                self._refused(exc)
            return None

    def request_uv(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> bool:
        return True


class Authenticator:
    """A connected authenticator plus how to get its PIN and how to ask for a touch.

    ``device`` may be a :class:`Fido2Device` from discovery or any fido2 ``CtapDevice``
    built in process (tests pass the software authenticator).  PIN/UV auth protocol 2 is
    required when the authenticator has a PIN: protocol 1 (CTAP 2.0) uses unauthenticated
    AES-CBC without an IV for the PIN and the hmac-secret salts.

    ``pin`` is best a :class:`~janus_hsm.fido2.pins.DevicePins`: it gives this device its
    own PIN (a prompt naming it, or one fixed PIN that no second device is sent).  A
    plain :data:`PinSource` is used as it is.
    """

    def __init__(
        self,
        device: Fido2Device | Any,
        *,
        pin: PinSource | DevicePins | None = None,
        on_touch: Callable[[str], None] | None = None,
    ) -> None:
        self.device = device if isinstance(device, Fido2Device) else Fido2Device.in_process(device)
        self._pin: PinSource | None = (
            pin.for_device(self.device, lambda: str(self.info.aaguid))
            if isinstance(pin, DevicePins)
            else pin
        )
        self._on_touch = on_touch
        self._refusal: Fido2Error | None = None
        try:
            self._ctap = Ctap2(self.device.device)
        except (CtapError, ClientError, ValueError) as exc:
            raise Fido2UnsupportedError(
                f"{self.device.name} is not a CTAP2 authenticator ({exc})"
            ) from None

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def info(self) -> Info:
        return self._ctap.get_info()

    @property
    def pin_set(self) -> bool:
        return bool(self.info.options.get("clientPin"))

    def pin_retries(self) -> int | None:
        """The PIN retry counter, or None when the authenticator has no PIN set."""
        if not self.pin_set:
            return None
        try:
            retries, _ = ClientPin(self._ctap, PinProtocolV2()).get_pin_retries()
        except (CtapError, ClientError) as exc:
            raise from_fido2_exception(exc, doing=f"reading {self.name}'s PIN retries") from None
        return int(retries)

    def describe(self) -> dict[str, Any]:
        """What ``janus fido2 list`` shows: nothing secret, nothing that needs a touch."""
        info = self.info
        return {
            "name": self.name,
            "transport": self.device.transport,
            "aaguid": str(info.aaguid),
            "versions": list(info.versions),
            "extensions": list(info.extensions),
            "pin_protocols": list(info.pin_uv_protocols),
            "pin_set": self.pin_set,
            "pin_retries": self.pin_retries(),
            "hmac_secret": _HMAC_SECRET in info.extensions,
        }

    # ------------------------------------------------------------------ operations

    def make_credential(
        self,
        rp_id: str,
        user_name: str,
        *,
        hmac_secret: bool = False,
        resident: bool = False,
        exclude: Sequence[bytes] = (),
    ) -> NewCredential:
        """Register a new credential (one touch; the PIN too if one is set).

        ``exclude`` lists credential ids already registered: an authenticator holding
        one of them refuses (``credential_excluded``), so one key is not registered twice.
        """
        if hmac_secret and _HMAC_SECRET not in self.info.extensions:
            raise Fido2UnsupportedError(f"{self.name} does not support the hmac-secret extension")
        uv = self.pin_set
        options = PublicKeyCredentialCreationOptions(
            rp=PublicKeyCredentialRpEntity(id=rp_id, name=rp_id),
            user=PublicKeyCredentialUserEntity(
                id=os.urandom(16), name=user_name, display_name=user_name
            ),
            challenge=os.urandom(32),
            pub_key_cred_params=[
                PublicKeyCredentialParameters(type=PublicKeyCredentialType.PUBLIC_KEY, alg=alg)
                for alg in (_ES256, _EDDSA)
            ],
            exclude_credentials=[_descriptor(c) for c in exclude] or None,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=(
                    ResidentKeyRequirement.REQUIRED
                    if resident
                    else ResidentKeyRequirement.DISCOURAGED
                ),
                user_verification=(
                    UserVerificationRequirement.REQUIRED
                    if uv
                    else UserVerificationRequirement.DISCOURAGED
                ),
            ),
            extensions={"hmacCreateSecret": True} if hmac_secret else None,
        )
        response = self._run(
            f"registering on {self.name}", lambda c: c.make_credential(options), rp_id
        )
        auth_data = response.response.attestation_object.auth_data
        credential = auth_data.credential_data
        if credential is None:  # pragma: no cover - fido2 asserts this already
            raise Fido2Error(f"{self.name} returned no credential")
        if hmac_secret and response.client_extension_results.get("hmacCreateSecret") is not True:
            raise Fido2UnsupportedError(f"{self.name} did not enable hmac-secret")
        return NewCredential(
            credential_id=bytes(credential.credential_id),
            public_key=dict(credential.public_key),
            aaguid=str(credential.aaguid),
            uv=uv,
            hmac_secret=hmac_secret,
        )

    def holds(self, rp_id: str, credential_ids: Sequence[bytes]) -> bytes | None:
        """Which of ``credential_ids`` this authenticator holds, without a touch (an
        up=false pre-flight, as browsers do); None if none.  Lets Janus pick the right
        key among several connected, and say "unknown credential" before any touch."""
        max_len = self.info.max_cred_id_length or 1023
        for cred_id in credential_ids:
            if len(cred_id) > max_len:
                continue
            try:
                self._ctap.get_assertion(
                    rp_id, b"\0" * 32, [{"type": "public-key", "id": cred_id}], None, {"up": False}
                )
            except CtapError as exc:
                if exc.code == CtapError.ERR.NO_CREDENTIALS:
                    continue
                if exc.code == CtapError.ERR.PUAT_REQUIRED:
                    return cred_id  # protected credentials: only a UV'd request can tell
                raise from_fido2_exception(exc, doing=f"asking {self.name}") from None
            return cred_id
        return None

    def hmac_secret(
        self, rp_id: str, credential_ids: Sequence[bytes], salt: bytes, *, uv: bool
    ) -> tuple[bytes, bytes]:
        """(credential id used, hmac-secret output over ``salt``) from one of
        ``credential_ids``; one touch, and the PIN when ``uv``.

        The raw hmac-secret extension (``HmacSecretExtension(allow_hmac_secret=True)``)
        rather than PRF: PRF hashes the salt with a WebAuthn context string, raw
        hmac-secret lets other CTAP tools derive the same output; either would do.
        """
        if len(salt) != 32:
            raise ValueError("hmac-secret salts are 32 bytes")
        held = self.holds(rp_id, credential_ids)
        if held is None:
            raise UnknownCredentialError(
                f"{self.name} holds none of the {len(credential_ids)} credential(s) asked for "
                f"(RP {rp_id!r}): another key, or this key was reset"
            )
        options = PublicKeyCredentialRequestOptions(
            challenge=os.urandom(32),
            rp_id=rp_id,
            allow_credentials=[_descriptor(held)],
            user_verification=(
                UserVerificationRequirement.REQUIRED
                if uv
                else UserVerificationRequirement.DISCOURAGED
            ),
            extensions={"hmacGetSecret": {"salt1": salt}},
        )
        response = self._run(
            f"unlocking with {self.name}",
            lambda c: c.get_assertion(options).get_response(0),
            rp_id,
        )
        result = response.client_extension_results.hmac_get_secret
        if result is None:
            raise Fido2UnsupportedError(f"{self.name} returned no hmac-secret output")
        return bytes(response.raw_id), bytes(result.output1)

    def client(self, origin: str) -> Fido2Client:
        """A fido2 client for ``origin``, with this authenticator's PIN and touch hooks."""
        self._check_pin_protocol()
        return Fido2Client(
            self.device.device,
            DefaultClientDataCollector(origin),
            _Person(self._pin, self._on_touch, self._refuse),
            extensions=[HmacSecretExtension(allow_hmac_secret=True)],  # type: ignore[no-untyped-call]
        )

    def _refuse(self, error: Fido2Error) -> None:
        self._refusal = error

    def map_error(self, exc: BaseException, doing: str) -> Fido2Error:
        """The typed error for a fido2 exception, with the PIN retries when a PIN was wrong."""
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            return refusal
        error = from_fido2_exception(exc, doing=doing)
        if isinstance(error, Fido2PinInvalidError):
            try:
                retries = self.pin_retries()
            except Fido2Error:
                retries = None
            error = Fido2PinInvalidError(
                f"{doing}: wrong PIN ({retries} tries left before the PIN is blocked)",
                retries_left=retries,
            )
        return error

    def _check_pin_protocol(self) -> None:
        info = self.info
        if info.options.get("clientPin") and 2 not in info.pin_uv_protocols:
            raise Fido2UnsupportedError(
                f"{self.name} offers PIN/UV auth protocol(s) {list(info.pin_uv_protocols)}; "
                "Janus needs protocol 2 (CTAP 2.1)"
            )

    def _run(self, doing: str, action: Callable[[Fido2Client], Any], rp_id: str) -> Any:
        client = self.client(origin_for(rp_id))
        try:
            return action(client)
        except (ClientError, CtapError) as exc:
            raise self.map_error(exc, doing) from None


def _descriptor(credential_id: bytes) -> PublicKeyCredentialDescriptor:
    return PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=credential_id)


__all__ = ["TOUCH_MESSAGE", "Authenticator", "NewCredential", "origin_for"]
