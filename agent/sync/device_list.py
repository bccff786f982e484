"""An owner's device list: approvals, the root-signed list and its verifier.

Every device has its own keys in its own hardware (a signing key and an agreement key:
keys are never copied).  The owner's *root* (the did:key that names the owner) signs
the list of devices; each version names the hash of the one before, so a rolled-back
or forked list is refused by anyone who has seen a later one.  Adding a device needs
three signatures, each checked by every verifier:

- the new device's own, over its join request (it holds the device key and vouches for
  its agreement key, which cannot sign);
- an existing device's approval, over the whole addition (who, which keys, which
  version), by a device that was current in the version before;
- the root's, over the new version of the list.

The request and the approval are detached signatures (device_format.py); the join
request itself is device_request.py.

The format is the spec: docs/devices-and-groups.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final

from agent.sync.device_errors import (
    DeviceExistsError,
    DeviceListFullError,
    DeviceSignatureError,
    ForkedListError,
    MalformedDeviceListError,
    MissingApprovalError,
    NotNewerError,
    RemovedDeviceError,
    UnknownApproverError,
    UnknownDeviceError,
    WrongRootError,
)
from agent.sync.device_format import (
    APPROVAL_FIELDS,
    APPROVAL_TYP,
    ENTRY_FIELDS,
    LIST_FIELDS,
    LIST_TYP,
    MAX_DEVICES,
    MAX_ENTRIES,
    REMOVED_FIELDS,
    SIGNING_ALGS,
    check_did,
    check_fields,
    check_int,
    check_signature,
    sign_detached,
    verify_detached,
)
from agent.sync.device_request import JoinRequest
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode, from_did_key
from policies.errors import FormatError, PolicyError, SignatureInvalidError
from policies.jws import parse_compact, sha256_b64, sign_jws, strict_json, verify_signature

# --- entries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEntry:
    """One device of the list: its keys, its request, and who approved it when."""

    request: JoinRequest
    version: int
    added: int
    approver: str
    approval: bytes
    removed: int | None = None
    removed_at: int | None = None

    @property
    def did(self) -> str:
        return self.request.device

    @property
    def agreement(self) -> str:
        return self.request.agreement

    @property
    def name(self) -> str:
        return self.request.name

    def approval_payload(self, owner: str) -> dict[str, Any]:
        """What the approving device signs: the whole addition, for this owner's list."""
        return {
            "iss": self.approver,
            "owner": owner,
            "device": self.did,
            "agreement": self.agreement,
            "name": self.name,
            "request": sha256_b64(self.request.compact),
            "version": self.version,
            "added": self.added,
        }

    @classmethod
    def approve(
        cls, approver: KeyHandle, owner: str, request: JoinRequest, *, version: int, now: int
    ) -> DeviceEntry:
        draft = cls(request, version, now, approver.did, b"")
        signed = sign_detached(approver, APPROVAL_TYP, draft.approval_payload(owner))
        return replace(draft, approval=signed.signature)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "device": self.did,
            "agreement": self.agreement,
            "name": self.name,
            "requested": self.request.requested,
            "nonce": self.request.nonce,
            "proof": b64url_encode(self.request.proof),
            "version": self.version,
            "added": self.added,
            "approver": self.approver,
            "approval": b64url_encode(self.approval),
        }
        if self.removed is not None:
            data["removed"] = self.removed
            data["removed_at"] = self.removed_at
        return data

    @classmethod
    def from_json(cls, obj: object, *, tombstone: bool) -> DeviceEntry:
        error = MalformedDeviceListError
        what = "a removed device" if tombstone else "a device entry"
        data = check_fields(obj, REMOVED_FIELDS if tombstone else ENTRY_FIELDS, what, error)
        request_payload = {
            "iss": data["device"],
            "agreement": data["agreement"],
            "name": data["name"],
            "nonce": data["nonce"],
            "iat": data["requested"],
        }
        request = JoinRequest.from_fields(
            request_payload, check_signature(data["proof"], "proof", error), error=error
        )
        if data["approver"] is None or data["approval"] in (None, ""):
            raise MissingApprovalError(f"{what} has no approving device and signature")
        return cls(
            request=request,
            version=check_int(data["version"], "an entry's version", error, low=1),
            added=check_int(data["added"], "added", error),
            approver=check_did(data["approver"], "the approver", SIGNING_ALGS, error),
            approval=check_signature(data["approval"], "approval", error),
            removed=check_int(data["removed"], "removed", error, low=2) if tombstone else None,
            removed_at=check_int(data["removed_at"], "removed_at", error) if tombstone else None,
        )

    def current_in(self, version: int) -> bool:
        """Whether this device was a current device in that version of the list."""
        return self.version <= version and (self.removed is None or self.removed > version)


