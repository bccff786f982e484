"""The device list: flows on real SoftHSM keys, and every refusal of parser and verifier."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.edge.agent import EdgeAgent
from agent.sync import device_errors as errors
from agent.sync.device_format import LIST_TYP, MAX_DEVICES, REQUEST_TYP
from agent.sync.device_list import (
    DeviceEntry,
    DeviceList,
    DeviceListVerifier,
    approval_document,
    parse_approval,
    parse_device_list,
    sign_device_list,
    verify_device_list,
)
from agent.sync.device_request import REQUEST_LIFETIME, JoinRequest
from agent.sync.devices import LIST_FILE, Devices
from hardware.softhsm import SoftHSMToken
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_decode, b64url_encode
from policies.jws import sign_compact

NOW = 1_800_000_000


@dataclass
class Device:
    name: str
    devices: Devices

    @property
    def edge(self) -> EdgeAgent:
        return self.devices.edge

    @property
    def did(self) -> str:
        return self.devices.did


@pytest.fixture
def make_device(softhsm_token: SoftHSMToken, tmp_path: Path) -> Iterator[Any]:
    def make(name: str) -> Device:
        label = f"{name}-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]}"
        edge, _ = EdgeAgent.init(tmp_path / name, softhsm_token.uri(), name=label)
        return Device(name, Devices(edge))

    yield make


def join(new: Device, existing: Device, *, now: int = NOW) -> DeviceList:
    """The whole join flow: request on the new device, add on an existing one, accept."""
    request = new.devices.request(new.name, now=now)
    dl = existing.devices.add(request.compact, request.code, now=now)
    assert new.devices.accept(dl.compact)["state"] == "current"
    return dl


@pytest.fixture
def three(make_device: Any) -> tuple[Device, Device, Device]:
    laptop, desktop, office = make_device("laptop"), make_device("desktop"), make_device("office")
    laptop.devices.init("laptop", now=NOW)
    join(desktop, laptop)
    desktop.devices.accept(join(office, laptop).compact)
    return laptop, desktop, office


def sign_raw(
    root: KeyHandle,
    version: int,
    prev: str | None,
    devices: tuple[DeviceEntry, ...],
    removed: tuple[DeviceEntry, ...] = (),
) -> str:
    """A list signed by ``root`` exactly as given: sign_device_list refuses bad ones."""
    payload = {
        "iss": root.did,
        "version": version,
        "prev": prev,
        "iat": NOW,
        "devices": [e.to_json() for e in devices],
        "removed": [e.to_json() for e in removed],
    }
    return sign_compact(root, {"typ": LIST_TYP}, payload)


def craft(root: EdgeAgent, dl: DeviceList, **changes: Any) -> str:
    """A list signed by ``root`` from ``dl``'s payload with ``changes`` (no checks)."""
    payload: dict[str, Any] = {
        "iss": root.did,
        "version": dl.version,
        "prev": dl.prev,
        "iat": dl.issued,
        "devices": [e.to_json() for e in dl.devices],
        "removed": [e.to_json() for e in dl.removed],
        **changes,
    }
    return sign_compact(root.root, {"typ": LIST_TYP}, payload)


# --- flows -----------------------------------------------------------------------------


def test_join_add_remove_flow(three: tuple[Device, Device, Device]) -> None:
    laptop, desktop, office = three
    dl = laptop.devices.stored()
    assert dl is not None and dl.version == 3 and dl.owner == laptop.did
    assert [e.name for e in dl.devices] == ["laptop", "desktop", "office"]
    assert [e.approver for e in dl.devices] == [laptop.did] * 3
    assert dl.device(desktop.did) is not None
    assert dl.device(desktop.did).agreement == desktop.edge.agreement.did  # type: ignore[union-attr]
    # Every device ended with the same list; each knows which entry it is.
    for device in three:
        status = device.devices.status()
        assert status["state"] == "current" and status["version"] == 3
        assert status["this_device"] == device.did
        assert status["root_here"] is (device is laptop)
    # A peer that saw version 1 only follows to version 3 across the gap.
    first = laptop.devices.stored()
    assert first is not None
    verifier = DeviceListVerifier(laptop.did)
    verifier.verify(dl.compact)
    assert verifier.is_current(office.did)

    removed, tombstone = laptop.devices.remove("office", now=NOW + 10)
    assert removed.version == 4 and not removed.is_current(office.did)
    assert tombstone.removed == 4 and removed.was_removed(office.did)
    verifier.verify(removed.compact)
    assert not verifier.is_current(office.did) and verifier.is_current(desktop.did)
    with pytest.raises(errors.RemovedDeviceError):
        verifier.check_current(office.did)
    with pytest.raises(errors.UnknownDeviceError):
        verifier.check_current(verifier.owner + "x")
    # The removed device learns it: the next list tells it, and it can approve nothing.
    assert office.devices.accept(removed.compact)["state"] == "removed"
    assert office.devices.status()["state"] == "removed"
    late = desktop  # a device not holding the root learns too
    assert late.devices.accept(removed.compact) == {
        "owner": laptop.did,
        "version": 4,
        "this_device": desktop.did,
        "state": "current",
        "changed": True,
    }
    assert late.devices.accept(removed.compact)["changed"] is False


