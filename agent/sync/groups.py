"""The groups of one owner: create, add, remove, send, and the sync they ride on.

A group is a sync conversation (agent/sync/protocol.py) whose members are owners this
one holds relationships with.  Its log holds the membership records
(agent/sync/group_log.py) and the messages; every member keeps all of it.  Each
member's sync batches travel over the pairwise relationship with each other member it
has one with, as relationship messages of type ``SYNC_TYPE`` (agent/sync/transport.py):
the Double Ratchet of each relationship encrypts every batch for that member alone.
With a device list here, sync peers are *devices* instead (every current device of
every member, this owner's too), batches ride device-pair sessions (fanout.py) as 1:1
conversations do (direct.py), and messages are signed by the writing device's sync key
(agent/sync/device_sync_key.py: certified once by the device's key, its certificate
in the ``keys`` of the batches), admitted if that device is current in its owner's
list, or was removed after the message's time.

State, in the edge agent's state directory: the sync key and its certificate, the
groups (id, local name, creator) and the certificates of other members' sync keys in
the relationship vault (sealed there); the logs in ``sync/groups.db`` (a
:class:`SyncStore`, mode 0600).  ``sync/.lock`` is held for an instance's lifetime, so
two commands never drive one sync node at once.

The sync node's timers live in memory, and a command is one process: retransmission is
driven by the owner's commands.  Every ``open`` of this class opens each (member,
group) pair, which offers the member what it is not known to hold and asks for
what is missing; every ``janus rel receive`` and ``janus group send`` then sends what
is due.  A lost relationship message (or one taken but lost before the sync layer
applied it) is thus repaired at the next command on either side.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from agent.didcomm.message import Message as DIDCommMessage
from agent.relationships.errors import RelationshipError
from agent.relationships.manager import SYNC_TYPE, Relationships
from agent.sync.device_errors import RemovedDeviceError
from agent.sync.device_sync_key import DeviceSyncKeys
from agent.sync.errors import SyncError
from agent.sync.fanout import FanoutNode
from agent.sync.group_errors import (
    BadGroupNameError,
    GroupError,
    GroupExistsError,
    GroupMemberError,
    GroupStateError,
    MixedDevicesError,
    NotAGroupMemberError,
    NotGroupCreatorError,
    UncertifiedAuthorError,
    UnknownGroupError,
)
from agent.sync.group_log import (
    CONTENT_TYPES,
    DATA_TYPE,
    MAX_MEMBERS,
    OP_TYPES,
    TEXT_TYPE,
    Op,
    op_message,
    parse_op,
)
from agent.sync.group_rules import GroupRules
from agent.sync.ids import ID_BYTES, id_bytes, new_conversation_id
from agent.sync.messages import MAX_BODY, Message
from agent.sync.protocol import Limits, SyncNode
from agent.sync.sealing import StoreSealer
from agent.sync.store import SyncStore
from agent.sync.sync_key import SyncKey, certify, parse_certificate
from agent.sync.transport import (
    GROUP_BATCH_TYPE,
    Envelope,
    parse_envelope,
    summarize,
    worth_sending,
)
from janus_hsm.file_lock import locked_file
from janus_hsm.provider import KeyHandle

SYNC_DIR: Final = "sync"
STORE_FILE: Final = "groups.db"
#: A batch of 36 KiB is 48 KiB in base64: with the certificates it names, it fits a
#: relationship message (64 KiB of plaintext).
LIMITS: Final = Limits(max_batch_bytes=36 * 1024)
#: The heads are offered to a peer believed to hold them (how a peer restored from an
#: old backup learns what it lost) at most this often, so idle groups cost nothing.
HEADS_EVERY: Final = 3600.0
#: Batches per peer per command: what is left waits for the next command.
MAX_POLLS: Final = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@+'-]{0,63}")


def check_group_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadGroupNameError(
            "a group name is 1-64 characters: letters, digits, space and . _ @ + ' -, "
            "starting with a letter or digit"
        )
    return name


@dataclass
class GroupRecord:
    """One group as this owner keeps it (in the vault)."""

    id: str
    name: str
    creator: str
    joined: int
    #: False until the name is taken from the group's create record (a group joined
    #: from a batch is named after its id until then).
    named: bool = True

    def to_bytes(self) -> bytes:
        return json.dumps({"v": 1, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> GroupRecord:
        try:
            d = json.loads(data)
            if d.pop("v") != 1:
                raise GroupStateError("a group record of an unknown version")
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise GroupStateError(f"a group record is damaged: {type(exc).__name__}") from None


@dataclass
class TakeReport:
    """What the batches of one ``receive`` did: group messages to show, events, errors."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