#: ``type`` of an approval carried from the approving device to the root's device.
APPROVAL_DOCUMENT: Final = "janus-device-approval"


def approval_document(owner: str, entry: DeviceEntry) -> str:
    """An approval made where the root is not, for the root's device to finish: JSON
    ``{"type", "owner", "entry"}``, the entry exactly as the list will carry it."""
    return json.dumps(
        {"type": APPROVAL_DOCUMENT, "owner": owner, "entry": entry.to_json()}, sort_keys=True
    )


def parse_approval(text: object) -> tuple[str, DeviceEntry]:
    """(owner, entry) of an approval document, once the device's and approver's
    signatures check out; whether the approver may approve is the list's question."""
    error = MalformedDeviceListError
    if not isinstance(text, str | bytes):
        raise error("an approval must be a JSON document")
    data = check_fields(
        strict_json_object(text, "the approval"), APPROVAL_FIELDS, "the approval", error
    )
    if data["type"] != APPROVAL_DOCUMENT:
        raise error(f"the approval's type must be {APPROVAL_DOCUMENT!r}")
    owner = check_did(data["owner"], "the approval's owner", SIGNING_ALGS, error)
    entry = DeviceEntry.from_json(data["entry"], tombstone=False)
    entry.request.check_signature()
    verify_detached(
        entry.approver,
        APPROVAL_TYP,
        entry.approval_payload(owner),
        entry.approval,
        f"the approval of device {entry.name!r}",
    )
    return owner, entry


def strict_json_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        return strict_json(text.encode() if isinstance(text, str) else text, what)
    except FormatError as exc:
        raise MalformedDeviceListError(str(exc)) from None


# --- the list -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceList:
    """One version of an owner's device list, parsed and checked on its own.

    A list from :func:`parse_device_list` has every signature in it checked and is
    consistent in itself; whether it is *the owner's* and *newer than what was seen*
    is :func:`verify_device_list`'s question.
    """

    compact: str
    owner: str
    version: int
    prev: str | None
    issued: int
    devices: tuple[DeviceEntry, ...]
    removed: tuple[DeviceEntry, ...] = field(default=())

    @property
    def hash(self) -> str:
        """What the next version names as ``prev``: SHA-256 of the compact JWS."""
        return sha256_b64(self.compact)

    def entries(self) -> tuple[DeviceEntry, ...]:
        return self.devices + self.removed

    def device(self, did: str) -> DeviceEntry | None:
        return next((e for e in self.devices if e.did == did), None)

    def find(self, name_or_did: str) -> DeviceEntry | None:
        """A current device by did:key or by name."""
        return next((e for e in self.devices if name_or_did in (e.did, e.name)), None)

    def is_current(self, did: str) -> bool:
        return self.device(did) is not None

    def was_removed(self, did: str) -> bool:
        return any(e.did == did for e in self.removed)

    def admits_author(self, did: str, timestamp: int) -> bool:
        """Whether a message that ``did`` signed with ``timestamp`` is taken: from a
        current device, or from a removed one if written before the root-signed time of
        its removal.  Every device holding this list decides alike, so a device that
        joins after a removal gets what the removed device wrote before it, as the
        others kept it.  The time is the author's own claim: a device that is stolen,
        not yet removed, can write anything it could write before, and backdated
        writes after the removal reach only devices that have not taken this list."""
        if self.is_current(did):
            return True
        entry = next((e for e in self.removed if e.did == did), None)
        return entry is not None and entry.removed_at is not None and timestamp < entry.removed_at

    def summary(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "version": self.version,
            "hash": self.hash,
            "issued": self.issued,
            "devices": [_entry_summary(e) for e in self.devices],
            "removed": [_entry_summary(e) for e in self.removed],
        }


def _entry_summary(entry: DeviceEntry) -> dict[str, Any]:
    data = {
        "name": entry.name,
        "did": entry.did,
        "agreement": entry.agreement,
        "added": entry.added,
        "version": entry.version,
        "approver": entry.approver,
    }
    if entry.removed is not None:
        data.update(removed=entry.removed, removed_at=entry.removed_at)
    return data


