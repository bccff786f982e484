"""An owner's devices on one device: the device list in the state directory and its flows.

Every device is an edge agent with its own state directory and its own token: its
*device key* is the signing key ``janus edge init`` made there (``root`` in
``edge.toml``) and its agreement key is the one beside it.  The owner's root is the
device key of the first device (``janus device init``), so on that device alone the two
are the same key; every other device only knows the root's did:key, from the list.

Files (``<state>/devices/``, mode 0700): ``list.jws`` (the latest list accepted here,
replaced atomically), ``request.json`` (the join request of a device waiting to join)
and ``.lock`` (held across every read-change-write).  Format and flows:
docs/devices-and-groups.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from agent.edge.agent import EdgeAgent
from agent.sync.device_errors import (
    CodeMismatchError,
    DeviceError,
    DeviceExistsError,
    DeviceStateError,
    NoDeviceListError,
    NotInListError,
    NotRootError,
    RemovedDeviceError,
    RootDeviceError,
    StaleApprovalError,
    UnknownApproverError,
    UnknownDeviceError,
    WrongRootError,
)
from agent.sync.device_list import (
    DeviceEntry,
    DeviceList,
    DeviceListVerifier,
    approval_document,
    new_entry_checks,
    parse_approval,
    parse_device_list,
    sign_device_list,
    verify_device_list,
)
from agent.sync.device_request import JoinRequest, same_code
from janus_hsm import open_key
from janus_hsm.atomic_file import replace_file
from janus_hsm.file_lock import locked_file
from janus_hsm.provider import KeyHandle

DEVICES_DIR: Final = "devices"
LIST_FILE: Final = "list.jws"
REQUEST_FILE: Final = "request.json"
LOCK_FILE: Final = ".lock"


class Devices:
    """The device list as one device keeps it, and the commands that change it."""

    def __init__(self, edge: EdgeAgent, *, on_touch: Callable[[str], None] | None = None) -> None:
        self.edge = edge
        self.directory = edge.config.state_dir / DEVICES_DIR
        self._on_touch = on_touch

    @classmethod
    def open(cls, state_dir: Path, *, on_touch: Callable[[str], None] | None = None) -> Devices:
        return cls(EdgeAgent.open(state_dir, on_touch=on_touch), on_touch=on_touch)

    @property
    def did(self) -> str:
        """This device's did:key (its device key)."""
        return self.edge.did

    # --- reading ---------------------------------------------------------------------

    def stored(self) -> DeviceList | None:
        """The latest list accepted here (every signature checked again), or None."""
        path = self.directory / LIST_FILE
        try:
            text = path.read_text("ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise DeviceStateError(f"cannot read {path}: {exc}") from None
        try:
            return parse_device_list(text)
        except DeviceError as exc:
            raise DeviceStateError(f"{path} is not a valid device list: {exc}") from None

    def pending(self) -> JoinRequest | None:
        """The join request this device made and that no list has answered yet."""
        path = self.directory / REQUEST_FILE
        try:
            data = json.loads(path.read_text())
            return JoinRequest.parse(data["request"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, DeviceError) as exc:
            raise DeviceStateError(f"{path} is not a join request of this agent: {exc}") from None

    def verifier(self) -> DeviceListVerifier:
        """A verifier for this owner's lists, starting from the one stored here."""
        dl = self._require()
        return DeviceListVerifier(dl.owner, dl)

    def state(self, dl: DeviceList | None = None) -> str:
        """This device in the list: current, removed, not in list, pending or no list."""
        dl = self.stored() if dl is None else dl
        if dl is None:
            return "pending" if self.pending() is not None else "no list"
        if dl.is_current(self.did):
            return "current"
        return "removed" if dl.was_removed(self.did) else "not in list"

    def status(self) -> dict[str, Any]:
        """What ``janus device list`` shows."""
        dl = self.stored()
        result: dict[str, Any] = {"this_device": self.did, "state": self.state(dl)}
        if dl is None:
            pending = self.pending()
            if pending is not None:
                result["code"] = pending.code
            return result
        result.update(dl.summary())
        result["root_here"] = dl.owner == self.did
        result["list"] = dl.compact
        return result

    # --- changing --------------------------------------------------------------------

    def init(self, name: str, *, now: int | None = None) -> DeviceList:
        """Make this device the owner's first: its key becomes the root, version 1."""
        now = int(time.time()) if now is None else now
        with self._locked():
            if (dl := self.stored()) is not None:
                raise DeviceExistsError(f"this device already keeps the list of {dl.owner}")
            if self.pending() is not None:
                raise DeviceExistsError("this device is waiting to join another device's list")
            key = self.edge.root
            request = JoinRequest.sign(key, self.edge.agreement, name, now=now)
            entry = DeviceEntry.approve(key, key.did, request, version=1, now=now)
            dl = sign_device_list(key, version=1, prev=None, devices=[entry], now=now)
            self._save(dl)
            return dl

    def request(self, name: str, *, now: int | None = None) -> JoinRequest:
        """A join request by this (new) device, kept until a list answers it."""
        now = int(time.time()) if now is None else now
        with self._locked():
            if (dl := self.stored()) is not None:
                raise DeviceExistsError(
                    f"this device already keeps the list of {dl.owner} ({self.state(dl)})"
                )
            request = JoinRequest.sign(self.edge.root, self.edge.agreement, name, now=now)
            self._write(REQUEST_FILE, json.dumps({"request": request.compact}).encode())
            return request

    def approve(self, request_text: str, code: str, *, now: int | None = None) -> DeviceEntry:
        """This device's approval of a join request, for the next version of the list.

        ``code`` is what the joining device shows: a request swapped on its way has
        another.  The entry is what the root signs next, here (:meth:`add`) or on the
        root's device (:meth:`add_approved`, from :func:`approval_document`).
        """
        now = int(time.time()) if now is None else now
        request = JoinRequest.parse(request_text)
        request.check_fresh(now)
        if not same_code(code, request.code):
            raise CodeMismatchError(
                "the code is not the one the joining device shows for this request: the "
                "request may have been swapped; make a new one and compare again"
            )
        with self._locked():
            dl = self._require()
            self._check_this_current(dl)
            new_entry_checks(dl, request)
            return DeviceEntry.approve(
                self.edge.root, dl.owner, request, version=dl.version + 1, now=now
            )

    def add(
        self,
        request_text: str,
        code: str,
        *,
        root_uri: str | None = None,
        now: int | None = None,
    ) -> DeviceList:
        """Approve a join request with this device's key; the root signs the next version.

        The root is this device's key on the first device, else ``root_uri`` (the
        root's token plugged in here).
        """
        entry = self.approve(request_text, code, now=now)
        document = approval_document(self.owner(), entry)
        return self.add_approved(document, root_uri=root_uri, now=now)

    def add_approved(
        self, approval_text: str, *, root_uri: str | None = None, now: int | None = None
    ) -> DeviceList:
        """Have the root sign the next version with an entry a current device approved."""
        now = int(time.time()) if now is None else now
        owner, entry = parse_approval(approval_text)
        entry.request.check_fresh(now)
        with self._locked():
            dl = self._require()
            if owner != dl.owner:
                raise WrongRootError(f"the approval is for the list of {owner:.80}")
            if entry.version != dl.version + 1:
                raise StaleApprovalError(
                    f"the approval is for version {entry.version}, but the next version here "
                    f"is {dl.version + 1}: approve the request again"
                )
            if dl.was_removed(entry.approver):
                raise RemovedDeviceError("the approving device was removed from the list")
            if not dl.is_current(entry.approver):
                raise UnknownApproverError("the approving device is not in the owner's list")
            new_entry_checks(dl, entry.request)
            root = self._root_key(dl, root_uri)
            new = sign_device_list(
                root,
                version=entry.version,
                prev=dl.hash,
                devices=(*dl.devices, entry),
                removed=dl.removed,
                now=now,
            )
            return self._accept_checked(new.compact, dl)

    def remove(
        self, name_or_did: str, *, root_uri: str | None = None, now: int | None = None
    ) -> tuple[DeviceList, DeviceEntry]:
        """A new version without the device, signed by the root; it stays as removed."""
        now = int(time.time()) if now is None else now
        with self._locked():
            dl = self._require()
            entry = dl.find(name_or_did)
            if entry is None:
                removed = any(name_or_did in (e.did, e.name) for e in dl.removed)
                raise UnknownDeviceError(
                    f"{name_or_did!r:.80} was already removed"
                    if removed
                    else f"no current device is named {name_or_did!r:.80}"
                )
            if entry.did == dl.owner:
                raise RootDeviceError(
                    f"{entry.name!r} holds the owner's root (its key signs the list): it "
                    "cannot be removed (see docs/devices-and-groups.md, a lost root)"
                )
            root = self._root_key(dl, root_uri)
            version = dl.version + 1
            tombstone = replace(entry, removed=version, removed_at=now)
            new = sign_device_list(
                root,
                version=version,
                prev=dl.hash,
                devices=[e for e in dl.devices if e.did != entry.did],
                removed=(*dl.removed, tombstone),
                now=now,
            )
            return self._accept_checked(new.compact, dl), tombstone

    def accept(self, list_text: str, *, owner: str | None = None) -> dict[str, Any]:
        """Take a newer list from another device (or the first one, when joining).

        A joining device takes as owner the root that signed a list containing exactly
        its own pending request (``owner`` pins it beforehand).  Afterwards only valid
        newer lists of that root are taken; the same list again changes nothing.
        """
        with self._locked():
            dl = self.stored()
            if dl is None:
                new = self._first_list(list_text, owner)
            else:
                if owner is not None and owner != dl.owner:
                    raise WrongRootError(f"this device follows the list of {dl.owner}")
                offered = parse_device_list(list_text)
                if offered.compact == dl.compact:
                    return self._accepted(dl, changed=False)
                new = self._accept_checked(list_text, dl)
            self._discard_request()
            return self._accepted(new, changed=True)

    # --- helpers ---------------------------------------------------------------------

    def _first_list(self, list_text: str, owner: str | None) -> DeviceList:
        offered = parse_device_list(list_text)
        if owner is not None and offered.owner != owner:
            raise WrongRootError(
                f"the list is signed by {offered.owner:.80}, not the owner given {owner:.80}"
            )
        pending = self.pending()
        entry = offered.device(self.did)
        if pending is None or entry is None or entry.request != pending:
            raise NotInListError(
                "this list does not add this device's pending join request "
                "(`janus device request` makes one)"
            )
        new = verify_device_list(list_text, offered.owner)
        self._save(new)
        return new

    def _accepted(self, dl: DeviceList, *, changed: bool) -> dict[str, Any]:
        return {
            "owner": dl.owner,
            "version": dl.version,
            "this_device": self.did,
            "state": self.state(dl),
            "changed": changed,
        }

    def _accept_checked(self, list_text: str, last: DeviceList) -> DeviceList:
        new = verify_device_list(list_text, last.owner, last)
        self._save(new)
        return new

    def owner(self) -> str:
        """The owner's root did:key, from the list kept here."""
        return self._require().owner

    def _require(self) -> DeviceList:
        dl = self.stored()
        if dl is None:
            raise NoDeviceListError(
                "no device list here: `janus device init --name NAME` on the owner's first "
                "device, or `janus device request` then `janus device accept` to join"
            )
        return dl

    def _check_this_current(self, dl: DeviceList) -> None:
        if dl.was_removed(self.did):
            raise RemovedDeviceError("this device was removed from the owner's list")
        if not dl.is_current(self.did):
            raise UnknownDeviceError("this device is not in the owner's list: it cannot approve")

    def _root_key(self, dl: DeviceList, root_uri: str | None) -> KeyHandle:
        if root_uri is None:
            if self.edge.did == dl.owner:
                return self.edge.root
            raise NotRootError(
                "the owner's root is another device's key: run this on that device, name the "
                "root key with --root-key URI (its token plugged in here), or approve here "
                "with --approve-only and finish with `janus device add APPROVAL` there"
            )
        key = open_key(root_uri, on_touch=self._on_touch)
        if key.did != dl.owner:
            raise NotRootError(f"the key given is {key.did:.80}, not the owner's root")
        return key

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        try:
            with locked_file(self.directory / LOCK_FILE):
                yield
        except OSError as exc:
            raise DeviceStateError(f"cannot use {self.directory}: {exc.strerror}") from None

    def _save(self, dl: DeviceList) -> None:
        self._write(LIST_FILE, dl.compact.encode("ascii"))

    def _write(self, name: str, data: bytes) -> None:
        try:
            replace_file(self.directory / name, data)
        except OSError as exc:
            raise DeviceStateError(
                f"cannot write {self.directory / name}: {exc.strerror}"
            ) from None

    def _discard_request(self) -> None:
        try:
            (self.directory / REQUEST_FILE).unlink(missing_ok=True)
        except OSError as exc:
            raise DeviceStateError(f"cannot remove the join request: {exc.strerror}") from None