class Groups:
    """One owner's groups over its relationships (module docstring)."""

    def __init__(
        self, rels: Relationships, *, limits: Limits | None = None, durable: bool = True
    ) -> None:
        self.rels = rels
        self.me = rels.edge.did
        directory = rels.edge.config.state_dir / SYNC_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        self._exit = contextlib.ExitStack()
        self._exit.enter_context(locked_file(directory / ".lock"))
        try:
            self.store = SyncStore(
                directory / STORE_FILE, durable=durable, sealer=StoreSealer.of_vault(rels.vault)
            )
            self._exit.callback(self.store.close)
            self._load(limits)
        except BaseException:
            self._exit.close()
            raise

    def _load(self, limits: Limits | None) -> None:
        vault = self.rels.vault
        self.records = {k: GroupRecord.from_bytes(d) for k, d in vault.all("group")}
        self._compacts: dict[str, str] = {}
        certs: dict[str, str] = {}
        for sync_did, data in vault.all("sync_cert"):
            stored = json.loads(data)
            certs[sync_did], self._compacts[sync_did] = stored["root"], stored["compact"]
        #: The device sync keys (used with a device list only).
        self.device_keys = DeviceSyncKeys(vault)
        #: With a device list here, the fan-out node: sync peers are then devices.
        self.fanout = self._open_fanout()
        if self.fanout is not None:
            self.me = self.fanout.owner
            certs.update(self._device_certs(self.fanout))
        self.rules = GroupRules(self.store, certs)
        for gid, record in self.records.items():
            self.rules.add_group(gid, record.creator)
        admit = self.rules.admit if self.fanout is None else self._admit_device
        self.node = SyncNode(self.store, limits=limits or LIMITS, admit=admit)
        self._key: SyncKey | None = None
        self.labels = {
            str(r["peer"]): str(r["name"])
            for r in self.rels.list()
            if "peer" in r and r.get("state") != "blocked"
        }
        if self.fanout is not None:
            # A device without relationships of its own knows its peers by root did.
            for owner in self.fanout.peers():
                self.labels.setdefault(owner, owner)
        self.sync_peers()

    # --- devices --------------------------------------------------------------------------

    def _open_fanout(self) -> FanoutNode | None:
        """The fan-out node when this owner has a device list (committing what bringing
        it up to date produced: it leaves with the next batches), else None."""
        from agent.sync.device_link import DeviceLink

        link = DeviceLink(self.rels)
        if not link.enabled():
            return None
        with self.rels._locked():
            node, out = link._open()
            if out:
                link._commit(node, out)
        return node

    def _device_certs(self, node: FanoutNode) -> dict[str, str]:
        """Device key and device sync key -> owner root, for every device any known
        list ever named (so that what a device wrote before its removal still names its
        owner); ``admit`` takes only current devices."""
        devices = {
            entry.did: owner
            for owner, view in node.views.items()
            for entry in view.current.entries()
        }
        synced = {
            sync_did: devices[device]
            for sync_did, (device, _) in self.device_keys.known.items()
            if device in devices
        }
        return {**devices, **synced}

    def _known_device(self, did: str) -> bool:
        return self.fanout is not None and did in self._device_certs(self.fanout)

    def device_of(self, author: str) -> str:
        """The device a group message's author stands for (with devices)."""
        return self.device_keys.device_of(author) or author

    def _admit_device(self, message: Message) -> None:
        """With devices, a group message's author is a device sync key (or, as written
        before sync keys, a device key): admitted if its device is current in the list
        of an owner this device holds, or was removed after the message's time, then by
        the rules."""
        assert self.fanout is not None
        device = self.device_of(message.author)
        owner = self.rules.certs.get(device)
        view = None if owner is None else self.fanout.views.get(owner)
        if view is None or not view.current.admits_author(device, message.timestamp):
            raise UncertifiedAuthorError(
                "the author is no sync key of a device of an owner known here that was "
                "current when the message was written"
            )
        self.rules.admit(message)

    def owner_of(self, peer: str) -> str:
        """The owner a sync peer stands for (a device's owner with devices)."""
        return self.rules.certs.get(peer, peer) if self.fanout is not None else peer

    def _signer(self) -> KeyHandle:
        """What signs this owner's group messages: with devices, this device's sync key
        (certified once by the device's key, admitted by its owner's list, as 1:1
        messages are); else the owner's sync key.  Never the token, per message."""
        if self.fanout is None:
            return self.key()
        if self.fanout.removed:
            raise RemovedDeviceError("this device was removed from its owner's list")
        key = self.device_keys.signer(self.rels.edge.root)
        self.rules.certs[key.did] = self.me
        return key

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> Groups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, state_dir: Path, *, on_touch: Callable[[str], None] | None = None
    ) -> Iterator[Groups]:
        """The relationships and the groups of the edge agent in ``state_dir``."""
        with Relationships.open(state_dir, on_touch=on_touch) as rels, cls(rels) as groups:
            yield groups

    # --- the sync key ---------------------------------------------------------------------

    def key(self) -> SyncKey:
        """This owner's sync key; made and certified by the root (one token signature)
        the first time the owner writes to a group."""
        if self._key is None:
            vault = self.rels.vault
            seed = vault.get("sync_key", "own")
            if seed is None:
                key = SyncKey.generate()
                cert = certify(self.rels.edge.root, key)
                with vault.transaction() as tx:
                    tx.put("sync_key", "own", key.seed)
                    tx.put("sync_cert", key.did, _cert_record(self.me, cert.compact))
                self._compacts[key.did] = cert.compact
            else:
                key = SyncKey(seed)
            self.rules.certs[key.did] = self.me
            self._key = key
        return self._key

    # --- peers ----------------------------------------------------------------------------

    def sync_peers(self) -> list[tuple[str, str]]:
        """Open every (member, group) pair this owner syncs, close the others; returns
        the pairs newly opened.  A group whose records have not arrived yet syncs with
        its creator only; an owner no longer a member syncs with no one."""
        now = time.time()
        opened: list[tuple[str, str]] = []
        for gid in self.rules.groups():
            members = self.rules.members(gid)
            if not members:
                owners = {self.rules.creator(gid)}
            elif self.me in members:
                owners = set(members)
            else:
                owners = set()
            want = self._peers_of(owners)
            current = set(self.node.peers(gid))
            for peer in current - want:
                self.node.close(peer, gid)
            create = self.rules.create_record(gid) if self.rules.creator(gid) == self.me else None
            for peer in sorted(want - current):
                self.node.open(peer, gid, now)
                opened.append((peer, gid))
                if create is not None and not self.store.peer_has(gid, peer, [create]):
                    # A member joins on a batch from the creator that holds group
                    # records: until it is known to hold the create record, every
                    # command of the creator sends it again (a first batch may be lost).
                    self.node.push(peer, gid, [create])
        return opened

    def _peers_of(self, owners: set[str]) -> set[str]:
        """The sync peers standing for these owners: their relationships' peers, or
        with devices every device of theirs (this owner's too) with a live session."""
        if self.fanout is None:
            return {p for p in owners if p in self.labels and p != self.me}
        if self.fanout.removed:
            return set()
        views = self.fanout.views
        return {s.device for o in sorted(owners) if o in views for s in views[o].live()}

    def label_of(self, did: str) -> str:
        if did == self.me:
            return "me"
        return self.labels.get(did, f"…{did[-12:]}")

    # --- commands -------------------------------------------------------------------------

    def _find(self, name: str) -> GroupRecord:
        for record in self.records.values():
            if record.name == name:
                return record
        raise UnknownGroupError(f"no group named {name!r}: see `janus sync status`")

    def _member_did(self, label: str) -> str:
        for did, name in self.labels.items():
            if name == label:
                return did
        raise GroupMemberError(f"no active relationship named {label!r}: see `janus rel list`")

    def _check_path(self, did: str, label: str) -> None:
        """With a device list here, every member's owner must have one known here too:
        groups sync by device then, and an owner without a list syncs by relationship."""
        if self.fanout is not None and did not in self.fanout.views:
            raise MixedDevicesError(
                f"{label!r} has no device list known here, and this owner has one: a group "
                "syncs by device, so its members need device lists too (one device is "
                "enough: they run `janus device init` once; if they have one, `janus rel "
                "receive` here first, to take their announcement)"
            )

    def _save(self, record: GroupRecord) -> None:
        with self.rels.vault.transaction() as tx:
            tx.put("group", record.id, record.to_bytes())
        self.records[record.id] = record

    def _post(self, gid: str, content_type: str, body: bytes) -> Message:
        message = Message.create(
            self._signer(),
            conversation=gid,
            parents=self.store.heads(gid),
            content_type=content_type,
            body=body,
            timestamp=int(time.time() * 1000),
        )
        self.rules.delivered(self.node.post(message, time.time()))
        return message

    def _push_all(self, gid: str, ids: list[str]) -> None:
        for peer in self.node.peers(gid):
            self.node.push(peer, gid, ids)

    def create(self, name: str, labels: list[str]) -> dict[str, Any]:
        """A new group of this owner and the named relationships' owners."""
        check_group_name(name)
        if any(r.name == name for r in self.records.values()):
            raise GroupExistsError(f"a group named {name!r} exists here")
        named = {label: self._member_did(label) for label in labels}
        for label, did in named.items():
            self._check_path(did, label)
        members = sorted(set(named.values()))
        if len(members) > MAX_MEMBERS:
            raise GroupMemberError(f"a group has at most {MAX_MEMBERS} members")
        self._signer()  # the token signature (if any) before anything is written
        gid = new_conversation_id()
        self._save(GroupRecord(gid, name, self.me, int(time.time())))
        self.rules.add_group(gid, self.me)
        content_type, body = op_message(Op("create", tuple(members), name))
        message = self._post(gid, content_type, body)
        self.sync_peers()
        self._push_all(gid, [message.id])
        errors = self.flush()
        return {"name": name, "id": gid, "members": self._members(gid), "errors": errors}

    def _creator_only(self, record: GroupRecord) -> None:
        if record.creator != self.me:
            raise NotGroupCreatorError(
                f"only the group's creator ({self.label_of(record.creator)}) changes its members"
            )

    def add(self, name: str, label: str) -> dict[str, Any]:
        record = self._find(name)
        self._creator_only(record)
        did = self._member_did(label)
        if did in self.rules.members(record.id):
            raise GroupMemberError(f"{label!r} is a member of {name!r} already")
        self._check_path(did, label)
        content_type, body = op_message(Op("add", (did,)))
        message = self._post(record.id, content_type, body)
        for peer, gid in self.sync_peers():
            if gid == record.id:  # the new member: its whole history, unasked
                self.node.push(peer, gid, self.store.history(gid))
        self._push_all(record.id, [message.id])
        errors = self.flush()
        return {"name": name, "added": label, "members": self._members(record.id), "errors": errors}

    def remove(self, name: str, label: str) -> dict[str, Any]:
        record = self._find(name)
        self._creator_only(record)
        did = self._member_did(label)
        if did == self.me or did not in self.rules.members(record.id):
            raise GroupMemberError(f"{label!r} is not a member of {name!r} that can be removed")
        content_type, body = op_message(Op("remove", (did,)))
        message = self._post(record.id, content_type, body)
        # The removed member gets the removal itself (so it knows), then nothing more:
        # sync_peers closes it before any later batch is made.
        self._push_all(record.id, [message.id])
        errors = self.flush()
        self.sync_peers()
        return {
            "name": name,
            "removed": label,
            "members": self._members(record.id),
            "errors": errors,
        }

    def send(
        self, name: str, *, text: str | None = None, data: bytes | None = None
    ) -> dict[str, Any]:
        if (text is None) == (data is None):
            raise GroupError("give a text or data")
        record = self._find(name)
        if self.me not in self.rules.members(record.id):
            raise NotAGroupMemberError(f"this owner is not a member of {name!r}")
        if text is not None:
            content_type, body = TEXT_TYPE, text.encode("utf-8")
        else:
            assert data is not None
            content_type, body = DATA_TYPE, data
        if len(body) > MAX_BODY:
            raise GroupError(f"a group message is at most {MAX_BODY} bytes")
        message = self._post(record.id, content_type, body)
        self._push_all(record.id, [message.id])
        peers = self.node.peers(record.id)
        errors = self.flush()
        sent: dict[str, Any] = {
            "name": name,
            "id": message.id,
            "to": sorted({self.label_of(self.owner_of(p)) for p in peers}),
            "errors": errors,
        }
        if self.fanout is not None:
            sent["devices"] = sorted(peers)
        return sent

    # --- batches in and out ---------------------------------------------------------------

    def take(self, entries: list[dict[str, Any]]) -> TakeReport:
        """Apply the sync batches a ``receive`` found (``ReceiveReport.sync``)."""
        report = TakeReport()
        for entry in entries:
            label, owner = str(entry["name"]), entry.get("owner")
            if (owner is None) != (self.fanout is None):
                # With devices, batches ride device-pair sessions only (and without,
                # relationships only): a peer's software out of step with this one.
                report.errors.append(
                    {
                        "code": "group_batch_path",
                        "message": f"a group batch from {label!r} by a path not used here",
                    }
                )
                continue
            self._take_one(label, str(entry["peer"]), entry["body"], report)
        self.sync_peers()
        return report

    def _take_one(self, label: str, peer: str, body: Any, report: TakeReport) -> None:
        now = time.time()
        try:
            envelope = parse_envelope(body)
        except GroupError as exc:
            report.errors.append({"code": exc.code, "message": f"from {label!r}: {exc}"})
            return
        if self.fanout is not None:
            try:
                self.device_keys.learn(list(envelope.keys), self._known_device)
            except GroupError as exc:
                report.errors.append({"code": exc.code, "message": f"from {label!r}: {exc}"})
                return
            self.rules.certs.update(self._device_certs(self.fanout))
        fresh: list[tuple[str, str, str]] = []
        for compact in envelope.keys if self.fanout is None else ():
            try:
                cert = parse_certificate(compact)
            except GroupError as exc:
                report.errors.append({"code": exc.code, "message": f"from {label!r}: {exc}"})
                return
            if cert.sync_did not in self.rules.certs:
                fresh.append((cert.sync_did, cert.root_did, cert.compact))
        if fresh:
            with self.rels.vault.transaction() as tx:
                for sync_did, root, compact in fresh:
                    tx.put("sync_cert", sync_did, _cert_record(root, compact))
            for sync_did, root, compact in fresh:
                self.rules.certs[sync_did], self._compacts[sync_did] = root, compact
        joined: list[str] = []
        sender = self.owner_of(peer)
        for gid, creator in envelope.groups:
            # Joined from the creator, or (with devices) from another device of this
            # owner, which is trusted as this one is.
            trusted = creator == sender or (self.fanout is not None and sender == self.me)
            if gid not in self.records and trusted and _is_id(gid):
                # Joined when the creator itself sends the group: it names the members.
                self.records[gid] = GroupRecord(gid, f"group-{gid[:8]}", creator, int(now), False)
                self.rules.add_group(gid, creator)
                self.node.open(peer, gid, now)
                joined.append(gid)
        try:
            result = self.node.receive(peer, envelope.batch, now)
        except SyncError as exc:
            report.errors.append({"code": exc.code, "message": f"from {label!r}: {exc}"})
            result = None
        for gid in joined:
            # Kept only if the batch brought something of it: a peer cannot make this
            # owner keep groups by naming ids.
            if result is not None and self.store.has(gid, result.stored):
                self._save(self.records[gid])
                report.events.append({"event": "group_joined", "group_id": gid, "from": label})
            else:
                del self.records[gid]
                self.rules.remove_group(gid)
                self.node.close(peer, gid)
        if result is None:
            return
        self.rules.delivered(result.delivered)
        for mid, code in sorted(result.refused.items()):
            report.errors.append(
                {"code": code, "message": f"a group message from {label!r} was refused", "id": mid}
            )
        for message in result.delivered:
            self._show(message, report)

    def _show(self, message: Message, report: TakeReport) -> None:
        record = self.records[message.conversation]
        if message.content_type in OP_TYPES:
            op = parse_op(message.content_type, message.body, parents=len(message.parents))
            if op.kind == "create" and not record.named and op.name is not None:
                record.name, record.named = self._free_name(op.name, record.id), True
                self._save(record)
            report.events.append(
                {
                    "event": f"group_{op.kind}",
                    "group": record.name,
                    "members": [self.label_of(m) for m in op.members],
                }
            )
            return
        shown = self.describe(message)
        if shown["member"]:
            report.messages.append(shown)
        else:
            report.events.append(
                {"event": "group_not_member", "group": record.name, "id": message.id}
            )

    def _free_name(self, wanted: str, gid: str) -> str:
        try:
            base = check_group_name(wanted)
        except BadGroupNameError:
            base = f"group-{gid[:8]}"
        taken = {r.name for r in self.records.values() if r.id != gid}
        name, n = base, 2
        while name in taken:
            name, n = f"{base[:58]} ({n})", n + 1
        return name

    def describe(self, message: Message) -> dict[str, Any]:
        """A group message as ``rel receive`` and ``group show`` print it."""
        record = self.records[message.conversation]
        author = self.rules.author_root(message) or ""
        shown: dict[str, Any] = {
            "group": record.name,
            "group_id": record.id,
            "id": message.id,
            "author": self.label_of(author),
            "author_did": author,
            "timestamp": message.timestamp,
            "content_type": message.content_type,
            "parents": list(message.parents),
            "member": self.rules.member_at(message),
        }
        if self.fanout is not None:
            shown["device"] = self.device_of(message.author)  # the device it was written on
        if message.content_type == TEXT_TYPE:
            shown["text"] = message.body.decode("utf-8", "replace")
        elif message.content_type in CONTENT_TYPES:
            shown["data"] = base64.b64encode(message.body).decode()
        else:
            op = parse_op(message.content_type, message.body, parents=len(message.parents))
            shown["change"] = op.kind
            shown["members"] = [self.label_of(m) for m in op.members]
        return shown

    def flush(self) -> list[dict[str, Any]]:
        """Send every batch due to every peer (over its relationship); returns the
        problems (a message a service could not take stays queued and goes later)."""
        if self.fanout is not None:
            return self._flush_devices()
        errors: list[dict[str, Any]] = []
        now = time.time()
        for peer in self._all_peers():
            for _ in range(MAX_POLLS):
                due = self._due(peer, now)
                if due is None:
                    break
                body, heads_only = due
                if body is None:
                    continue
                label = self.labels[peer]
                try:
                    self.rels.send(label, DIDCommMessage.new(SYNC_TYPE, body))
                except RelationshipError as exc:
                    errors.append({"code": exc.code, "message": str(exc), "to": label})
                    break
                if heads_only:
                    with self.rels.vault.transaction() as tx:
                        tx.put("sync_heads", peer, str(now).encode())
        return errors

    def _all_peers(self) -> list[str]:
        return sorted({p for gid in self.rules.groups() for p in self.node.peers(gid)})

    def _due(self, peer: str, now: float) -> tuple[dict[str, Any] | None, bool] | None:
        """The next envelope for ``peer`` and whether it only offers heads (None for
        the envelope: a heads offer not due yet), or None when nothing is due."""
        batch = self.node.poll(peer, now)
        if batch is None:
            return None
        summary = summarize(batch)
        heads_only = not worth_sending(summary, self._holds(peer))
        if heads_only and not self._heads_due(peer, now):
            return None, heads_only
        if self.fanout is not None:
            keys = self.device_keys.certificates(summary.authors)
        else:
            keys = [self._compacts[a] for a in sorted(summary.authors) if a in self._compacts]
        groups = [
            (c, self.records[c].creator) for c in sorted(summary.conversations) if c in self.records
        ]
        return Envelope(batch, tuple(keys), tuple(groups)).to_body(), heads_only

    def _flush_devices(self) -> list[dict[str, Any]]:
        """With devices: one batch per device over its device-pair session, committed
        with the fan-out node (its ratchets) before anything leaves, as 1:1 sends are."""
        from agent.sync.device_link import DeviceLink

        link = DeviceLink(self.rels)
        errors: list[dict[str, Any]] = []
        now = time.time()
        with self.rels._locked():
            node, out = link._open()  # the node as saved now (ratchets move on)
            self.fanout = node
            self.rules.certs.update(self._device_certs(node))
            self.sync_peers()  # devices removed meanwhile: closed before any batch
            for peer in self._all_peers():
                owner = next((o for o, v in node.views.items() if peer in v.sessions), None)
                if owner is None:
                    continue
                for _ in range(MAX_POLLS):
                    due = self._due(peer, now)
                    if due is None:
                        break
                    body, heads_only = due
                    if body is None:
                        continue
                    try:
                        out.append(node.send_to(peer, owner, GROUP_BATCH_TYPE, body))
                    except SyncError as exc:
                        errors.append({"code": exc.code, "message": str(exc), "to": peer})
                        break
                    if heads_only:
                        with self.rels.vault.transaction() as tx:
                            tx.put("sync_heads", peer, str(now).encode())
            link._commit(node, out)
            errors += link._flush(node)
        return errors

    def _holds(self, peer: str) -> Callable[[str, str], bool]:
        def holds(conversation: str, message_id: str) -> bool:
            return bool(self.store.peer_has(conversation, peer, [message_id]))

        return holds

    def _heads_due(self, peer: str, now: float) -> bool:
        last = self.rels.vault.get("sync_heads", peer)
        return last is None or now - float(last) >= HEADS_EVERY

    # --- reading --------------------------------------------------------------------------

    def _members(self, gid: str) -> list[dict[str, str]]:
        return [{"name": self.label_of(m), "did": m} for m in sorted(self.rules.members(gid))]

    def status(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for record in sorted(self.records.values(), key=lambda r: r.name):
            gid = record.id
            out.append(
                {
                    "name": record.name,
                    "id": gid,
                    "creator": self.label_of(record.creator),
                    "member": self.me in self.rules.members(gid),
                    "members": self._members(gid),
                    "heads": self.store.heads(gid),
                    "delivered": len(self.store.delivered_ids(gid)),
                    "waiting": len(self.store.waiting(gid)),
                    "missing": len(self.store.missing(gid)),
                    "history_hash": self.store.history_hash(gid),
                    "peers": [
                        {
                            "name": self.label_of(self.owner_of(p)),
                            "did": p,
                            "not_acknowledged": len(self.store.unknown_to(gid, p)),
                        }
                        for p in sorted(self.node.peers(gid))
                    ],
                }
            )
        return out

    def show(self, name: str) -> dict[str, Any]:
        """A group and its history (the order every member computes alike)."""
        record = self._find(name)
        ids = self.store.history(record.id)
        by_id = {m.id: m for m in self.store.get(record.id, ids)}
        return {
            "name": record.name,
            "id": record.id,
            "creator": self.label_of(record.creator),
            "members": self._members(record.id),
            "history_hash": self.store.history_hash(record.id),
            "history": [self.describe(by_id[m]) for m in ids],
        }


def _cert_record(root: str, compact: str) -> bytes:
    return json.dumps({"root": root, "compact": compact}).encode()


def _is_id(text: str) -> bool:
    try:
        return len(id_bytes(text, "a group id", SyncError)) == ID_BYTES
    except SyncError:
        return False
