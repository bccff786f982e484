"""A device bundle: what another device needs to open a session with this one.

It is a relationship prekey bundle (agent/relationships/prekeys.py) whose binding is
signed by the *device key*, not the owner's root: the binding's ``iss`` is the device's
did:key and its ``idk`` the device's agreement key.  The owner's device list is what
ties the two to the owner (the root signed an entry naming both), so a bundle counts
only once it is checked against a list: :func:`check_bundle`.

A device bundle carries no one-time prekeys.  It is handed to every device of the
owner's peers at once (an announcement reaches them all), so a one-time prekey in it
could not be given to exactly one initiator; two devices using the same one would make
the second session fail.  The initial message's digest is remembered instead (as for
the relationship layer's last-resort prekeys), so a replayed one is refused, and the
signed prekeys live as long as the bundle (DEVICE_BUNDLE_TTL).
"""

from __future__ import annotations

from typing import Any, Final

from agent.relationships.errors import RelationshipError
from agent.relationships.prekeys import PrekeyBundle, PrekeyStore
from agent.sync.device_list import DeviceEntry, DeviceList, DeviceListVerifier
from agent.sync.fanout_errors import DeviceBundleError
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import PublicKeyFormatError, from_jwk, to_did_key

#: How long a device bundle serves: as long as a device may stay out of reach.
DEVICE_BUNDLE_TTL: Final = 365 * 86400


def publish_device_bundle(
    store: PrekeyStore, device: KeyHandle, agreement: KeyHandle, *, ttl: int = DEVICE_BUNDLE_TTL
) -> PrekeyBundle:
    """New signed prekeys in ``store``, bound by the device key (one token signature)."""
    return store.publish(device, agreement, one_time=0, one_time_pq=0, ttl=ttl)


def parse_device_bundle(data: object, *, now: int | None = None) -> PrekeyBundle:
    """A device bundle from outside (its dict form): format, binding signature, expiry.

    Whether its device is a current device of an owner is :func:`check_bundle`'s part.
    """
    try:
        bundle = PrekeyBundle.from_dict(data, now=now)
    except RelationshipError as exc:
        raise DeviceBundleError(f"a device bundle: {exc}") from None
    if bundle.binding_form != "bundle":
        raise DeviceBundleError("a device bundle is bound by its device key, not a directory")
    if bundle.one_time_prekeys or bundle.one_time_pq_prekeys:
        raise DeviceBundleError("a device bundle carries no one-time prekeys")
    return bundle


def agreement_did(jwk: dict[str, Any]) -> str:
    """The did:key of an agreement key given as a JWK (as a list entry names it)."""
    try:
        return to_did_key(from_jwk(jwk))
    except (PublicKeyFormatError, ValueError) as exc:
        raise DeviceBundleError(f"a device bundle's agreement key: {exc}") from None


def check_bundle(bundle: PrekeyBundle, device_list: DeviceList) -> DeviceEntry:
    """The list entry a bundle belongs to: its signer is a current device of the list
    (else RemovedDeviceError / UnknownDeviceError) and its agreement key is that entry's."""
    entry = DeviceListVerifier(device_list.owner, device_list).check_current(bundle.root_did)
    if agreement_did(bundle.identity_jwk) != entry.agreement:
        raise DeviceBundleError(
            f"the bundle of device {entry.name!r} names another agreement key than the "
            "owner's device list"
        )
    return entry