def test_removed_device_can_do_nothing(
    three: tuple[Device, Device, Device], make_device: Any
) -> None:
    laptop, _, office = three
    removed, _ = laptop.devices.remove(office.did, now=NOW + 10)
    office.devices.accept(removed.compact)
    newcomer = make_device("phone")
    request = newcomer.devices.request("phone", now=NOW + 20)
    with pytest.raises(errors.RemovedDeviceError):
        office.devices.add(request.compact, request.code, now=NOW + 20)
    # Its key never comes back, whoever approves.
    again = JoinRequest.sign(office.edge.root, office.edge.agreement, "office2", now=NOW + 20)
    with pytest.raises(errors.RemovedDeviceError):
        laptop.devices.add(again.compact, again.code, now=NOW + 20)
    with pytest.raises(errors.UnknownDeviceError):
        laptop.devices.remove("office")


def test_approval_by_a_device_without_the_root(
    three: tuple[Device, Device, Device], make_device: Any
) -> None:
    laptop, desktop, _ = three
    phone = make_device("phone")
    request = phone.devices.request("phone", now=NOW)
    before = (desktop.devices.directory / LIST_FILE).read_bytes()
    with pytest.raises(errors.NotRootError):
        desktop.devices.add(request.compact, request.code, now=NOW)
    with pytest.raises(errors.NotRootError):  # a key that is not the root
        desktop.devices.add(request.compact, request.code, root_uri=desktop.edge.root.uri, now=NOW)
    assert (desktop.devices.directory / LIST_FILE).read_bytes() == before
    # The root's token plugged in here: the desktop approves, the root signs.
    dl = desktop.devices.add(request.compact, request.code, root_uri=laptop.edge.root.uri, now=NOW)
    entry = dl.device(phone.did)
    assert entry is not None and entry.approver == desktop.did
    assert laptop.devices.accept(dl.compact)["version"] == 4
    assert phone.devices.accept(dl.compact, owner=laptop.did)["state"] == "current"


def test_approval_carried_to_the_root_device(
    three: tuple[Device, Device, Device], make_device: Any
) -> None:
    laptop, desktop, office = three
    phone = make_device("phone")
    request = phone.devices.request("phone", now=NOW)
    entry = desktop.devices.approve(request.compact, request.code, now=NOW)
    document = approval_document(laptop.did, entry)
    owner, parsed = parse_approval(document)
    assert owner == laptop.did and parsed == entry
    # Tampered on its way: the approver's signature no longer covers it.
    forged = json.loads(document)
    forged["entry"]["version"] = 7
    with pytest.raises(errors.DeviceSignatureError):
        parse_approval(json.dumps(forged))
    with pytest.raises(errors.MalformedDeviceListError):
        parse_approval("{}")
    dl = laptop.devices.add_approved(document, now=NOW)
    assert dl.version == 4 and dl.device(phone.did) == entry
    # The same approval again is for a version that is gone.
    with pytest.raises(errors.StaleApprovalError) as caught:
        laptop.devices.add_approved(document, now=NOW)
    assert caught.value.code == "device_approval_stale"
    # An approval by a device removed since it approved.
    tablet = make_device("tablet")
    late = tablet.devices.request("tablet", now=NOW)
    office.devices.accept(dl.compact)
    by_office = approval_document(
        laptop.did, office.devices.approve(late.compact, late.code, now=NOW)
    )
    removed, _ = laptop.devices.remove("office", now=NOW)
    stale = json.loads(by_office)
    with pytest.raises(errors.StaleApprovalError):
        laptop.devices.add_approved(json.dumps(stale), now=NOW)
    fresh = DeviceEntry.approve(
        office.edge.root, laptop.did, late, version=removed.version + 1, now=NOW
    )
    with pytest.raises(errors.RemovedDeviceError):
        laptop.devices.add_approved(approval_document(laptop.did, fresh), now=NOW)