def sign_device_list(
    root: KeyHandle,
    *,
    version: int,
    prev: str | None,
    devices: Iterable[DeviceEntry],
    removed: Iterable[DeviceEntry] = (),
    now: int,
) -> DeviceList:
    """A new version signed by the root, checked by the same parser every reader uses."""
    devices, removed = tuple(devices), tuple(removed)
    if len(devices) > MAX_DEVICES or len(devices) + len(removed) > MAX_ENTRIES:
        raise DeviceListFullError(
            f"a device list holds at most {MAX_DEVICES} devices and {MAX_ENTRIES} entries "
            "with the removed ones"
        )
    payload = {
        "iss": root.did,
        "version": version,
        "prev": prev,
        "iat": now,
        "devices": [e.to_json() for e in devices],
        "removed": [e.to_json() for e in removed],
    }
    try:
        compact = sign_jws(root, {"typ": LIST_TYP}, payload).compact
    except FormatError:
        raise DeviceListFullError("the device list no longer fits a signed list") from None
    return parse_device_list(compact)


def parse_device_list(compact: object) -> DeviceList:
    """A device list from outside: strict format, every signature, internal consistency.

    Checked: the root's signature; each device's own signature over its request; each
    approval's signature, by a device current in the version before the entry's (the
    root itself for version 1); unique keys and names; removals after additions.
    """
    error = MalformedDeviceListError
    if not isinstance(compact, str):
        raise error("a device list must be a compact JWS string")
    try:
        parsed = parse_compact(compact.strip(), typ=LIST_TYP, what="device list")
    except PolicyError as exc:
        raise error(str(exc)) from None
    data = check_fields(parsed.payload, LIST_FIELDS, "the device list", error)
    owner = check_did(data["iss"], "the list's iss (the owner's root)", SIGNING_ALGS, error)
    version = check_int(data["version"], "the list's version", error, low=1)
    prev = data["prev"]
    if version == 1 and prev is not None:
        raise error("version 1 of a device list has no previous list (prev null)")
    if version > 1 and (not isinstance(prev, str) or len(prev) != 43):
        raise error("prev must be the base64url SHA-256 of the previous list")
    devices_raw, removed_raw = data["devices"], data["removed"]
    if not isinstance(devices_raw, list) or not isinstance(removed_raw, list):
        raise error("devices and removed must be arrays")
    if len(devices_raw) > MAX_DEVICES or len(devices_raw) + len(removed_raw) > MAX_ENTRIES:
        raise error(f"a device list holds at most {MAX_DEVICES} devices, {MAX_ENTRIES} entries")
    result = DeviceList(
        compact=compact.strip(),
        owner=owner,
        version=version,
        prev=prev,
        issued=check_int(data["iat"], "iat", error),
        devices=tuple(DeviceEntry.from_json(e, tombstone=False) for e in devices_raw),
        removed=tuple(DeviceEntry.from_json(e, tombstone=True) for e in removed_raw),
    )
    _check_consistent(result)
    try:
        verify_signature(parsed, from_did_key(owner), what="device list")
    except SignatureInvalidError as exc:
        raise DeviceSignatureError(str(exc)) from None
    except PolicyError as exc:
        raise error(str(exc)) from None
    for entry in result.entries():
        entry.request.check_signature()
        _check_approval(result, entry)
    return result


def _check_consistent(dl: DeviceList) -> None:
    error = MalformedDeviceListError
    entries = dl.entries()
    for values, what in (
        ([e.did for e in entries], "device key"),
        ([e.agreement for e in entries], "agreement key"),
    ):
        if len(set(values)) != len(values):
            raise error(f"a {what} appears twice in the device list")
    names = [e.name for e in dl.devices]
    if len(set(names)) != len(names):
        raise error("two current devices have the same name")
    for entry in entries:
        if entry.version > dl.version:
            raise error(f"device {entry.name!r} is dated after the list's version")
    for entry in dl.removed:
        assert entry.removed is not None
        if not entry.version < entry.removed <= dl.version:
            raise error(f"device {entry.name!r} is removed before it was added")


def _check_approval(dl: DeviceList, entry: DeviceEntry) -> None:
    if entry.version == 1:
        if entry.approver != dl.owner:
            raise UnknownApproverError(
                f"device {entry.name!r} of the first version is not approved by the root"
            )
    else:
        approver = next((e for e in dl.entries() if e.did == entry.approver), None)
        if approver is None or approver is entry or not approver.current_in(entry.version - 1):
            raise UnknownApproverError(
                f"device {entry.name!r} is approved by {entry.approver:.80}, which was not a "
                f"device in version {entry.version - 1}"
            )
    verify_detached(
        entry.approver,
        APPROVAL_TYP,
        entry.approval_payload(dl.owner),
        entry.approval,
        f"the approval of device {entry.name!r}",
    )


