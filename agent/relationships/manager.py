"""The relationships of one edge agent: invite, accept, send, receive, rotate, block.

This is what ``janus rel …`` and ``janus edge service …`` drive.  Each public method
holds the state directory's lock for its whole run (two commands never interleave
their changes to one ratchet), and every change is one vault transaction:

- sending: the advanced ratchet and the encrypted message (in the outbox) are committed
  *before* anything leaves, so a crash can never make two messages under one key; the
  outbox entry goes once a service has taken it, and a message a service could not take
  stays queued and is retried by the next ``send`` or ``receive``;
- receiving: the new ratchet state, the message and the keyed hash of its ciphertext are
  committed *before* the service is told to drop it (see vault.py).

The token: one ECDH per process to unlock the vault, one ECDH per relationship (X3DH),
and one root signature per address made at a receiving service (it registers the
address's holder key, kept in the vault with the address); pickups, acknowledgements and
retirements are signed by that holder key.  Nothing per message or per pickup.
"""

from __future__ import annotations

import builtins
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from agent.didcomm.errors import DIDCommError
from agent.didcomm.message import Message
from agent.edge.agent import EdgeAgent
from agent.relationships import addresses as addr
from agent.relationships import ratchet, x3dh
from agent.relationships.delivery import (
    SENDING_RESOURCE,
    SUBMIT_ACTION,
    Address,
    AddressRetiredError,
    DeliveryRefusedError,
    HeldAddress,
    ReceivingClient,
    SendingClient,
    SendingGrant,
    ServiceError,
    ServiceUnreachableError,
    UnknownPickupIdError,
    UnknownSubmissionError,
    check_service_url,
    seal_address,
)
from agent.relationships.errors import (
    DecryptError,
    DuplicateMessageError,
    MalformedMessageError,
    PrekeyConsumedError,
    RelationshipError,
    TooManySkippedError,
)
from agent.relationships.intros import IntroRecord, read_intro
from agent.relationships.invitation import DEFAULT_TTL, Invitation
from agent.relationships.prekeys import PrekeyBundle, PrekeyStore
from agent.relationships.relationship import (
    WEDGE_THRESHOLD,
    Relationship,
    check_label,
    new_id,
    safety_number,
)
from agent.relationships.suite import suite_for_key
from agent.relationships.vault import Transaction, Vault, crash_point
from janus_hsm import b64url
from janus_hsm.file_lock import locked_file
from janus_hsm.provider import KeyHandle

TEXT_TYPE: Final = "https://janus.dev/rel/1.0/text"
HELLO_TYPE: Final = "https://janus.dev/rel/1.0/hello"
#: A relationship started from a directory claims this many characters of shared id.
REQUEST_ID_CHARS: Final = 22
REESTABLISH_TYPE: Final = "https://janus.dev/rel/1.0/reestablish"
#: A batch of the data-sync layer (groups): handed to it by ``receive``, never shown or
#: stored here (the sync layer keeps what it carries, and repairs a batch lost between).
SYNC_TYPE: Final = "https://janus.dev/sync/1.0/batch"
#: An owner's device announcement (its signed device list, its devices' bundles and
#: inboxes), sent once at the start of a relationship when the owner has devices:
#: handed to the fan-out by ``receive`` (agent/sync/device_link.py), never stored here.
DEVICES_TYPE: Final = "https://janus.dev/rel/1.0/devices"
#: Messages of the relationship layer itself: acted on, not stored for the owner.
CONTROL_TYPES: Final = frozenset({HELLO_TYPE, REESTABLISH_TYPE, addr.ADDRESS_UPDATE_TYPE})
#: Re-establishment bundles serve as long as a relationship may sit idle.
REESTABLISH_TTL: Final = 365 * 86400
#: How long ``send`` waits for the sending service's first attempt before it leaves the
#: message to the service's retries.
SUBMISSION_WAIT: Final = 3.0
#: Deliveries per pickup request, and requests per address per ``receive`` (the rest
#: waits for the next one: one address cannot hold a ``receive`` up for long).
PICKUP_LIMIT: Final = 100
PICKUP_BATCHES: Final = 20
#: No automatic re-establishment more often than this per relationship.
REESTABLISH_INTERVAL: Final = 600

RELATIONSHIPS_DIR = "relationships"


class UnknownRelationshipError(RelationshipError):
    code = "unknown_relationship"
    status = 404


class RelationshipExistsError(RelationshipError):
    code = "relationship_exists"
    status = 409


class NoServiceError(RelationshipError):
    """The owner has no service of the role needed."""

    code = "no_service"
    status = 409


class RelationshipBlockedError(RelationshipError):
    code = "relationship_blocked"
    status = 409


class BadMessageInputError(RelationshipError):
    code = "bad_message_input"


@dataclass
class ReceiveReport:
    """What one ``receive`` did: messages for the owner, and what else happened."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: Sync batches (SYNC_TYPE), for the groups layer: {"name", "peer", "body"} each.
    sync: list[dict[str, Any]] = field(default_factory=list)
    #: Device announcements (DEVICES_TYPE), for the fan-out: {"name", "peer", "body"}.
    devices: list[dict[str, Any]] = field(default_factory=list)

    def event(self, kind: str, **details: Any) -> None:
        self.events.append({"event": kind, **details})

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "events": self.events, "errors": self.errors}


#: Vault records of one-time prekeys whose use is committed but whose file may remain.
USED_PREKEY: Final = "used_prekey"


def _used_prekey_key(prekey_id: str, pq: bool) -> str:
    return f"{'pqopk' if pq else 'opk'}-{prekey_id}"


class _VaultReplayGuard:
    """Initial messages already accepted, remembered in the vault with the state they
    created (one transaction), so a crash in between never loses the relationship.

    The one-time prekeys such a message used go into the same transaction, and their
    files are deleted only after it commits (``Relationships._discard_used_prekeys``):
    deleted before, a crash in between would leave a message no one can open again.
    """

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self.pending: list[bytes] = []
        self.prekeys: tuple[tuple[str, bool], ...] = ()

    def seen(self, digest: bytes) -> bool:
        return self.vault.seen(b"initial|" + digest)

    def remember(self, digest: bytes) -> None:
        self.pending.append(b"initial|" + digest)

    def use_prekeys(self, prekeys: tuple[tuple[str, bool], ...]) -> None:
        """Note the one-time prekeys a first message used (PrekeyConsumedError if a use
        of one is already committed, its file not yet deleted)."""
        for prekey_id, pq in prekeys:
            if self.vault.get(USED_PREKEY, _used_prekey_key(prekey_id, pq)) is not None:
                raise PrekeyConsumedError("the one-time prekey was already used")
        self.prekeys = prekeys

    def record_prekeys(self, tx: Transaction) -> None:
        """Commit the prekeys' use with a message that was opened but refused."""
        for prekey_id, pq in self.prekeys:
            tx.put(USED_PREKEY, _used_prekey_key(prekey_id, pq), b"")

    def record(self, tx: Transaction) -> None:
        """Commit the header's digest and the prekeys' use with an accepted message."""
        for tag in self.pending:
            tx.mark_seen(tag)
        self.record_prekeys(tx)


