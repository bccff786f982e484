"""The device fan-out: an owner-level relationship as a set of device-pair sessions.

As in Signal's Sesame, every device of an owner holds its own session with every device
of each peer owner, and with every other device of its own owner: a message sent to a
peer goes out once per session, so it reaches every device of the peer and the sender's
other devices.  Each session is a relationship session (PQXDH with one token ECDH per
side, header-encrypted Double Ratchet) between two devices' agreement keys, opened from
a *device bundle* (fanout_bundle.py) that counts only once the owner's signed device
list names its device (device_list.py).

Devices learn each other through *announcements*: an owner's signed list and the
bundles of its devices, sent over existing sessions whenever a device learns something
new; own devices also relay their peers' announcements to each other.  Of two devices,
the one whose did:key sorts first opens their session (so two devices do not open two
sessions with each other at once; a device restored from an old backup re-opens all of
its sessions, :meth:`FanoutNode.reopen`); the first message of a session is the
opener's announcement, which lets the other device check the opener against its
owner's list before it keeps anything.  A device that leaves its owner's list has its
sessions ended on every device that learns the list; anything from it is refused
(``device_removed``).

Pure logic and memory: a :class:`FanoutNode` turns what arrives into deliveries and
says what to send (:class:`Outgoing`, one wire message per device); carrying the
messages is the caller's part.  Spec: docs/devices-and-groups.md ("The fan-out").
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from agent.relationships import suite as suites
from agent.relationships.errors import RelationshipError, ReplayedInitialMessageError
from agent.relationships.padding import MAX_PLAINTEXT
from agent.relationships.prekeys import PrekeyBundle, PrekeyStore
from agent.relationships.ratchet import RatchetState, open_first_message
from agent.relationships.x3dh import KIND_INITIAL, KIND_RATCHET, initiate, parse_initial_header
from agent.sync.device_errors import NotNewerError, RemovedDeviceError, WrongRootError
from agent.sync.device_list import (
    DeviceList,
    DeviceListVerifier,
    parse_device_list,
    verify_device_list,
)
from agent.sync.errors import SyncError
from agent.sync.fanout_bundle import (
    DEVICE_BUNDLE_TTL,
    agreement_did,
    check_bundle,
    parse_device_bundle,
    publish_device_bundle,
)
from agent.sync.fanout_errors import (
    DeviceBundleError,
    MalformedFanoutError,
    UnknownOwnerError,
    UnknownSessionError,
)
from agent.sync.fanout_session import DeviceSession, ratchet_part
from agent.sync.fanout_wire import Announcement, OwnerMessage, parse_plaintext
from janus_hsm.provider import KeyHandle

#: First messages kept aside until their owner is known here (the oldest go first).
MAX_WAITING: Final = 64


@dataclass(frozen=True)
class Outgoing:
    """One wire message for one device."""

    device: str
    owner: str
    wire: bytes


@dataclass
class Received:
    """What one incoming message was, and what this device sends because of it."""

    device: str
    owner: str
    #: "ignored": a session opened at the same time as this device's own with the same
    #: device; the one opened by the device whose did:key sorts first stays.
    kind: Literal["announce", "message", "ignored"]
    #: For a message: the peer owner whose relationship it belongs to.
    conversation: str | None = None
    #: For a message: sent by another device of this owner (to ``conversation``).
    own_copy: bool = False
    type: str | None = None
    body: Any = None
    #: The message opened its session (the first message of a new device pair).
    opened: bool = False
    outgoing: list[Outgoing] = field(default_factory=list)


@dataclass
class OwnerView:
    """What one device keeps about one owner: its list, its devices' bundles, and this
    device's sessions with those devices."""

    verifier: DeviceListVerifier
    bundles: dict[str, PrekeyBundle] = field(default_factory=dict)
    sessions: dict[str, DeviceSession] = field(default_factory=dict)
    #: Where each device takes its device-pair messages (an address at its receiving
    #: service, as announced), for the transport.
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def current(self) -> DeviceList:
        assert self.verifier.current is not None
        return self.verifier.current

    def live(self) -> list[DeviceSession]:
        return [s for s in self.sessions.values() if not s.ended]


