"""Device-pair messages through the owner's services: the fan-out's transport.

The fan-out node (fanout.py) says what to send to which device; this module carries
it, as relationship messages travel: each device takes its device-pair messages at one
address of its owner's receiving service (its *inbox*), and every device learns the
others' inboxes from announcements.  Wire messages go straight to the receiving
service or through one of the owner's sending services, as a relationship's do.

- **Inboxes**: an address is made by a request of the owner's root, so the root's
  device makes every inbox.  Its own has a software holder key (as a relationship
  address); another device's is registered with that device's *device key* as holder,
  so only that device (or the root) can pick up from it, and the pickup id travels to
  it in the *inbox document* ``janus device add --inbox-out`` writes and ``janus device
  accept --inbox`` takes, with the root device's announcement (how the new device
  finds its first session).
- **Relationships**: when both owners have a device list, the start of their
  relationship carries each owner's announcement (a relationship message of
  ``DEVICES_TYPE``), pinned to the root the relationship names; from then on
  ``janus rel send`` on any device writes to the two owners' conversation (direct.py)
  and pushes it over every device-pair session, and ``janus rel receive`` picks up the
  inbox and hands every message to the node, and sync batches to the conversation.
- **Commit before sending**: the node (with every ratchet) and the wire messages it
  produced are committed in one vault transaction before anything leaves; a message
  that cannot go now stays in the vault's fan-out outbox and is retried.

A conversation is a sync conversation whose peers are devices (direct.py): every
device of both owners ends up with the same causal log, whatever path a message took.
"""

from __future__ import annotations

import json
import time
from typing import Any, Final

from agent.didcomm.message import Message
from agent.relationships.delivery import Address, HeldAddress, ReceivingClient
from agent.relationships.errors import RelationshipError
from agent.relationships.manager import (
    DEVICES_TYPE,
    SYNC_TYPE,
    ReceiveReport,
    Relationships,
)
from agent.relationships.relationship import new_id
from agent.relationships.vault import Transaction
from agent.sync.device_errors import (
    DeviceError,
    NoDeviceListError,
    RemovedDeviceError,
    UnknownDeviceError,
)
from agent.sync.device_sync_key import DeviceSyncKeys
from agent.sync.devices import Devices
from agent.sync.direct import Direct
from agent.sync.errors import SyncError
from agent.sync.fanout import FanoutNode, Outgoing
from agent.sync.fanout_state import dump_node
from agent.sync.fanout_store import FANOUT_KEY, FANOUT_KIND, FanoutStore
from agent.sync.fanout_wire import Announcement, parse_plaintext
from agent.sync.groups import SYNC_DIR
from agent.sync.messages import Message as SyncMessage
from agent.sync.transport import GROUP_BATCH_TYPE
from janus_hsm import b64url
from janus_hsm.strictjson import loads_object

INBOX_KIND: Final = "device_inbox"
OUTBOX_KIND: Final = "fanout_outbox"
INTRO_KIND: Final = "fanout_intro"
INBOX_DOCUMENT: Final = "janus-device-inbox"
PICKUP_LIMIT: Final = 100
PICKUP_BATCHES: Final = 20


class InboxDocumentError(DeviceError):
    code = "bad_inbox_document"


class UnknownConversationError(DeviceError):
    code = "unknown_conversation"
    status = 404