class Relationships:
    """The relationship layer of the edge agent in ``state_dir`` (see module docstring)."""

    def __init__(self, edge: EdgeAgent) -> None:
        self.edge = edge
        self.directory = edge.config.state_dir / RELATIONSHIPS_DIR
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._vault: Vault | None = None
        self._suite = suite_for_key(edge.agreement)
        self.prekeys = PrekeyStore(self.directory / "prekeys", self._suite)

    @classmethod
    def open(
        cls, state_dir: Path, *, on_touch: Callable[[str], None] | None = None
    ) -> Relationships:
        return cls(EdgeAgent.open(state_dir, on_touch=on_touch))

    def close(self) -> None:
        if self._vault is not None:
            self._vault.close()
            self._vault = None

    def __enter__(self) -> Relationships:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def vault(self) -> Vault:
        if self._vault is None:  # the one token ECDH of this process, when first needed
            self._vault = Vault.open(self.directory, self.edge.agreement)
            self._discard_used_prekeys()
        return self._vault

    def _discard_used_prekeys(self) -> None:
        """Delete the one-time prekeys whose use is committed, then their records.

        Idempotent: run after every vault open, receive and accepted first message, it
        finishes what a crash between a commit and a deletion left over.
        """
        used = [key for key, _ in self.vault.all(USED_PREKEY)]
        for key in used:
            kind, _, prekey_id = key.partition("-")
            self.prekeys.discard_one_time(prekey_id, pq=kind == "pqopk")
        if used:
            with self.vault.transaction() as tx:
                for key in used:
                    tx.delete(USED_PREKEY, key)

    @contextmanager
    def _locked(self) -> Iterator[Vault]:
        with locked_file(self.directory / ".lock"):
            yield self.vault

    # --- services -------------------------------------------------------------------

    def add_service(
        self,
        url: str,
        role: str,
        *,
        uses: int = 10000,
        ttl_seconds: int = 30 * 86400,
        api_token: str | None = None,
    ) -> dict[str, Any]:
        """Add a receiving service (creating the owner's intro address there) or a sending
        service (granting it ``msg/submit`` with ``uses`` within ``ttl_seconds``)."""
        url = check_service_url(url)
        if role not in ("receiving", "sending"):
            raise RelationshipError("a service's role is receiving or sending")
        with self._locked() as vault:
            if vault.get("service", f"{role}|{url}") is not None:
                raise RelationshipExistsError(f"{url} is already a {role} service of this owner")
            record: dict[str, Any] = {"url": url, "role": role, "added": int(time.time())}
            if role == "receiving":
                client = ReceivingClient(url)
                try:
                    client.service_keys()
                    held = client.create_address(self.edge.root)
                finally:
                    client.close()
                record.update(did=client.did, intro=held.to_dict())
            else:
                from policies.abilities import Ability

                granted = self.edge.grant(
                    url,
                    [Ability(SENDING_RESOURCE, SUBMIT_ACTION)],
                    ttl_seconds=ttl_seconds,
                    uses=uses,
                )
                record.update(
                    grant_id=granted["grant_id"],
                    expires=granted["expires"],
                    uses=uses,
                    api_token=api_token,
                )
            with vault.transaction() as tx:
                tx.put("service", f"{role}|{url}", json.dumps(record).encode())
        return _public_service(record)

    def services(self) -> list[dict[str, Any]]:
        with self._locked() as vault:
            return [_public_service(json.loads(d)) for _, d in vault.all("service")]

    def _services(self, role: str) -> list[dict[str, Any]]:
        found = [json.loads(d) for _, d in self.vault.all("service")]
        return [s for s in found if s["role"] == role]

    def _receiving(self) -> dict[str, Any]:
        receiving = self._services("receiving")
        if not receiving:
            raise NoServiceError(
                "this owner has no receiving service: add one with "
                "`janus edge service add URL --role receiving`"
            )
        return receiving[0]

    def _new_address(self) -> HeldAddress:
        service = self._receiving()
        client = ReceivingClient(service["url"], did=service.get("did"))
        try:
            return client.create_address(self.edge.root)
        finally:
            client.close()

    # --- relationships: reading ------------------------------------------------------

    def _all(self) -> list[Relationship]:
        return [Relationship.from_bytes(d) for _, d in self.vault.all("relationship")]

    def _find(self, label: str) -> Relationship:
        for rel in self._all():
            if rel.label == label:
                return rel
        raise UnknownRelationshipError(f"no relationship named {label!r}: see `janus rel list`")

    def _label_free(self, label: str) -> None:
        check_label(label)
        taken = {r.label for r in self._all()} | {
            json.loads(d)["label"] for _, d in self.vault.all("invitation")
        }
        if label in taken:
            raise RelationshipExistsError(
                f"the name {label!r} is taken: pick another (see `janus rel list`)"
            )

    def show(self, label: str) -> dict[str, Any]:
        with self._locked():
            rel = self._find(label)
            own_jwk = dict(self.edge.agreement.jwk())
            shown = rel.summary()
            shown["safety_number"] = safety_number(
                self.edge.did, own_jwk, rel.peer_did, rel.peer_agreement
            )
            shown["messages"] = [json.loads(m.data) for m in self.vault.messages(rel.id)][-20:]
            shown["rotation"] = rel.addresses.policy.to_dict()
            # Ids and services only: a credential is never shown.
            shown["addresses"] = {
                "own": [
                    {"id": a.address_id, "state": a.state, "service": a.held.address.service}
                    for a in rel.addresses.own
                ],
                "peer": [
                    {"id": p.address.address_id, "state": p.state, "service": p.address.service}
                    for p in rel.addresses.peer
                ],
            }
            return shown

    def messages(self, label: str | None = None) -> list[dict[str, Any]]:
        with self._locked() as vault:
            rel = None if label is None else self._find(label)
            names = {r.id: r.label for r in self._all()}
            return [
                {"name": names.get(m.relationship), "seq": m.seq, "message": json.loads(m.data)}
                for m in vault.messages(None if rel is None else rel.id)
            ]

    # --- invitations --------------------------------------------------------------------

    def invite(self, label: str, *, ttl_seconds: int = DEFAULT_TTL) -> Invitation:
        """An invitation for one person: fresh signed prekeys (no one-time ones: the
        invitation is single-use and its prekeys are dropped once it is), the intro
        address of the owner's receiving service, an expiry."""
        if not 60 <= ttl_seconds <= 90 * 86400:
            raise RelationshipError("an invitation lasts between a minute and 90 days")
        with self._locked() as vault:
            self._label_free(label)
            service = self._receiving()
            intro = HeldAddress.from_dict(service["intro"])
            bundle = self.prekeys.publish(
                self.edge.root, self.edge.agreement, one_time=0, one_time_pq=0, ttl=ttl_seconds
            )
            invitation = Invitation.create(
                self.edge.root,
                invitation_id=new_id(),
                bundle=bundle,
                address=intro.address,
                expires=bundle.expires,
            )
            record = {
                "label": label,
                "expires": invitation.expires,
                "prekeys": [bundle.signed_prekey_id, bundle.pq_prekey_id],
                "created": int(time.time()),
            }
            with vault.transaction() as tx:
                tx.put("invitation", invitation.id, json.dumps(record).encode())
            return invitation

    def accept(self, invitation: Invitation, label: str) -> dict[str, Any]:
        """Start the relationship an invitation offers: X3DH now (one token ECDH), and a
        first message (our address, our re-establishment keys) to the inviter's address."""
        if invitation.inviter == self.edge.did:
            raise RelationshipError("this invitation is your own: give it to the other person")
        with self._locked() as vault:
            self._label_free(label)
            for rel in self._all():
                if rel.shared_id == invitation.id:
                    raise RelationshipExistsError(
                        f"this invitation was already accepted (as {rel.label!r})"
                    )
            held = self._new_address()
            own_bundle = self._reestablish_bundle()
            keys, _ = x3dh.initiate(
                self.edge.agreement, self.edge.did, own_bundle, invitation.bundle
            )
            state = ratchet.RatchetState.initiator(keys)
            book = addr.AddressBook()
            book.set_peer(invitation.address)
            book.start(held)
            rel = Relationship(
                id=new_id(),
                label=label,
                shared_id=invitation.id,
                role="accepter",
                peer_did=invitation.inviter,
                peer_agreement=dict(invitation.bundle.identity_jwk),
                suite=str(self._suite),
                ratchet=b"",
                addresses=book,
                created=int(time.time()),
                peer_bundle=invitation.bundle.to_dict(),
                own_prekeys=(own_bundle.signed_prekey_id, own_bundle.pq_prekey_id),
            )
            hello = Message.new(
                HELLO_TYPE,
                {"invitation": invitation.id, "bundle": own_bundle.to_dict(), "epoch": 0},
            )
            update = book.outgoing()
            plaintext = addr.attach(hello, update).to_json().encode()
            wire = ratchet.first_message(keys, state, plaintext)
            rel.ratchet = state.to_bytes()
            book.sent(update)
            rel.sent += 1
            with vault.transaction() as tx:
                tx.put("relationship", rel.id, rel.to_bytes())
                tx.queue(new_id(), rel.id, _outbox_entry(wire))
            crash_point("accept:committed")
            problems = self._flush(rel.id)
        result = {"name": label, "peer": rel.peer_did, "state": "active"}
        if problems:
            raise problems[0]
        return result

    def request(
        self,
        label: str,
        bundle: PrekeyBundle,
        *,
        name: str,
        directory: str,
        deliver: Callable[[bytes], None],
    ) -> dict[str, Any]:
        """Start a relationship from a package claimed at a directory, no invitation:
        X3DH to the claimed bundle (one token ECDH), and a first message (our address,
        our re-establishment keys) that ``deliver`` hands straight to the owner's intro
        address with the directory's contact capability (a sending service forwards no
        capability, so this one message never goes through it).

        The state is committed before the message leaves; if it cannot be delivered,
        the relationship is dropped again (the claimed prekey is spent: claim anew).
        """
        if bundle.root_did == self.edge.did:
            raise RelationshipError(f"{name} is your own name: give it to the other person")
        with self._locked() as vault:
            self._label_free(label)
            held = self._new_address()
            own_bundle = self._reestablish_bundle()
            keys, _ = x3dh.initiate(self.edge.agreement, self.edge.did, own_bundle, bundle)
            state = ratchet.RatchetState.initiator(keys)
            book = addr.AddressBook()
            # No peer address yet: the intro address takes first contact only; the
            # owner's answer brings the address to use.
            book.start(held)
            # Kept for re-establishment: its signed prekeys only (the one-time pair is spent).
            kept = replace(bundle, one_time_prekeys=(), one_time_pq_prekeys=(), batch_proof=None)
            rel = Relationship(
                id=new_id(),
                label=label,
                shared_id=b64url.encode(secrets.token_bytes(16)),
                role="accepter",
                peer_did=bundle.root_did,
                peer_agreement=dict(bundle.identity_jwk),
                suite=str(self._suite),
                ratchet=b"",
                addresses=book,
                created=int(time.time()),
                peer_bundle=kept.to_dict(),
                own_prekeys=(own_bundle.signed_prekey_id, own_bundle.pq_prekey_id),
            )
            hello = Message.new(
                HELLO_TYPE,
                {
                    "request": rel.shared_id,
                    "to": name,
                    "directory": directory,
                    "bundle": own_bundle.to_dict(),
                    "epoch": 0,
                },
            )
            update = book.outgoing()
            wire = ratchet.first_message(keys, state, addr.attach(hello, update).to_json().encode())
            rel.ratchet = state.to_bytes()
            book.sent(update)
            rel.sent += 1
            with vault.transaction() as tx:
                tx.put("relationship", rel.id, rel.to_bytes())
            try:
                deliver(wire)
            except Exception:
                with vault.transaction() as tx:
                    tx.drop_relationship(rel.id)
                    tx.delete("relationship", rel.id)
                self.prekeys.drop_signed_prekeys(
                    own_bundle.signed_prekey_id, own_bundle.pq_prekey_id
                )
                with suppress(RelationshipError):  # unused: its service forgets it in time
                    self._retire(held)
                raise
        return {"name": label, "peer": rel.peer_did, "to": name, "state": "active"}

    def _reestablish_bundle(self) -> PrekeyBundle:
        return self.prekeys.publish(
            self.edge.root, self.edge.agreement, one_time=0, one_time_pq=0, ttl=REESTABLISH_TTL
        )

    # --- sending ------------------------------------------------------------------------

    def send(
        self, label: str, message: Message | None = None, *, text: str | None = None
    ) -> dict[str, Any]:
        """Encrypt and send one DIDComm message (or a text) to the peer."""
        if (message is None) == (text is None):
            raise BadMessageInputError("give a message or a text")
        if message is None:
            assert text is not None
            message = Message.new(TEXT_TYPE, {"text": text})
        with self._locked():
            rel = self._find(label)
            self._check_sendable(rel)
            if rel.addresses.should_rotate():
                self._start_rotation(rel)
            self._commit_outgoing(rel, message)
            crash_point("send:committed")
            problems = self._flush(rel.id)
        if problems:
            raise problems[0]
        return {"name": label, "id": message.id, "queued": False}

    def _check_sendable(self, rel: Relationship) -> None:
        if rel.state == "blocked":
            raise RelationshipBlockedError(f"{rel.label!r} is blocked: nothing is sent to it")

    def _commit_outgoing(self, rel: Relationship, message: Message) -> None:
        """Encrypt ``message`` (with any address update due) and commit the advanced state
        and the ciphertext together, before anything is sent."""
        update = rel.addresses.outgoing()
        plaintext = addr.attach(message, update).to_json().encode()
        state = ratchet.RatchetState.from_bytes(rel.ratchet)
        wire = state.encrypt(plaintext)
        rel.ratchet = state.to_bytes()
        rel.addresses.sent(update)
        rel.sent += 1
        with self.vault.transaction() as tx:
            tx.put("relationship", rel.id, rel.to_bytes())
            tx.queue(new_id(), rel.id, _outbox_entry(wire))

    def _flush(self, only: str | None = None) -> list[RelationshipError]:
        """Hand queued messages to a service; what could not go stays queued.  Returns
        one error per relationship whose messages are still waiting (its own code, and a
        message that says the message is kept).

        A message given to a sending service stays in the outbox, with its submission
        id, until that service reports it delivered: if the receiving service refused
        it (the address was retired), it goes again to the peer's next address.
        """
        problems: dict[str, RelationshipError] = {}
        for item_id, rel_id, data in self.vault.outbox(only):
            if rel_id in problems:
                continue  # keep a relationship's messages in order
            raw = self.vault.get("relationship", rel_id)
            rel = None if raw is None else Relationship.from_bytes(raw)
            if rel is None or rel.state == "blocked":
                with self.vault.transaction() as tx:
                    tx.unqueue(item_id)
                continue
            entry = json.loads(data)
            try:
                done = self._deliver(rel, entry)
            except RelationshipError as exc:
                kept = type(exc)(f"{exc} (the message to {rel.label!r} is still queued)")
                kept.code, kept.status = exc.code, exc.status
                problems[rel_id] = kept
                done = False
            crash_point("send:delivered")
            with self.vault.transaction() as tx:
                tx.unqueue(item_id)
                if not done:
                    tx.queue(item_id, rel_id, json.dumps(entry).encode(), created=entry["created"])
        return list(problems.values())

    def _deliver(self, rel: Relationship, entry: dict[str, Any]) -> bool:
        """Move one outbox entry on; True once a receiving service holds it.  ``entry`` is
        updated in place (submission, addresses that refused it)."""
        wire = b64url.decode(entry["wire"])
        refused: list[str] = entry.setdefault("refused", [])
        submission = entry.get("submission")
        if submission is not None:
            state, error = self._submission_state(submission)
            if state == "delivered":
                return True
            if state == "queued":
                return False  # the sending service holds it and keeps trying
            entry["submission"] = None
            if error in (AddressRetiredError.code, DeliveryRefusedError.code):
                refused.append(submission["target"])
        targets = [t for t in rel.addresses.peer_targets() if t.address_id not in refused]
        if not rel.addresses.peer:
            raise addr.NoPeerAddressError(
                f"no address of {rel.label!r} is known: ask them for a new invitation"
            )
        unreachable: str | None = None
        for target in targets:
            try:
                entry["submission"] = self._deliver_to(target, wire)
            except (AddressRetiredError, DeliveryRefusedError):
                refused.append(target.address_id)
                continue
            except ServiceError as exc:
                unreachable = str(exc)
                continue
            if entry["submission"] is None:
                return True
            state, error = self._wait_submission(entry["submission"])
            if state == "delivered":
                return True
            if state == "queued":
                return False
            entry["submission"] = None
            if error in (AddressRetiredError.code, DeliveryRefusedError.code):
                refused.append(target.address_id)
        if unreachable is not None:
            raise ServiceUnreachableError(
                f"{unreachable}; run `janus rel send` or `janus rel receive` later to retry"
            )
        # Every address refused it: they may come back with a new one (the message
        # then goes there); the refusals are forgotten so the next try asks again.
        entry["refused"] = []
        raise addr.PeerAddressRetiredError(
            f"every address of {rel.label!r} was retired at its service (they rotated "
            "away or blocked you): run `janus rel receive` to learn a new one, or ask "
            "them for a new invitation"
        )

    def _deliver_to(self, target: Address, wire: bytes) -> dict[str, str] | None:
        """Deliver directly (None), or submit to the owner's sending service (the
        submission to follow)."""
        sending = self._services("sending")
        receiving = ReceivingClient(target.service)
        try:
            if not sending:
                receiving.deliver(target, wire)
                return None
            sealed = seal_address(receiving.service_key(), target, wire)
        finally:
            receiving.close()
        # Any of the owner's sending services will do: one is picked at random (so no
        # service sees all of a relationship's traffic) and the next one is tried when
        # it cannot be reached.
        last: ServiceUnreachableError | None = None
        for service in secrets.SystemRandom().sample(sending, len(sending)):
            client = SendingClient(
                service["url"], SendingGrant(service["grant_id"], service.get("api_token"))
            )
            try:
                submission = client.submit(target.service, sealed, wire)
            except ServiceUnreachableError as exc:
                last = exc
                continue
            finally:
                client.close()
            return {"service": service["url"], "id": submission, "target": target.address_id}
        assert last is not None
        raise last

    def _submission_state(self, submission: dict[str, str]) -> tuple[str, str | None]:
        """(queued | delivered | failed | unknown, error code) of a submission."""
        service = next(
            (s for s in self._services("sending") if s["url"] == submission["service"]), None
        )
        if service is None:
            return "unknown", None
        client = SendingClient(service["url"], SendingGrant(service["grant_id"]))
        try:
            status = client.status(submission["id"])
        except UnknownSubmissionError:
            # Long done and forgotten there: sending again is safe (the peer
            # recognises a ciphertext it already has).
            return "unknown", None
        except ServiceError:
            return "queued", None  # cannot tell now: ask again next time
        finally:
            client.close()
        state = str(status.get("state"))
        error = status.get("last_error")
        return state, error if isinstance(error, str) else None

    def _wait_submission(self, submission: dict[str, str]) -> tuple[str, str | None]:
        """A submission's state once the sending service tried it (a moment on a healthy
        network), so a refusal is reported to the sender, not only logged."""
        deadline = time.monotonic() + SUBMISSION_WAIT
        while True:
            state, error = self._submission_state(submission)
            if state != "queued" or time.monotonic() >= deadline:
                return state, error
            time.sleep(0.05)

    # --- receiving ----------------------------------------------------------------------

    def receive(self) -> ReceiveReport:
        """Pick up from every address, decrypt, store, acknowledge; then finish what the
        messages asked for (confirm and retire addresses, re-establish wedged sessions)
        and retry queued messages."""
        report = ReceiveReport()
        with self._locked():
            self._discard_used_prekeys()
            for service in self._services("receiving"):
                self._pickup(HeldAddress.from_dict(service["intro"]), None, report)
            for intro in self._directory_intros(report):
                self._pickup(intro.held, None, report)
            for rel in self._all():
                if rel.state != "active":
                    continue
                for own in rel.addresses.pickup_addresses():
                    self._pickup(own.held, rel.id, report)
            self._after_receive(report)
            for problem in self._flush():
                report.errors.append({"code": problem.code, "message": str(problem)})
        return report

    def _pickup(self, held: HeldAddress, rel_id: str | None, report: ReceiveReport) -> None:
        """Everything held at one address, in batches: each batch is committed message by
        message, then acknowledged (a crash in between: picked up again, recognised)."""
        client = ReceivingClient(held.address.service)
        try:
            for _ in range(PICKUP_BATCHES):
                try:
                    deliveries = client.pickup(self._signer(held), held, limit=PICKUP_LIMIT)
                except (ServiceError, UnknownPickupIdError) as exc:
                    report.errors.append(
                        {"code": exc.code, "message": f"{held.address.service}: {exc}"}
                    )
                    return
                done: list[str] = []
                for delivery in deliveries:
                    if not self.vault.seen(delivery.ciphertext):
                        self._take(delivery.ciphertext, held, rel_id, report)
                    crash_point("receive:committed")
                    done.append(delivery.id)
                if done:
                    client.ack(self._signer(held), held, done)
                    crash_point("receive:acked")
                if len(deliveries) < PICKUP_LIMIT:
                    return
        finally:
            client.close()

    def _take(
        self, wire: bytes, held: HeldAddress, rel_id: str | None, report: ReceiveReport
    ) -> None:
        """One new delivery: whatever it turns out to be, its outcome and its hash are
        committed together (a message that fails to open is remembered as failed)."""
        if len(wire) >= 2 and wire[1] == x3dh.KIND_INITIAL:
            self._take_initial(wire, held, report)
            crash_point("receive:initial-committed")
            self._discard_used_prekeys()
            return
        candidates = [r for r in self._all() if r.state == "active"]
        if rel_id is not None:
            candidates = [r for r in candidates if r.id == rel_id]
        malformed = True
        for rel in candidates:
            try:
                new_state, plaintext = ratchet.RatchetState.from_bytes(rel.ratchet).decrypt(wire)
            except DuplicateMessageError:
                # Not the same bytes (those were recognised before): another message
                # under a used key, i.e. the peer's state is older than ours.
                self._failed(rel, wire, report, strong=True)
                return
            except MalformedMessageError:
                continue  # not even of the layout: says nothing about the session
            except (DecryptError, TooManySkippedError, RelationshipError):
                malformed = False
                continue
            self._accept_message(rel, new_state.to_bytes(), plaintext, held, report, wire)
            return
        owner = candidates[0] if rel_id is not None and candidates else None
        if owner is not None and not malformed:
            self._failed(owner, wire, report, strong=False)
            return
        with self.vault.transaction() as tx:
            tx.mark_seen(wire)
        report.errors.append(
            {"code": DecryptError.code, "message": "a message no relationship could open"}
        )

    def _failed(
        self, rel: Relationship, wire: bytes, report: ReceiveReport, *, strong: bool
    ) -> None:
        rel.failures = WEDGE_THRESHOLD if strong else rel.failures + 1
        if rel.failures >= WEDGE_THRESHOLD and not rel.wedged:
            rel.wedged = True
            report.event("wedged", name=rel.label)
        with self.vault.transaction() as tx:
            tx.put("relationship", rel.id, rel.to_bytes())
            tx.mark_seen(wire)
        report.errors.append(
            {
                "code": DecryptError.code,
                "message": f"a message for {rel.label!r} did not decrypt",
            }
        )

    def _accept_message(
        self,
        rel: Relationship,
        new_state: bytes,
        plaintext: bytes,
        held: HeldAddress,
        report: ReceiveReport,
        wire: bytes,
        *,
        replay: _VaultReplayGuard | None = None,
        extra: Callable[[Any], None] | None = None,
    ) -> None:
        rel.ratchet = new_state
        rel.failures = 0
        rel.wedged = False
        rel.reestablishing = False
        rel.received += 1
        stored: bytes | None = None
        sync: dict[str, Any] | None = None
        devices: dict[str, Any] | None = None
        try:
            message = Message.from_json(plaintext)
            update = addr.extract(message)
            if update is not None:
                rel.addresses.apply(update)
            if message.type == SYNC_TYPE:
                sync = {"name": rel.label, "peer": rel.peer_did, "body": message.body}
            elif message.type == DEVICES_TYPE:
                devices = {"name": rel.label, "peer": rel.peer_did, "body": message.body}
            elif message.type not in CONTROL_TYPES:
                stored = plaintext
            elif message.type in (HELLO_TYPE, REESTABLISH_TYPE):
                # The peer's keys for a later re-establishment, if they are its own.
                bundle = _bundle_or_none(message.body.get("bundle"))
                if bundle is not None and bundle["root_did"] == rel.peer_did:
                    rel.peer_bundle = bundle
        except (DIDCommError, RelationshipError) as exc:
            # The peer authenticated it, so its key is spent either way: keep the state.
            report.errors.append({"code": getattr(exc, "code", "bad_message"), "message": str(exc)})
            message = None
        rel.addresses.received_at(
            held.address.address_id, count=stored is not None or sync is not None
        )
        crash_point("receive:decrypted")
        with self.vault.transaction() as tx:
            tx.put("relationship", rel.id, rel.to_bytes())
            if stored is not None:
                tx.add_message(rel.id, stored)
            tx.mark_seen(wire)
            if replay is not None:
                replay.record(tx)
            if extra is not None:
                extra(tx)
        if stored is not None and message is not None:
            report.messages.append({"name": rel.label, "message": message.to_dict()})
        if sync is not None:
            report.sync.append(sync)
        if devices is not None:
            report.devices.append(devices)

    def _take_initial(self, wire: bytes, held: HeldAddress, report: ReceiveReport) -> None:
        guard = _VaultReplayGuard(self.vault)
        try:
            # The one-time prekeys are deleted only once their use is committed, with
            # the outcome of this message (below, in the same transaction), then after.
            first = ratchet.open_first_message(
                self.edge.agreement, self.prekeys, wire, replay_guard=guard, consume=False
            )
            guard.use_prekeys(first.keys.one_time_unconsumed)
            hello = Message.from_json(first.plaintext)
        except (RelationshipError, DIDCommError) as exc:
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
            report.errors.append({"code": getattr(exc, "code", "error"), "message": str(exc)})
            return
        peer = first.peer
        body = dict(hello.body)
        blocked = [r for r in self._all() if r.peer_did == peer.root_did and r.state == "blocked"]
        if blocked:
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
            report.event("refused", reason="blocked", name=blocked[0].label)
            return
        if hello.type == REESTABLISH_TYPE:
            self._take_reestablish(first, body, wire, held, guard, report)
            return
        found = body.get("invitation")
        if hello.type == HELLO_TYPE and found is None:
            intro = self._directory_intro(held)
            if intro is not None:
                self._take_request(first, body, wire, held, intro, guard, report)
                return
        invitation_id = found if isinstance(found, str) else ""
        raw = self.vault.get("invitation", invitation_id) if invitation_id else None
        if hello.type != HELLO_TYPE or raw is None:
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
            report.errors.append(
                {"code": "unknown_invitation", "message": "a first message for no open invitation"}
            )
            return
        record = json.loads(raw)
        if record["expires"] <= int(time.time()):
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
                tx.delete("invitation", invitation_id)
            report.errors.append(
                {
                    "code": "invitation_expired",
                    "message": f"{record['label']!r} answered an expired invitation: invite again",
                }
            )
            return
        peer_bundle = _bundle_or_none(body.get("bundle"))
        rel = Relationship(
            id=new_id(),
            label=record["label"],
            shared_id=invitation_id,
            role="inviter",
            peer_did=peer.root_did,
            peer_agreement=dict(peer.identity_jwk),
            suite=str(first.keys.suite),
            ratchet=b"",
            addresses=addr.AddressBook(),
            created=int(time.time()),
            peer_bundle=peer_bundle,
        )
        # Our own address for this relationship, announced in the reply below.
        rel.addresses.start(self._new_address())
        # The intro address serves every invitation: the peer is told to forget it, so
        # that once we block it, it has no address of ours left.
        rel.addresses.to_retire.append(held.address.address_id)
        own_bundle = self._reestablish_bundle()
        rel.own_prekeys = (own_bundle.signed_prekey_id, own_bundle.pq_prekey_id)

        def finish(tx: Any) -> None:
            tx.delete("invitation", invitation_id)

        self._accept_message(
            rel, first.state.to_bytes(), first.plaintext, held, report, wire,
            replay=guard, extra=finish,
        )  # fmt: skip
        self.prekeys.drop_signed_prekeys(*record["prekeys"])
        report.event("established", name=rel.label, peer=rel.peer_did)
        # The reply: our address and re-establishment keys, the confirmation of theirs.
        reply = Message.new(HELLO_TYPE, {"bundle": own_bundle.to_dict(), "epoch": rel.epoch})
        self._commit_outgoing(rel, reply)

    def _directory_intros(self, report: ReceiveReport | None = None) -> list[IntroRecord]:
        """The intro addresses ``janus dir publish`` made (a damaged record is reported
        and skipped: the others still serve)."""
        found = []
        folder = self.edge.config.state_dir / "directory"
        for path in sorted(folder.glob("intro-*.json")):
            try:
                found.append(read_intro(path))
            except RelationshipError as exc:
                if report is not None:
                    report.errors.append({"code": exc.code, "message": str(exc)})
        return found

    def _directory_intro(self, held: HeldAddress) -> IntroRecord | None:
        for intro in self._directory_intros():
            if intro.held.address.address_id == held.address.address_id:
                return intro
        return None

    def _request_label(self, peer_did: str) -> str:
        """A free name for a relationship someone requested: from their root did (a name
        they give themselves proves nothing); ``janus rel show`` gives the safety number."""
        base = "from " + peer_did.removeprefix("did:key:")[-12:]
        taken = {r.label for r in self._all()} | {
            json.loads(d)["label"] for _, d in self.vault.all("invitation")
        }
        label, n = base, 1
        while label in taken:
            n += 1
            label = f"{base} {n}"
        return label

    def _take_request(
        self,
        first: ratchet.FirstMessage,
        body: dict[str, Any],
        wire: bytes,
        held: HeldAddress,
        intro: IntroRecord,
        guard: _VaultReplayGuard,
        report: ReceiveReport,
    ) -> None:
        """A first message at a directory intro address: a relationship request from
        someone the directory let through (the receiving service checked its contact
        capability), naming no invitation."""
        shared = body.get("request")
        to = body.get("to")
        problem = None
        if not isinstance(shared, str) or len(shared) != REQUEST_ID_CHARS:
            problem = "a relationship request without a valid request id"
        elif intro.name is not None and to != intro.name:
            problem = "a relationship request for another name than this intro address's"
        elif any(r.shared_id == shared for r in self._all()):
            problem = "a relationship request that was already taken"
        if problem is not None:
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
            report.errors.append({"code": "bad_relationship_request", "message": problem})
            return
        assert isinstance(shared, str)
        peer = first.peer
        rel = Relationship(
            id=new_id(),
            label=self._request_label(peer.root_did),
            shared_id=shared,
            role="inviter",
            peer_did=peer.root_did,
            peer_agreement=dict(peer.identity_jwk),
            suite=str(first.keys.suite),
            ratchet=b"",
            addresses=addr.AddressBook(),
            created=int(time.time()),
            peer_bundle=_bundle_or_none(body.get("bundle")),
        )
        rel.addresses.start(self._new_address())
        # The intro address serves everyone the directory lets through: the peer is told
        # to forget it (it only ever takes first contact anyway).
        rel.addresses.to_retire.append(held.address.address_id)
        own_bundle = self._reestablish_bundle()
        rel.own_prekeys = (own_bundle.signed_prekey_id, own_bundle.pq_prekey_id)
        self._accept_message(
            rel, first.state.to_bytes(), first.plaintext, held, report, wire, replay=guard
        )
        report.event("requested", name=rel.label, peer=rel.peer_did, to=intro.name)
        reply = Message.new(HELLO_TYPE, {"bundle": own_bundle.to_dict(), "epoch": rel.epoch})
        self._commit_outgoing(rel, reply)

    def _take_reestablish(
        self,
        first: ratchet.FirstMessage,
        body: dict[str, Any],
        wire: bytes,
        held: HeldAddress,
        guard: _VaultReplayGuard,
        report: ReceiveReport,
    ) -> None:
        """A new session for an existing relationship, from the same identity."""
        shared = body.get("relationship")
        matches = [
            r
            for r in self._all()
            if r.shared_id == shared and r.peer_did == first.peer.root_did and r.state == "active"
        ]
        epoch = body.get("epoch")
        if not matches or not isinstance(epoch, int) or isinstance(epoch, bool):
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
            report.errors.append(
                {
                    "code": "unknown_relationship",
                    "message": "a re-establishment for no relationship",
                }
            )
            return
        rel = matches[0]
        if rel.peer_agreement != dict(first.peer.identity_jwk):
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
            report.errors.append(
                {"code": "identity_changed", "message": f"{rel.label!r}: another agreement key"}
            )
            return
        if rel.reestablishing and self.edge.did < rel.peer_did:
            # Both sides started one at once: the smaller root did's session wins.
            with self.vault.transaction() as tx:
                tx.mark_seen(wire)
                guard.record_prekeys(tx)
            return
        rel.epoch = max(rel.epoch, epoch)
        bundle = _bundle_or_none(body.get("bundle"))
        if bundle is not None:
            rel.peer_bundle = bundle
        self._accept_message(
            rel, first.state.to_bytes(), first.plaintext, held, report, wire, replay=guard
        )
        report.event("reestablished", name=rel.label, epoch=rel.epoch, by="peer")
        # Confirm at once, so the peer's new session has a reply (and our address).
        self._commit_outgoing(rel, addr.update_message(rel.addresses.outgoing()))

    def _after_receive(self, report: ReceiveReport) -> None:
        now = int(time.time())
        for rel in self._all():
            if rel.state != "active":
                continue
            changed = False
            # Old addresses whose grace has passed: drain them once more, then retire.
            for own in rel.addresses.due_retirements(now=now):
                self._pickup(own.held, rel.id, report)
                rel = self._reload(rel)
                try:
                    self._retire(own.held)
                except ServiceError as exc:
                    report.errors.append({"code": exc.code, "message": str(exc)})
                    continue
                rel.addresses.retired(own.address_id)
                report.event("address_retired", name=rel.label)
                changed = True
            if rel.wedged and (rel.reestablished_at or 0) + REESTABLISH_INTERVAL <= now:
                self._save(rel)
                self._reestablish(rel, report)
                continue
            if rel.addresses.should_rotate(now=now):
                self._start_rotation(rel)
                report.event("rotation_started", name=rel.label, reason="policy")
                changed = True
            if changed:
                self._save(rel)
            due = rel.addresses.outgoing()
            if due.confirm or due.retire or (changed and due):
                self._commit_outgoing(self._reload(rel), addr.update_message(due))

    def _reload(self, rel: Relationship) -> Relationship:
        raw = self.vault.get("relationship", rel.id)
        assert raw is not None
        return Relationship.from_bytes(raw)

    def _save(self, rel: Relationship) -> None:
        with self.vault.transaction() as tx:
            tx.put("relationship", rel.id, rel.to_bytes())

    def _signer(self, held: HeldAddress) -> KeyHandle:
        """Who signs requests about ``held``: its holder key from the vault, or the root
        for an address made before holder keys (or by a directory's contact request)."""
        key = held.holder_key()
        return self.edge.root if key is None else key

    def _retire(self, held: HeldAddress) -> None:
        client = ReceivingClient(held.address.service)
        try:
            client.retire_address(self._signer(held), held)
        except AddressRetiredError:
            pass  # retired already (a retry after a crash): the goal is met
        finally:
            client.close()

    # --- rotation, re-establishment, blocking ---------------------------------------

    def _start_rotation(self, rel: Relationship) -> None:
        rel.addresses.rotate(self._new_address())

    def rotate(
        self,
        label: str,
        *,
        every_messages: int | None = None,
        every_seconds: int | None = None,
        grace_seconds: int | None = None,
        reestablish: bool = False,
    ) -> dict[str, Any]:
        """Rotate now (announce a new address at once), or with policy options only, set
        when to rotate on its own; ``reestablish`` starts a new session instead."""
        with self._locked():
            rel = self._find(label)
            self._check_sendable(rel)
            policy = rel.addresses.policy
            options = (every_messages, every_seconds, grace_seconds)
            if any(v is not None and v < 0 for v in options):
                raise RelationshipError("rotation limits are zero (never) or positive")
            if reestablish:
                report = ReceiveReport()
                self._reestablish(rel, report)
                problems = self._flush(rel.id)
                if problems:
                    raise problems[0]
                return {"name": label, "reestablished": True, "epoch": rel.epoch + 1}
            if any(v is not None for v in options):
                if every_messages is not None:
                    policy.every_messages = every_messages
                if every_seconds is not None:
                    policy.every_seconds = every_seconds
                if grace_seconds is not None:
                    policy.grace_seconds = grace_seconds
                self._save(rel)
                return {"name": label, "rotation": policy.to_dict()}
            self._start_rotation(rel)
            self._commit_outgoing(rel, addr.update_message(rel.addresses.outgoing()))
            problems = self._flush(rel.id)
        if problems:
            raise problems[0]
        return {"name": label, "rotating": True}

    def _reestablish(self, rel: Relationship, report: ReceiveReport) -> None:
        """A new X3DH to the peer's stored bundle, flagged as the same relationship."""
        if rel.peer_bundle is None:
            report.errors.append(
                {
                    "code": "cannot_reestablish",
                    "message": f"{rel.label!r} sent no keys to re-establish with: invite again",
                }
            )
            return
        try:
            bundle = PrekeyBundle.from_dict(rel.peer_bundle)
        except RelationshipError as exc:
            report.errors.append({"code": exc.code, "message": f"{rel.label!r}: {exc}"})
            return
        own_bundle = self._reestablish_bundle()
        keys, _ = x3dh.initiate(self.edge.agreement, self.edge.did, own_bundle, bundle)
        state = ratchet.RatchetState.initiator(keys)
        rel.epoch += 1
        rel.wedged = False
        rel.failures = 0
        rel.reestablishing = True
        rel.reestablished_at = int(time.time())
        rel.own_prekeys = (own_bundle.signed_prekey_id, own_bundle.pq_prekey_id)
        # Re-announce where we pick up (the peer may hold an older view after a restore).
        current = rel.addresses.own_current()
        if current is not None and not rel.addresses.rotating():
            current.state = "announced"
        update = rel.addresses.outgoing()
        message = Message.new(
            REESTABLISH_TYPE,
            {"relationship": rel.shared_id, "epoch": rel.epoch, "bundle": own_bundle.to_dict()},
        )
        wire = ratchet.first_message(keys, state, addr.attach(message, update).to_json().encode())
        rel.ratchet = state.to_bytes()
        rel.addresses.sent(update)
        rel.sent += 1
        with self.vault.transaction() as tx:
            tx.drop_relationship(rel.id)  # messages under the stale session are useless
            tx.put("relationship", rel.id, rel.to_bytes())
            tx.queue(new_id(), rel.id, _outbox_entry(wire))
        report.event("reestablished", name=rel.label, epoch=rel.epoch, by="us")

    def block(self, label: str) -> dict[str, Any]:
        """Retire every address the peer knows; refuse its messages from now on."""
        with self._locked() as vault:
            rel = self._find(label)
            retired, failed = 0, []
            for own in rel.addresses.block():
                try:
                    self._retire(own.held)
                    retired += 1
                except ServiceError as exc:
                    failed.append(str(exc))
            rel.state = "blocked"
            rel.addresses.own = []
            rel.ratchet = b""
            if rel.own_prekeys is not None:  # the peer's way to re-establish: gone too
                self.prekeys.drop_signed_prekeys(*rel.own_prekeys)
                rel.own_prekeys = None
            with vault.transaction() as tx:
                tx.drop_relationship(rel.id)
                tx.put("relationship", rel.id, rel.to_bytes())
        result: dict[str, Any] = {"name": label, "state": "blocked", "retired": retired}
        if failed:
            result["not_retired"] = failed
        return result

    def list(self) -> builtins.list[dict[str, Any]]:
        with self._locked() as vault:
            listed = [r.summary() for r in self._all()]
            now = int(time.time())
            for _, data in vault.all("invitation"):
                record = json.loads(data)
                listed.append(
                    {
                        "name": record["label"],
                        "state": "invited" if record["expires"] > now else "invitation expired",
                        "expires": record["expires"],
                    }
                )
            return sorted(listed, key=lambda r: str(r["name"]))


def _outbox_entry(wire: bytes) -> bytes:
    return json.dumps({"wire": b64url.encode(wire), "created": time.time()}).encode()


def _bundle_or_none(value: object) -> dict[str, Any] | None:
    """A peer's re-establishment bundle if it verifies, else none (never fatal)."""
    try:
        return PrekeyBundle.from_dict(value).to_dict()
    except RelationshipError:
        return None


def _public_service(record: dict[str, Any]) -> dict[str, Any]:
    """A service as listed: no credentials, pickup ids or tokens."""
    shown: dict[str, Any] = {k: record[k] for k in ("url", "role", "added") if k in record}
    if record["role"] == "receiving":
        shown["did"] = record.get("did")
    else:
        shown.update(grant_id=record.get("grant_id"), expires=record.get("expires"))
    return shown