@dataclass
class _Staged:
    """An announcement's changes to one owner's view, checked, not yet applied."""

    owner: str
    newer: DeviceList | None  # a newer list, or None
    bundles: dict[str, PrekeyBundle]
    new_owner: bool
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)


class _StagedGuard:
    """A replay guard that only stages: digests are kept once the whole message checked
    out, so a refused initial message leaves nothing behind."""

    def __init__(self, seen: set[bytes]) -> None:
        self.seen_initial = seen
        self.staged: list[bytes] = []

    def seen(self, digest: bytes) -> bool:
        return digest in self.seen_initial or digest in self.staged

    def remember(self, digest: bytes) -> None:
        if self.seen(digest):
            raise ReplayedInitialMessageError("this initial message was already accepted")
        self.staged.append(digest)


class FanoutNode:
    """One device's sessions with its own other devices and with its peers' devices."""

    def __init__(
        self,
        device: KeyHandle,
        agreement: KeyHandle,
        own_list: DeviceList,
        prekeys: Path,
        *,
        bundle_ttl: int = DEVICE_BUNDLE_TTL,
        bundle: PrekeyBundle | None = None,
        removed: bool = False,
    ) -> None:
        """This device's node; a new device bundle is published in ``prekeys`` (one
        token signature) unless ``bundle`` is this device's, kept from before.
        ``removed``: a node saved after this device left ``own_list`` (loaded to refuse)."""
        if not removed:
            entry = DeviceListVerifier(own_list.owner, own_list).check_current(device.did)
            if entry.agreement != agreement.did:
                raise DeviceBundleError("the agreement key is not the one the list names for it")
        self.device = device
        self.agreement = agreement
        self.suite = suites.suite_for_key(agreement)
        self.store = PrekeyStore(prekeys, self.suite)
        if bundle is None or bundle.root_did != device.did:
            bundle = publish_device_bundle(self.store, device, agreement, ttl=bundle_ttl)
        self.bundle = bundle
        self.owner = own_list.owner
        self.views: dict[str, OwnerView] = {
            self.owner: OwnerView(
                DeviceListVerifier(self.owner, own_list),
                {} if removed else {device.did: self.bundle},
            )
        }
        self.removed = removed
        #: Digests of the initial headers of sessions accepted here (replays are refused).
        self.seen_initial: set[bytes] = set()
        #: First messages from devices of owners not (yet) known here, by digest.
        self.waiting: dict[bytes, tuple[str, bytes]] = {}

    @property
    def did(self) -> str:
        return self.device.did

    # --- what other devices learn from this one ---------------------------------------

    def introduce(self) -> bytes:
        """This owner's list and the bundles known here, as an announcement: handed to
        a device joining this owner, or to a peer owner when a relationship starts."""
        return self._announcement(self.owner).encode()

    def meet(self, announcement: bytes, *, owner: str) -> list[Outgoing]:
        """An owner's announcement from a channel that already says whose it is: a
        device of this owner at join time (``owner`` is this owner), or a peer owner at
        the start of a relationship (``owner`` its root did, pinned by the relationship).
        Checked whole before anything changes; opens the sessions this device opens."""
        self._check_active()
        msg = parse_plaintext(announcement)
        if not isinstance(msg, Announcement):
            raise MalformedFanoutError("an introduction is an announcement")
        if parse_device_list(msg.list).owner != owner:
            raise WrongRootError("the announced list is not signed by the owner's root")
        staged = self._stage(owner, msg, may_add=owner != self.owner)
        return self._apply(staged)

    def accept_own_list(
        self, compact: str, bundles: Iterable[dict[str, Any]] = ()
    ) -> list[Outgoing]:
        """A newer list of this owner (taken here by ``janus device accept``, ``add`` or
        ``remove``), with the bundles of devices it adds: sessions with removed devices
        end, and the list goes out over every session (once more to a removed own device,
        so it learns of its removal)."""
        return self.meet(Announcement(compact, tuple(bundles)).encode(), owner=self.owner)

    def set_address(self, device: str, address: dict[str, str]) -> list[Outgoing]:
        """Where a current device of this owner takes its device-pair messages (this
        device's own, or one the root's device made for another): announced over every
        session if it changed."""
        self._check_active()
        view = self.views[self.owner]
        view.verifier.check_current(device)
        if view.addresses.get(device) == address:
            return []
        view.addresses[device] = dict(address)
        return self._announce(self.owner, self._all_live())

    def address_of(self, owner: str, device: str) -> dict[str, str] | None:
        view = self.views.get(owner)
        return None if view is None else view.addresses.get(device)

    def announce(self) -> list[Outgoing]:
        """This owner's announcement over every session, and the peers' over the
        sessions with this owner's other devices."""
        self._check_active()
        out = self._announce(self.owner, self._all_live())
        for owner in self.peers():
            out += self._announce(owner, self.views[self.owner].live())
        return out

    # --- sending and receiving -------------------------------------------------------

    def send(self, owner: str, content_type: str, body: Any) -> list[Outgoing]:
        """One message to a peer owner: one wire message per current device of that
        owner and per other device of this owner (each on its own session)."""
        self._check_active()
        if owner == self.owner or owner not in self.views:
            raise UnknownOwnerError(f"no relationship with the owner {owner:.80}")
        plaintext = OwnerMessage(owner, content_type, body).encode()
        parse_plaintext(plaintext)  # the same bounds a receiver checks
        sessions = self.views[owner].live() + self.views[self.owner].live()
        return [Outgoing(s.device, s.owner, s.encrypt(plaintext)) for s in sessions]

    def send_to(self, device: str, owner: str, content_type: str, body: Any) -> Outgoing:
        """One message on the session with one device (of ``owner`` or of this owner),
        for the conversation with the peer ``owner``: a sync batch for that device.
        ``owner`` may be this owner for a message to an own device that belongs to no
        one peer's conversation (a group's batch)."""
        self._check_active()
        if owner not in self.views:
            raise UnknownOwnerError(f"no relationship with the owner {owner:.80}")
        plaintext = OwnerMessage(owner, content_type, body).encode()
        parse_plaintext(plaintext)
        for view in (self.views[owner], self.views[self.owner]):
            session = view.sessions.get(device)
            if session is not None and not session.ended:
                return Outgoing(device, session.owner, session.encrypt(plaintext))
        raise UnknownSessionError(f"no live session with the device {device:.80}")

    def receive(self, wire: bytes, *, device: str | None = None) -> Received:
        """One message from another device; refused (typed error, nothing changed) if
        it is not from a current device of this owner or of a peer owner.

        Nothing on the wire says which session a message is for (headers are
        encrypted), so each session is tried; a transport that knows the sending device
        (by the address the message came to) names it in ``device`` to try it first.
        """
        self._check_active()
        if not isinstance(wire, bytes) or len(wire) < 2:
            raise MalformedFanoutError("a device-pair message is too short")
        if wire[1] == KIND_INITIAL:
            return self._receive_initial(wire)
        if wire[1] == KIND_RATCHET:
            return self._receive_ratchet(wire, device)
        raise MalformedFanoutError("a device-pair message of an unknown kind")

    # --- state ---------------------------------------------------------------------------

    def peers(self) -> list[str]:
        return [o for o in self.views if o != self.owner]

    def sessions(self, owner: str) -> dict[str, DeviceSession]:
        return dict(self._view(owner).sessions)

    def missing(self, owner: str) -> list[str]:
        """Current devices of ``owner`` (other than this one) without a session yet."""
        view = self._view(owner)
        return [
            e.did
            for e in view.current.devices
            if e.did != self.did and (e.did not in view.sessions or view.sessions[e.did].ended)
        ]

    def _view(self, owner: str) -> OwnerView:
        view = self.views.get(owner)
        if view is None:
            raise UnknownOwnerError(f"no relationship with the owner {owner:.80}")
        return view

    def status(self) -> dict[str, Any]:
        return {
            "device": self.did,
            "owner": self.owner,
            "removed": self.removed,
            "owners": [
                {
                    "owner": owner,
                    "version": view.current.version,
                    "devices": [e.did for e in view.current.devices],
                    "sessions": sorted(s.device for s in view.live()),
                    "ended": sorted(s.device for s in view.sessions.values() if s.ended),
                    "missing": self.missing(owner),
                }
                for owner, view in self.views.items()
            ],
        }

    def fingerprint(self) -> tuple[object, ...]:
        """All the state, comparable: a refused message must leave it equal.  First
        messages kept aside for an owner not known yet (``waiting``) are not in it: they
        are nothing accepted, only taken again later."""
        return (
            self.removed,
            tuple(sorted(self.seen_initial)),
            tuple(
                (
                    owner,
                    view.current.compact,
                    tuple(sorted((d, b.binding) for d, b in view.bundles.items())),
                    tuple(sorted((d, tuple(sorted(a.items()))) for d, a in view.addresses.items())),
                    tuple(sorted(s.fingerprint() for s in view.sessions.values())),
                )
                for owner, view in sorted(self.views.items())
            ),
        )

    # --- receiving -----------------------------------------------------------------------

    def _receive_ratchet(self, wire: bytes, hint: str | None) -> Received:
        sessions = [s for view in self.views.values() for s in view.sessions.values()]
        sessions.sort(key=lambda s: s.device != hint)  # the named device's first
        for session in sessions:
            opened = session.try_open(wire)
            if opened is None:
                continue
            if session.ended:
                raise RemovedDeviceError(
                    f"device {session.device:.80} was removed from its owner's list"
                )
            return self._take(session, *opened)
        raise UnknownSessionError("the message opens under no device-pair session held here")

    def _receive_initial(self, wire: bytes) -> Received:
        header, rest = parse_initial_header(wire)
        digest = header.digest
        for view in self.views.values():
            for session in view.sessions.values():
                if session.initiator or session.initial_digest != digest:
                    continue
                # The opener repeats its initial header until it hears back.
                if session.ended:
                    raise RemovedDeviceError(
                        f"device {session.device:.80} was removed from its owner's list"
                    )
                opened = session.try_open(ratchet_part(header.suite, rest))
                if opened is None:
                    raise UnknownSessionError("a repeated initial header with a foreign body")
                return self._take(session, *opened)
        guard = _StagedGuard(self.seen_initial)
        first = open_first_message(
            self.agreement, self.store, wire, replay_guard=guard, consume=False
        )
        device = first.peer.root_did
        msg = parse_plaintext(first.plaintext)
        if not isinstance(msg, Announcement):
            raise MalformedFanoutError("the first message of a session is an announcement")
        owner = parse_device_list(msg.list).owner
        if owner not in self.views:
            # Its owner may be one this device is about to learn from its own devices
            # (the opener learned of it first): kept aside, nothing accepted, and taken
            # again once the owner is known.
            self.waiting.pop(digest, None)
            self.waiting[digest] = (owner, wire)
            while len(self.waiting) > MAX_WAITING:
                del self.waiting[next(iter(self.waiting))]
            raise UnknownOwnerError("a device of an owner with no relationship here")
        staged = self._stage(owner, msg, may_add=False)
        dl = staged.newer or self.views[owner].current
        entry = DeviceListVerifier(owner, dl).check_current(device)
        if device == self.did or agreement_did(first.peer.identity_jwk) != entry.agreement:
            raise DeviceBundleError("the opening device's keys are not the ones its list names")
        view = self.views[owner]
        mine = view.sessions.get(device)
        if mine is not None and mine.initiator and mine.initial is not None and self.did < device:
            # Both devices opened a session at once (one re-opening): the session
            # opened by the device whose did:key sorts first stays, on both sides.  Its
            # digest is kept, so a replay of it cannot replace the session later.
            self.seen_initial.update(guard.staged)
            return Received(device, owner, "ignored")
        # Everything checked: from here on the message changes state.
        self.seen_initial.update(guard.staged)
        session = DeviceSession(device, owner, False, first.state, digest, received=1)
        view.sessions[device] = session  # a device that opens again replaces its session
        out = self._apply(staged)
        # The answer stops the opener repeating its initial header.
        out += self._announce(self.owner, [session])
        if owner == self.owner:
            for peer in self.peers():
                out += self._announce(peer, [session])
        return Received(device, owner, "announce", opened=True, outgoing=out)

    def _take(self, session: DeviceSession, state: RatchetState, plaintext: bytes) -> Received:
        """Check one decrypted message, then commit the session's new state."""
        view = self.views[session.owner]
        view.verifier.check_current(session.device)
        msg = parse_plaintext(plaintext)
        own = session.owner == self.owner
        if isinstance(msg, Announcement):
            owner = parse_device_list(msg.list).owner
            if not own and owner != session.owner:
                raise WrongRootError("a peer's device announced another owner's list")
            staged = self._stage(owner, msg, may_add=own and owner != self.owner)
            self._commit(session, state)
            return Received(session.device, session.owner, "announce", outgoing=self._apply(staged))
        if own:
            # ``to`` is the peer whose conversation it is, or this owner for what is
            # no one peer's (a group's batch between own devices).
            if msg.to not in self.views:
                raise UnknownOwnerError("a copy of a message to an owner unknown here")
            conversation = msg.to
        else:
            if msg.to != self.owner:
                raise UnknownOwnerError("a peer's message addressed to another owner")
            conversation = session.owner
        self._commit(session, state)
        return Received(
            session.device, session.owner, "message", conversation, own, msg.type, msg.body
        )

    def _commit(self, session: DeviceSession, state: RatchetState) -> None:
        session.state = state
        session.received += 1
        session.initial = None

    # --- announcements -------------------------------------------------------------------

    def _stage(self, owner: str, msg: Announcement, *, may_add: bool) -> _Staged:
        view = self.views.get(owner)
        if view is None and not may_add:
            raise UnknownOwnerError(f"no relationship with the owner {owner:.80}")
        current = None if view is None else view.current
        late = False
        if current is not None and msg.list.strip() == current.compact:
            dl, newer = current, None
        else:
            try:
                newer = dl = verify_device_list(msg.list, owner, current)
            except NotNewerError:
                # An older list: taken as a late announcement (nothing changes) if the
                # current list extends it, refused as a fork (device_list_fork) if not.
                assert current is not None
                verify_device_list(current.compact, owner, parse_device_list(msg.list))
                dl, newer, late = current, None, True
        bundles: dict[str, PrekeyBundle] = {}
        for raw in msg.bundles:
            bundle = parse_device_bundle(raw)
            if late and not dl.is_current(bundle.root_did):
                continue  # a device removed since
            check_bundle(bundle, dl)
            did = bundle.root_did
            if did in bundles:
                raise DeviceBundleError("an announcement carries two bundles for one device")
            known = None if view is None else view.bundles.get(did)
            if did != self.did and (known is None or known.binding != bundle.binding):
                bundles[did] = bundle
        addresses = {
            did: address
            for did, address in msg.addresses.items()
            if did != self.did
            and dl.is_current(did)
            and (view is None or view.addresses.get(did) != address)
        }
        return _Staged(owner, newer, bundles, view is None, addresses)

    def _apply(self, staged: _Staged) -> list[Outgoing]:
        out: list[Outgoing] = []
        owner = staged.owner
        view = self.views.setdefault(owner, OwnerView(DeviceListVerifier(owner)))
        if staged.newer is not None:
            dl = staged.newer
            view.verifier.current = dl  # verified against the last list by _stage
            gone = [s for s in view.live() if not dl.is_current(s.device)]
            if owner == self.owner:
                # Once more to each removed own device, so that it learns of its removal.
                out += self._announce(owner, gone, dl)
            for session in gone:
                session.ended = True
            for did in [d for d in view.bundles if not dl.is_current(d)]:
                del view.bundles[did]
            if owner != self.owner:  # a removed own device still gets its last list
                for did in [d for d in view.addresses if not dl.is_current(d)]:
                    del view.addresses[did]
            if owner == self.owner and not dl.is_current(self.did):
                self._leave()
                return out
        view.bundles.update(staged.bundles)
        view.addresses.update(staged.addresses)
        if staged.newer is not None or staged.bundles or staged.addresses or staged.new_owner:
            if owner == self.owner:
                out += self._announce(owner, self._all_live())
            else:
                out += self._announce(owner, self.views[self.owner].live())
        out += self._open_sessions()
        if staged.new_owner:
            out += self._retry_waiting(owner)
        return out

    def _retry_waiting(self, owner: str) -> list[Outgoing]:
        out: list[Outgoing] = []
        for digest, (claimed, wire) in list(self.waiting.items()):
            if claimed != owner:
                continue
            del self.waiting[digest]
            with suppress(SyncError, RelationshipError):
                out += self._receive_initial(wire).outgoing
        return out

    def _open_sessions(self) -> list[Outgoing]:
        """Open every session this device opens: with each current device whose bundle
        is known here, that has no session yet, and whose did:key sorts after this one."""
        out: list[Outgoing] = []
        for owner, view in list(self.views.items()):
            for entry in view.current.devices:
                if entry.did > self.did and entry.did not in view.sessions:
                    out += self._open(owner, view, entry.did)
        return out

    def reopen(self, devices: Iterable[str] | None = None) -> list[Outgoing]:
        """New sessions with these devices (every current one by default), whichever
        did:key sorts first: for a device restored from an old backup, whose ratchets the
        other devices have moved past.  Each new session replaces the old one on both
        sides (the other device takes a new initial message from a current device as
        its session with it)."""
        self._check_active()
        wanted = None if devices is None else set(devices)
        out: list[Outgoing] = []
        for owner, view in list(self.views.items()):
            for entry in view.current.devices:
                if entry.did != self.did and (wanted is None or entry.did in wanted):
                    out += self._open(owner, view, entry.did)
        return out

    def _open(self, owner: str, view: OwnerView, did: str) -> list[Outgoing]:
        """A session opened with one device from its bundle (one token ECDH); its first
        message is this owner's announcement (and, to an own device, the peers')."""
        bundle = view.bundles.get(did)
        if bundle is None or bundle.suite is not self.suite:
            return []
        if bundle.expires <= time.time():
            del view.bundles[did]  # its device announces a new one
            return []
        keys, header = initiate(self.agreement, self.did, self.bundle, bundle)
        state = RatchetState.initiator(keys)
        session = DeviceSession(did, owner, True, state, keys.header.digest, initial=header)
        view.sessions[did] = session
        out = self._announce(self.owner, [session])
        if owner == self.owner:
            for peer in self.peers():
                out += self._announce(peer, [session])
        return out

    def _announcement(self, owner: str, dl: DeviceList | None = None) -> Announcement:
        view = self.views[owner]
        dl = view.current if dl is None else dl
        bundles = tuple(view.bundles[e.did].to_dict() for e in dl.devices if e.did in view.bundles)
        addresses = {e.did: view.addresses[e.did] for e in dl.devices if e.did in view.addresses}
        return Announcement(dl.compact, bundles, addresses)

    def _announce(
        self, owner: str, sessions: Iterable[DeviceSession], dl: DeviceList | None = None
    ) -> list[Outgoing]:
        sessions = list(sessions)
        if not sessions:
            return []
        plaintexts = self._announcement_parts(owner, dl)
        return [Outgoing(s.device, s.owner, s.encrypt(p)) for s in sessions for p in plaintexts]

    def _announcement_parts(
        self, owner: str, dl: DeviceList | None, limit: int = MAX_PLAINTEXT
    ) -> list[bytes]:
        """The announcement, split into several with the same list if its bundles do
        not all fit one message (16 bundles of P-256 devices and a full list do not)."""
        whole = self._announcement(owner, dl)
        if len(whole.encode()) <= limit:
            return [whole.encode()]
        parts: list[bytes] = []
        chunk: list[dict[str, Any]] = []
        for bundle in whole.bundles:
            part = Announcement(whole.list, (*chunk, bundle), whole.addresses)
            if chunk and len(part.encode()) > limit:
                parts.append(Announcement(whole.list, tuple(chunk), whole.addresses).encode())
                chunk = []
            chunk.append(bundle)
        parts.append(Announcement(whole.list, tuple(chunk), whole.addresses).encode())
        return parts

    def _all_live(self) -> list[DeviceSession]:
        return [s for view in self.views.values() for s in view.live()]

    def _leave(self) -> None:
        """This device left its owner's list: every session ends, nothing more goes out."""
        for view in self.views.values():
            for session in view.sessions.values():
                session.ended = True
        self.removed = True

    def _check_active(self) -> None:
        if self.removed:
            raise RemovedDeviceError("this device was removed from its owner's list")