def test_root_device_cannot_be_removed(three: tuple[Device, Device, Device]) -> None:
    laptop = three[0]
    with pytest.raises(errors.RootDeviceError):
        laptop.devices.remove("laptop")


def test_init_and_request_refused_twice(three: tuple[Device, Device, Device]) -> None:
    laptop, desktop, _ = three
    with pytest.raises(errors.DeviceExistsError):
        laptop.devices.init("again")
    with pytest.raises(errors.DeviceExistsError):
        desktop.devices.request("again")


# --- join requests ---------------------------------------------------------------------


def test_join_request_refusals(three: tuple[Device, Device, Device], make_device: Any) -> None:
    laptop = three[0]
    phone = make_device("phone")
    request = phone.devices.request("phone", now=NOW)
    before = (laptop.devices.directory / LIST_FILE).read_bytes()
    with pytest.raises(errors.CodeMismatchError):
        laptop.devices.add(request.compact, "0000 0000 0000", now=NOW)
    with pytest.raises(errors.ExpiredJoinRequestError):
        laptop.devices.add(request.compact, request.code, now=NOW + REQUEST_LIFETIME + 1)
    for bad in ("", "a.b.c", request.compact + ".", 42):
        with pytest.raises(errors.MalformedJoinRequestError) as caught:
            JoinRequest.parse(bad)
        assert caught.value.code == "malformed_device_request"
    head, payload, signature = request.compact.split(".")
    flipped = bytearray(b64url_decode(signature))
    flipped[3] ^= 1
    with pytest.raises(errors.DeviceSignatureError):
        JoinRequest.parse(f"{head}.{payload}.{b64url_encode(bytes(flipped))}")
    # Valid signature, but a header Janus would not write: not canonical, refused.
    other = sign_compact(phone.edge.root, {"typ": REQUEST_TYP, "x": "1"}, request.payload())
    with pytest.raises(errors.MalformedJoinRequestError):
        JoinRequest.parse(other)
    taken = JoinRequest.sign(phone.edge.root, phone.edge.agreement, "desktop", now=NOW)
    with pytest.raises(errors.DeviceExistsError):
        laptop.devices.add(taken.compact, taken.code, now=NOW)
    assert (laptop.devices.directory / LIST_FILE).read_bytes() == before
    assert request.code.replace(" ", "").isdigit() and len(request.code) == 14


def test_first_list_must_answer_the_pending_request(
    three: tuple[Device, Device, Device], make_device: Any
) -> None:
    laptop = three[0]
    phone, tablet = make_device("phone"), make_device("tablet")
    dl = laptop.devices.stored()
    assert dl is not None
    with pytest.raises(errors.NotInListError):
        phone.devices.accept(dl.compact)  # no request made
    request = phone.devices.request("phone", now=NOW)
    with pytest.raises(errors.NotInListError):
        phone.devices.accept(dl.compact)  # a list that does not add it
    added = laptop.devices.add(request.compact, request.code, now=NOW)
    with pytest.raises(errors.WrongRootError):
        phone.devices.accept(added.compact, owner=tablet.did)
    assert phone.devices.state() == "pending"
    assert phone.devices.accept(added.compact, owner=laptop.did)["state"] == "current"
    assert phone.devices.pending() is None


# --- parser and verifier ---------------------------------------------------------------


def test_bad_signatures(three: tuple[Device, Device, Device]) -> None:
    laptop = three[0]
    dl = laptop.devices.stored()
    assert dl is not None
    head, payload, signature = dl.compact.split(".")
    flipped = bytearray(b64url_decode(signature))
    flipped[5] ^= 1
    with pytest.raises(errors.DeviceSignatureError) as caught:
        parse_device_list(f"{head}.{payload}.{b64url_encode(bytes(flipped))}")
    assert caught.value.code == "device_bad_signature"
    # An entry changed under the root's valid signature: the device's own proof fails.
    renamed = [e.to_json() for e in dl.devices]
    renamed[1]["name"] = "evil"
    with pytest.raises(errors.DeviceSignatureError):
        parse_device_list(craft(laptop.edge, dl, devices=renamed))
    # The approval signature of an entry, broken.
    bad_approval = [e.to_json() for e in dl.devices]
    bad_approval[2]["approval"] = bad_approval[1]["approval"]
    with pytest.raises(errors.DeviceSignatureError):
        parse_device_list(craft(laptop.edge, dl, devices=bad_approval))