def verify_device_list(compact: object, owner: str, last: DeviceList | None = None) -> DeviceList:
    """The list, if it is a valid list of ``owner``'s root and newer than ``last``.

    With ``last`` the new list must extend it: the next version names ``last``'s hash
    as ``prev``; a later version (some were missed) must keep every entry of ``last``
    unchanged or mark it removed after ``last``'s version, and add only entries dated
    after it.  Without ``last`` (first contact), the list is taken as it checks out.
    """
    dl = parse_device_list(compact)
    if dl.owner != owner:
        raise WrongRootError(
            f"the device list is signed by {dl.owner:.80}, not the owner's root {owner:.80}"
        )
    if last is None:
        return dl
    if last.owner != owner:
        raise WrongRootError("the last list seen is another owner's")
    if dl.version == last.version and dl.hash != last.hash:
        raise ForkedListError(
            f"two different lists of version {dl.version}: a forked or rewritten list"
        )
    if dl.version <= last.version:
        raise NotNewerError(
            f"the device list is version {dl.version}; version {last.version} was already seen"
        )
    if dl.version == last.version + 1 and dl.prev != last.hash:
        raise ForkedListError(
            f"version {dl.version} does not follow the version {last.version} seen here "
            "(its previous hash differs): a forked or rewritten list"
        )
    _check_extends(dl, last)
    return dl


def _check_extends(dl: DeviceList, last: DeviceList) -> None:
    new = {e.did: e for e in dl.entries()}
    for old in last.devices:
        now = new.get(old.did)
        if now is None or replace(now, removed=None, removed_at=None) != old:
            raise ForkedListError(f"device {old.name!r} of version {last.version} was rewritten")
        if now.removed is not None and now.removed <= last.version:
            raise ForkedListError(f"device {old.name!r} is removed back in the past")
    for old in last.removed:
        if new.get(old.did) != old:
            raise ForkedListError(f"removed device {old.name!r} was rewritten or brought back")
    known = {e.did for e in last.entries()}
    for entry in dl.entries():
        if entry.did not in known and entry.version <= last.version:
            raise ForkedListError(
                f"device {entry.name!r} is dated version {entry.version}, which is already seen"
            )


class DeviceListVerifier:
    """What a peer or another device keeps about one owner's devices.

    It starts from the owner's root did (and the last list seen, if any), accepts only
    valid newer lists, and answers :meth:`is_current` for anything signed by a device:
    a removed device's messages are refused from the version that removed it on.
    """

    def __init__(self, owner: str, last: DeviceList | None = None) -> None:
        if last is not None and last.owner != owner:
            raise WrongRootError("the last list seen is another owner's")
        self.owner = owner
        self.current: DeviceList | None = last

    def verify(self, compact: object) -> DeviceList:
        """Check a list and, if it is a valid newer one, make it current."""
        dl = verify_device_list(compact, self.owner, self.current)
        self.current = dl
        return dl

    def is_current(self, device_did: str) -> bool:
        return self.current is not None and self.current.is_current(device_did)

    def check_current(self, device_did: str) -> DeviceEntry:
        """The device's entry, or the reason nothing from it is accepted."""
        entry = None if self.current is None else self.current.device(device_did)
        if entry is not None:
            return entry
        if self.current is not None and self.current.was_removed(device_did):
            raise RemovedDeviceError(f"device {device_did:.80} was removed from the owner's list")
        raise UnknownDeviceError(f"{device_did:.80} is not a device of this owner")


def new_entry_checks(dl: DeviceList, request: JoinRequest) -> None:
    """Why ``request`` cannot be added to ``dl``: key or name taken, or a removed key."""
    if dl.was_removed(request.device):
        raise RemovedDeviceError(
            "this device key was removed from the list: a removed key never comes back; "
            "the device needs new keys (a new `janus edge init --name …`)"
        )
    if any(request.device == e.did or request.agreement == e.agreement for e in dl.entries()):
        raise DeviceExistsError("this device (or its agreement key) is already in the list")
    if dl.find(request.name) is not None:
        raise DeviceExistsError(f"a device is already named {request.name!r}")