class DeviceLink:
    """The transport of one device's fan-out, over an open :class:`Relationships`."""

    def __init__(self, rels: Relationships) -> None:
        self.rels = rels
        self.devices = Devices(rels.edge)

    def enabled(self) -> bool:
        """Whether this owner has a device list here (else the single-device path)."""
        return self.devices.stored() is not None

    # --- inboxes ---------------------------------------------------------------------

    def make_inbox(self, device: str) -> dict[str, Any]:
        """On the root's device, after it added ``device``: that device's inbox, made at
        the owner's receiving service with the device's key as holder, and the document
        the new device takes it from (with this device's announcement)."""
        with self.rels._locked():
            node, out = self._open()
            held = self._create(holder_did=device)
            out += node.set_address(device, held.address.to_dict())
            self._commit(node, out)
            self._flush(node)
            return {
                "type": INBOX_DOCUMENT,
                "device": device,
                "pickup_id": held.pickup_id,
                "announcement": node.introduce().decode(),
            }

    def take_inbox(self, text: str) -> dict[str, Any]:
        """On a new device, after ``janus device accept``: its inbox and the root
        device's announcement; opens its first sessions with its own devices."""
        doc = loads_object(text.encode(), "an inbox document", error=InboxDocumentError)
        if set(doc) != {"type", "device", "pickup_id", "announcement"} or (
            doc["type"] != INBOX_DOCUMENT
        ):
            raise InboxDocumentError("an inbox document has type, device, pickup_id, announcement")
        if doc["device"] != self.devices.did:
            raise InboxDocumentError("this inbox document is for another device")
        raw = doc["announcement"]
        if not isinstance(raw, str):
            raise InboxDocumentError("an inbox document's announcement is text")
        announcement = parse_plaintext(raw.encode())
        if not isinstance(announcement, Announcement):
            raise InboxDocumentError("an inbox document carries an announcement")
        address = announcement.addresses.get(self.devices.did)
        if address is None:
            raise InboxDocumentError("the announcement names no inbox for this device")
        try:
            held = HeldAddress.from_dict({"address": address, "pickup_id": doc["pickup_id"]})
        except RelationshipError:
            raise InboxDocumentError("the inbox document's pickup id is malformed") from None
        with self.rels._locked() as vault:
            node, out = self._open()
            out += node.meet(raw.encode(), owner=node.owner)
            out += node.set_address(node.did, held.address.to_dict())
            own = node.views[node.owner]
            for did in list(own.bundles):
                if did != node.did and did not in own.sessions:
                    out += node.reopen([did])
            with vault.transaction() as tx:
                tx.put(INBOX_KIND, "own", json.dumps(held.to_dict()).encode())
            self._commit(node, out)
            problems = self._flush(node)
        return {"device": node.did, "inbox": True, "errors": problems}

    def _create(self, *, holder_did: str | None = None) -> HeldAddress:
        service = self.rels._receiving()
        client = ReceivingClient(service["url"], did=service.get("did"))
        try:
            return client.create_address(self.rels.edge.root, holder_did=holder_did)
        finally:
            client.close()

    def _own_inbox(self) -> HeldAddress | None:
        raw = self.rels.vault.get(INBOX_KIND, "own")
        return None if raw is None else HeldAddress.from_dict(json.loads(raw))

    def _ensure_own_inbox(self, node: FanoutNode) -> list[Outgoing]:
        """The root's device makes its own inbox once it has a receiving service."""
        if self._own_inbox() is not None or node.owner != node.did:
            return []
        if not self.rels._services("receiving"):
            return []
        held = self._create()
        with self.rels.vault.transaction() as tx:
            tx.put(INBOX_KIND, "own", json.dumps(held.to_dict()).encode())
        return node.set_address(node.did, held.address.to_dict())

    # --- the node --------------------------------------------------------------------

    def _open(self) -> tuple[FanoutNode, list[Outgoing]]:
        store = FanoutStore(self.devices, self.rels.vault)
        node = store.open()
        out = [] if node.removed else store.refresh(node)
        if not node.removed:
            out += self._ensure_own_inbox(node)
        return node, out

    def _commit(
        self, node: FanoutNode, out: list[Outgoing], *, tx: Transaction | None = None
    ) -> None:
        """The node and what it produced, in one transaction, before anything leaves."""
        if tx is None:
            with self.rels.vault.transaction() as own:
                self._commit(node, out, tx=own)
            return
        tx.put(FANOUT_KIND, FANOUT_KEY, dump_node(node))
        for item in out:
            entry = {"device": item.device, "owner": item.owner, "wire": b64url.encode(item.wire)}
            tx.put(OUTBOX_KIND, f"{time.time_ns():020d}-{new_id()}", json.dumps(entry).encode())

    def _flush(self, node: FanoutNode) -> list[dict[str, Any]]:
        """Hand queued wire messages to the services, in order per device; what cannot
        go now (no address known yet, a service down) stays queued."""
        problems: list[dict[str, Any]] = []
        stuck: set[str] = set()
        for key, data in sorted(self.rels.vault.all(OUTBOX_KIND)):
            entry = json.loads(data)
            device, owner = entry["device"], entry["owner"]
            view = node.views.get(owner)
            session = None if view is None else view.sessions.get(device)
            if (node.removed and owner != node.owner) or session is None:
                self._unqueue(key)  # no session any more: nothing can read it
                continue
            if session.ended and owner != node.owner:
                # A removed peer device gets nothing; a removed own device still gets
                # the list that removed it (queued with the removal).
                self._unqueue(key)
                continue
            if device in stuck:
                continue
            address = node.address_of(owner, device)
            if address is None:
                stuck.add(device)
                continue
            try:
                self._deliver(Address.from_dict(address), b64url.decode(entry["wire"]))
            except RelationshipError as exc:
                stuck.add(device)
                problems.append({"code": exc.code, "message": f"device {device:.40}…: {exc}"})
                continue
            self._unqueue(key)
        return problems

    def _deliver(self, target: Address, wire: bytes) -> None:
        submission = self.rels._deliver_to(target, wire)
        if submission is not None:
            state, error = self.rels._wait_submission(submission)
            if state == "failed":
                raise RelationshipError(f"the sending service could not deliver: {error}")

    def _unqueue(self, key: str) -> None:
        with self.rels.vault.transaction() as tx:
            tx.delete(OUTBOX_KIND, key)

    # --- sending ---------------------------------------------------------------------

    def peer_of(self, node: FanoutNode, name: str) -> str | None:
        """The peer owner ``name`` means here: a relationship's label, or a peer's root
        did (on a device that learned the peer from its own devices)."""
        for rel in self.rels._all():
            if rel.label == name:
                return rel.peer_did if rel.peer_did in node.views else None
        return name if name in node.peers() else None

    def _direct(self, node: FanoutNode) -> Direct:
        vault = self.rels.vault
        return Direct(
            self.rels.edge.config.state_dir / SYNC_DIR, node, DeviceSyncKeys(vault), vault
        )

    def send(self, name: str, message: Message) -> dict[str, Any] | None:
        """``message`` into the conversation with the peer, for every device of both
        owners, or None when the fan-out does not apply (no device list here, or a peer
        that announced none): the caller then sends over the relationship."""
        if not self.enabled():
            return None
        with self.rels._locked():
            node, out = self._open()
            peer = self.peer_of(node, name)
            if peer is None:
                if out:
                    self._commit(node, out)
                return None
            direct = self._direct(node)
            try:
                # Signed by this device's sync key (the token only certifies that key,
                # once), stored in the sync store before the batches that carry it.
                direct.post(self.rels.edge.root, peer, message)
                sent = direct.outgoing()
            finally:
                direct.close()
            self._commit(node, out + sent)
            problems = self._flush(node)
        return {
            "name": name,
            "id": message.id,
            "queued": bool(problems),
            "devices": sorted({o.device for o in sent}),
        }

    # --- after a restore ------------------------------------------------------------

    def reopen(self, names: list[str] | None = None) -> dict[str, Any]:
        """On a device restored from an old backup: new sessions with the other devices
        (every current one, or those named by name or did:key), whose ratchets moved past
        this copy's.  The first batches go with them: heads offered over a new session
        are how each side learns what the other lost, so the device catches up with
        nothing new written, at the other devices' next command."""
        if not self.enabled():
            raise NoDeviceListError(
                "this owner has no device list here: `janus device init` or `accept` first"
            )
        with self.rels._locked():
            node, out = self._open()
            if node.removed:
                raise RemovedDeviceError("this device was removed from the owner's list")
            wanted = None if names is None else [self._device_named(node, n) for n in names]
            opened = node.reopen(wanted)
            direct = self._direct(node)
            try:
                sent = direct.outgoing()
            finally:
                direct.close()
            self._commit(node, out + opened + sent)
            problems = self._flush(node)
        return {
            "device": node.did,
            "reopened": sorted({o.device for o in opened}),
            "queued": bool(problems),
            "errors": problems,
        }

    @staticmethod
    def _device_named(node: FanoutNode, name: str) -> str:
        """A current device of any owner here, by did:key, or by name when one matches."""
        found = {
            e.did
            for view in node.views.values()
            for e in view.current.devices
            if name in (e.did, e.name) and e.did != node.did
        }
        if len(found) == 1:
            return found.pop()
        if not found:
            raise UnknownDeviceError(f"no other current device named {name[:80]!r} here")
        raise UnknownDeviceError(
            f"{len(found)} devices are named {name[:80]!r} (of several owners): give its did:key"
        )

    # --- receiving -------------------------------------------------------------------

    def receive(self, report: ReceiveReport) -> None:
        """After the relationship layer's ``receive``: take the peers' announcements it
        found, introduce this owner to new relationships, pick up the inbox, hand
        every message to the node, and send what is due."""
        if not self.enabled():
            return
        with self.rels._locked():
            try:
                node, out = self._open()
            except (DeviceError, SyncError) as exc:
                report.errors.append({"code": exc.code, "message": str(exc)})
                return
            if node.removed:
                self._commit(node, out)
                self._pick_up(node, report, None)
                return
            for item in report.devices:
                try:
                    raw = item["body"]["announcement"]
                    out += node.meet(str(raw).encode(), owner=item["peer"])
                except (KeyError, TypeError):
                    report.errors.append(
                        {"code": "malformed_fanout_message", "message": "a bad introduction"}
                    )
                except (DeviceError, SyncError, RelationshipError) as exc:
                    report.errors.append({"code": exc.code, "message": str(exc)})
            self._introduce(node)
            self._commit(node, out)
            direct = self._direct(node)
            try:
                self._pick_up(node, report, direct)
                self._commit(node, direct.outgoing())
            finally:
                direct.close()
            report.errors.extend(self._flush(node))

    def _introduce(self, node: FanoutNode) -> None:
        """This owner's announcement to every relationship that has not had it: the
        start of a relationship carries the two owners' announcements."""
        for rel in self.rels._all():
            if rel.state != "active" or self.rels.vault.get(INTRO_KIND, rel.id) is not None:
                continue
            body = {"announcement": node.introduce().decode()}
            self.rels._commit_outgoing(rel, Message.new(DEVICES_TYPE, body))
            with self.rels.vault.transaction() as tx:
                tx.put(INTRO_KIND, rel.id, b"")

    def _pick_up(self, node: FanoutNode, report: ReceiveReport, direct: Direct | None) -> None:
        held = self._own_inbox()
        if held is None:
            return
        signer = self.rels._signer(held)
        client = ReceivingClient(held.address.service)
        try:
            for _ in range(PICKUP_BATCHES):
                try:
                    deliveries = client.pickup(signer, held, limit=PICKUP_LIMIT)
                except RelationshipError as exc:
                    report.errors.append({"code": exc.code, "message": f"inbox: {exc}"})
                    return
                for delivery in deliveries:
                    if not self.rels.vault.seen(delivery.ciphertext):
                        self._take(node, delivery.ciphertext, report, direct)
                if deliveries:
                    client.ack(signer, held, [d.id for d in deliveries])
                if len(deliveries) < PICKUP_LIMIT:
                    return
        finally:
            client.close()

    def _take(
        self, node: FanoutNode, wire: bytes, report: ReceiveReport, direct: Direct | None
    ) -> None:
        """One device-pair message: the node's new state, what it asks to send and the
        ciphertext's hash, committed together (a sync batch's messages are in the sync
        store first: a crash in between is repaired by offers and requests)."""
        try:
            got = node.receive(wire)
        except (DeviceError, SyncError, RelationshipError) as exc:
            with self.rels.vault.transaction() as tx:
                tx.mark_seen(wire)
            report.errors.append({"code": exc.code, "message": f"device message: {exc}"})
            return
        if got.kind == "message" and got.conversation is not None:
            if got.type == GROUP_BATCH_TYPE:
                # For the groups, applied after the pickup (agent/sync/groups.py).
                report.sync.append(
                    {
                        "name": self.label(got.owner),
                        "peer": got.device,
                        "owner": got.owner,
                        "body": got.body,
                    }
                )
            elif got.type != SYNC_TYPE or direct is None:
                report.errors.append(
                    {"code": "malformed_fanout_message", "message": "a device message of no use"}
                )
            else:
                try:
                    taken = direct.take(got.device, got.conversation, got.body)
                except SyncError as exc:
                    taken = []
                    report.errors.append({"code": exc.code, "message": f"sync batch: {exc}"})
                for message in taken:
                    report.messages.append(
                        self._shown(got.conversation, message, direct.device_of(message.author))
                    )
        with self.rels.vault.transaction() as tx:
            tx.mark_seen(wire)
            self._commit(node, got.outgoing, tx=tx)
        if got.opened:
            report.event("device_session", device=got.device, owner=got.owner)

    def _shown(self, peer: str, written: SyncMessage, device: str) -> dict[str, Any]:
        return {
            "name": self.label(peer),
            "id": written.id,
            "device": device,
            "parents": list(written.parents),
            "message": json.loads(written.body),
        }

    # --- reading ---------------------------------------------------------------------

    def label(self, peer: str) -> str:
        for rel in self.rels._all():
            if rel.peer_did == peer:
                return rel.label
        return peer

    def history_of(self, name: str | None) -> list[dict[str, Any]]:
        """The conversation with one peer (a label or its root did), or with every peer,
        in the history order every device computes alike (depth, time, id):
        ``{"name", "id", "device", "parents", "message"}`` each."""
        node = FanoutStore(self.devices, self.rels.vault).open()
        peers = node.peers()
        if name is not None:
            peers = [p for p in peers if name in (p, self.label(p))]
            if not peers:
                raise UnknownConversationError(f"no conversation with {name!r} here")
        direct = self._direct(node)
        try:
            return [
                self._shown(p, m, direct.device_of(m.author))
                for p in peers
                for m in direct.history(p)
            ]
        finally:
            direct.close()

    def status(self) -> dict[str, Any] | None:
        """What ``janus sync status`` shows of the fan-out: sessions per owner and each
        conversation's history hash; None without a device list."""
        if not self.enabled():
            return None
        with self.rels._locked():
            raw = self.rels.vault.get(FANOUT_KIND, FANOUT_KEY)
            if raw is None:
                return {"device": self.devices.did, "owners": [], "conversations": []}
            node = FanoutStore(self.devices, self.rels.vault).open()
            status = node.status()
            status["inbox"] = self._own_inbox() is not None
            status["queued"] = len(self.rels.vault.all(OUTBOX_KIND))
            conversations = []
            direct = self._direct(node)
            try:
                for peer in node.peers():
                    conversations.append(
                        {
                            "name": self.label(peer),
                            "peer": peer,
                            "messages": len(direct.history(peer)),
                            "history_hash": direct.history_hash(peer),
                        }
                    )
            finally:
                direct.close()
            status["conversations"] = conversations
            for owner in status["owners"]:
                owner["name"] = (
                    "this owner" if owner["owner"] == node.owner else self.label(owner["owner"])
                )
            return status