def test_wrong_root(three: tuple[Device, Device, Device]) -> None:
    laptop, desktop, _ = three
    dl = laptop.devices.stored()
    assert dl is not None
    with pytest.raises(errors.WrongRootError) as caught:
        verify_device_list(dl.compact, desktop.did)
    assert caught.value.code == "device_list_wrong_root"
    # The desktop signs a copy as if it were the root: its version 1 entry is not
    # approved by it, and anyway it is not the owner's root.
    stolen = craft(desktop.edge, dl)
    with pytest.raises((errors.UnknownApproverError, errors.WrongRootError)):
        verify_device_list(stolen, laptop.did)
    verifier = DeviceListVerifier(laptop.did)
    with pytest.raises(errors.DeviceError):
        verifier.verify(stolen)
    assert verifier.current is None


def test_not_newer_and_forks(three: tuple[Device, Device, Device], make_device: Any) -> None:
    laptop, desktop, office = three
    dl = laptop.devices.stored()
    assert dl is not None
    verifier = DeviceListVerifier(laptop.did, dl)
    with pytest.raises(errors.NotNewerError) as caught:
        verifier.verify(dl.compact)
    assert caught.value.code == "device_list_not_newer"
    root = laptop.edge.root
    # Version 4 whose prev is not version 3's hash: a fork.
    forked = sign_device_list(
        root, version=4, prev="A" * 43, devices=dl.devices, removed=dl.removed, now=NOW
    )
    with pytest.raises(errors.ForkedListError) as forked_error:
        verifier.verify(forked.compact)
    assert forked_error.value.code == "device_list_fork"
    # Another version 3 than the one seen: a fork too, not merely an old list.
    twin = sign_device_list(
        root, version=3, prev=dl.prev, devices=dl.devices, removed=dl.removed, now=NOW + 1
    )
    with pytest.raises(errors.ForkedListError):
        verifier.verify(twin.compact)
    # A later version that silently drops a device (no tombstone) rewrites history.
    dropped = sign_device_list(root, version=5, prev="A" * 43, devices=dl.devices[:2], now=NOW)
    with pytest.raises(errors.ForkedListError):
        verifier.verify(dropped.compact)
    # A later version that slips in a device dated in the past.
    phone = make_device("phone")
    request = phone.devices.request("phone", now=NOW)
    backdated = DeviceEntry.approve(laptop.edge.root, laptop.did, request, version=3, now=NOW)
    slipped = sign_device_list(
        root, version=5, prev="A" * 43, devices=(*dl.devices, backdated), now=NOW
    )
    with pytest.raises(errors.ForkedListError):
        verifier.verify(slipped.compact)
    assert verifier.current is dl
    # Older stored lists are refused by the device itself (a rollback).
    newer = laptop.devices.remove("office", now=NOW + 1)[0]
    desktop.devices.accept(newer.compact)
    with pytest.raises(errors.NotNewerError):
        desktop.devices.accept(dl.compact)
    assert office.devices.state() == "current"  # it has not seen version 4 yet


def test_missing_and_unknown_approvals(
    three: tuple[Device, Device, Device], make_device: Any
) -> None:
    laptop, desktop, office = three
    dl = laptop.devices.stored()
    assert dl is not None
    for drop in ("approval", "approver"):
        entries = [e.to_json() for e in dl.devices]
        del entries[2][drop]
        with pytest.raises(errors.MissingApprovalError) as caught:
            parse_device_list(craft(laptop.edge, dl, devices=entries))
        assert caught.value.code == "device_approval_missing"
    entries = [e.to_json() for e in dl.devices]
    entries[2]["approval"] = None
    with pytest.raises(errors.MissingApprovalError):
        parse_device_list(craft(laptop.edge, dl, devices=entries))

    # Approved by a device that is not in the list at all.
    outsider, phone = make_device("outsider"), make_device("phone")
    request = phone.devices.request("phone", now=NOW)
    rogue = DeviceEntry.approve(outsider.edge.root, laptop.did, request, version=4, now=NOW)
    listed = sign_raw(laptop.edge.root, 4, dl.hash, (*dl.devices, rogue))
    with pytest.raises(errors.UnknownApproverError) as unknown:
        verify_device_list(listed, laptop.did, dl)
    assert unknown.value.code == "device_approver_unknown"
    # Approved by a device removed before the addition.
    removed, _ = laptop.devices.remove("office", now=NOW)
    late = DeviceEntry.approve(office.edge.root, laptop.did, request, version=5, now=NOW)
    after = sign_raw(laptop.edge.root, 5, removed.hash, (*removed.devices, late), removed.removed)
    with pytest.raises(errors.UnknownApproverError):
        verify_device_list(after, laptop.did, removed)
    # Approved by a device added in the same version (it was not there before).
    self_approved = DeviceEntry.approve(phone.edge.root, laptop.did, request, version=5, now=NOW)
    with pytest.raises(errors.UnknownApproverError):
        sign_device_list(
            laptop.edge.root,
            version=5,
            prev=removed.hash,
            devices=(*removed.devices, self_approved),
            removed=removed.removed,
            now=NOW,
        )
    assert desktop.devices.state() == "current"


def test_malformed_lists(three: tuple[Device, Device, Device]) -> None:
    laptop = three[0]
    dl = laptop.devices.stored()
    assert dl is not None
    twice = [e.to_json() for e in dl.devices]
    cases: list[dict[str, Any]] = [
        {"version": 0},
        {"version": 1},  # version 1 with a prev
        {"prev": None},
        {"devices": {}},
        {"devices": [*twice, twice[1]]},
        {"extra": 1},
        {"iat": "now"},
    ]
    for changes in cases:
        with pytest.raises(errors.MalformedDeviceListError) as caught:
            parse_device_list(craft(laptop.edge, dl, **changes))
        assert caught.value.code in ("malformed_device_list", "device_approval_missing")
    for junk in (None, "", "x.y.z", dl.compact.replace(".", "!", 1)):
        with pytest.raises(errors.MalformedDeviceListError):
            parse_device_list(junk)


def test_device_keys_stay_on_their_token(three: tuple[Device, Device, Device]) -> None:
    from janus_hsm.backends.pkcs11.export_probe import probe_export

    for device in three:
        for key in (device.edge.root, device.edge.agreement):
            attempts = probe_export(key)  # type: ignore[arg-type]
            assert attempts and all(a.refused for a in attempts), attempts


def test_bounds_of_a_list() -> None:
    """At most MAX_DEVICES current devices; signing one more is refused, not truncated."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.agent.sync.keys import DeviceKey

    root = DeviceKey(ec.generate_private_key(ec.SECP256R1()))
    agreement = DeviceKey(ec.generate_private_key(ec.SECP256R1()))
    first = JoinRequest.sign(root, agreement, "root", now=NOW)
    entries = [DeviceEntry.approve(root, root.did, first, version=1, now=NOW)]
    for i in range(MAX_DEVICES):
        key = DeviceKey(ec.generate_private_key(ec.SECP256R1()))
        other = DeviceKey(ec.generate_private_key(ec.SECP256R1()))
        request = JoinRequest.sign(key, other, f"device {i}", now=NOW)
        entries.append(DeviceEntry.approve(root, root.did, request, version=1, now=NOW))
    dl = sign_device_list(root, version=1, prev=None, devices=entries[:MAX_DEVICES], now=NOW)
    assert len(dl.devices) == MAX_DEVICES
    with pytest.raises(errors.DeviceListFullError) as caught:
        sign_device_list(root, version=1, prev=None, devices=entries, now=NOW)
    assert caught.value.code == "device_list_full"
    with pytest.raises(errors.MalformedDeviceListError):
        parse_device_list(sign_raw(root, 1, None, tuple(entries)))


def test_a_damaged_stored_list_is_refused(three: tuple[Device, Device, Device]) -> None:
    desktop = three[1]
    path = desktop.devices.directory / LIST_FILE
    path.write_text(path.read_text().replace(".", "..", 1))
    with pytest.raises(errors.DeviceStateError) as caught:
        desktop.devices.status()
    assert caught.value.code == "device_state_error"


def test_a_verifier_follows_across_missed_versions(make_device: Any) -> None:
    laptop, desktop, office = make_device("laptop"), make_device("desktop"), make_device("office")
    first = laptop.devices.init("laptop", now=NOW)
    second = join(desktop, laptop)
    third = join(office, laptop)
    verifier = DeviceListVerifier(laptop.did, first)
    assert not verifier.is_current(office.did)
    assert verifier.verify(third.compact) is verifier.current and verifier.is_current(office.did)
    # Across a gap, a later version that silently dropped the desktop (no tombstone),
    # consistent in itself, is refused by whoever saw the desktop listed.
    office_entry = third.device(office.did)
    assert office_entry is not None
    readded = DeviceEntry.approve(
        laptop.edge.root, laptop.did, office_entry.request, version=3, now=NOW
    )
    rewritten = sign_raw(laptop.edge.root, 4, "A" * 43, (first.devices[0], readded))
    assert parse_device_list(rewritten).version == 4  # valid on its own
    other = DeviceListVerifier(laptop.did, second)
    with pytest.raises(errors.ForkedListError):
        other.verify(rewritten)
    assert other.current is second
