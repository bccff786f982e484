"""Addresses that rotate: the updates peers send each other, and the overlap protocol.

An address is where a peer delivers to (a receiving service URL, an address id, a
per-address credential).  Each side keeps, inside the relationship's encrypted state,
its *own* addresses (which it picks up from) and the *peer's* (which it sends to).
Updates travel only inside the encrypted DIDComm plaintext: as the body of a message of
type :data:`ADDRESS_UPDATE_TYPE`, or as an attachment of that format on any message,
so a service never sees an address change hands.

The rotation is SimpleX's queue rotation, adapted (docs/relationships.md):

1. The owner makes a new address and *announces* it (``add`` + ``use``) in every
   message it sends until the peer confirms; it picks up from the old and the new.
2. The peer switches at once to the new address for everything it sends after, keeps
   the old one as a fallback, and says so (``confirm``) in its next message (sent at
   once, so a rotation does not wait for the conversation).
3. On the confirmation (or on the first message that arrives at the new address, which
   proves the switch) the owner *drains* the old address for a grace period, then
   retires it at its service and tells the peer (``retire``), who forgets it.

A message is never lost during a switch: until the owner retires the old address it
still picks up from it, and it retires it only after the peer has stopped using it and
the grace period (covering messages a sending service still holds, e.g. delayed ones)
has passed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agent.didcomm.message import Attachment, Message
from agent.relationships.delivery import Address, HeldAddress
from agent.relationships.errors import RelationshipError

ADDRESS_UPDATE_TYPE = "https://janus.dev/rel/1.0/address-update"
#: How many addresses one update may carry: more is not a rotation, it is a flood.
MAX_UPDATE_ADDRESSES = 8
#: The peer addresses kept per relationship (current and fallbacks).
MAX_PEER_ADDRESSES = 4

OwnState = Literal["current", "announced", "draining", "retired"]
PeerState = Literal["current", "previous"]


class BadAddressUpdateError(RelationshipError):
    """An address update that is not of the documented form."""

    code = "bad_address_update"


class PeerAddressRetiredError(RelationshipError):
    """The peer's address is gone at its service: the peer rotated away or blocked us."""

    code = "peer_address_retired"
    status = 410


class NoPeerAddressError(RelationshipError):
    """The relationship knows no address of the peer to send to."""

    code = "no_peer_address"
    status = 409


@dataclass(frozen=True)
class AddressUpdate:
    """``add`` new addresses, ``use`` one of them, ``confirm`` a peer's ``use``,
    ``retire`` addresses the sender will not pick up from any more."""

    add: tuple[Address, ...] = ()
    use: str | None = None
    confirm: tuple[str, ...] = ()
    retire: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.use or self.confirm or self.retire)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.add:
            out["add"] = [a.to_dict() for a in self.add]
        if self.use is not None:
            out["use"] = self.use
        if self.confirm:
            out["confirm"] = list(self.confirm)
        if self.retire:
            out["retire"] = list(self.retire)
        return out

    @classmethod
    def from_dict(cls, obj: object) -> AddressUpdate:
        """Strict: unknown members, wrong types, ``use`` of an address not added here or
        known already (checked by the caller), too many entries: all refused."""
        if not isinstance(obj, Mapping):
            raise BadAddressUpdateError("an address update must be a JSON object")
        unknown = set(obj) - {"add", "use", "confirm", "retire"}
        if unknown:
            raise BadAddressUpdateError(f"an address update has unknown members {sorted(unknown)}")
        add_raw = obj.get("add", [])
        if not isinstance(add_raw, list) or len(add_raw) > MAX_UPDATE_ADDRESSES:
            raise BadAddressUpdateError(
                f"address update 'add' must be a list of at most {MAX_UPDATE_ADDRESSES}"
            )
        try:
            add = tuple(Address.from_dict(a) for a in add_raw)
        except RelationshipError as exc:
            raise BadAddressUpdateError(f"address update 'add': {exc}") from None
        use = obj.get("use")
        if use is not None and (not isinstance(use, str) or not use):
            raise BadAddressUpdateError("address update 'use' must be an address id")
        return cls(
            add=add,
            use=use,
            confirm=_ids(obj, "confirm"),
            retire=_ids(obj, "retire"),
        )


def _ids(obj: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = obj.get(name, [])
    if (
        not isinstance(value, list)
        or len(value) > MAX_UPDATE_ADDRESSES
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise BadAddressUpdateError(
            f"address update '{name}' must be a list of at most {MAX_UPDATE_ADDRESSES} address ids"
        )
    return tuple(value)


def attach(message: Message, update: AddressUpdate) -> Message:
    """``message`` carrying ``update`` (as an attachment; the body is left alone)."""
    if not update:
        return message
    if message.type == ADDRESS_UPDATE_TYPE:
        return replace(message, body=update.to_dict())
    attachment = Attachment(
        data={"json": update.to_dict()}, id="address-update", format=ADDRESS_UPDATE_TYPE
    )
    return replace(message, attachments=(*(message.attachments or ()), attachment))


def extract(message: Message) -> AddressUpdate | None:
    """The address update a received message carries, if any (typed error if malformed)."""
    found: list[object] = []
    if message.type == ADDRESS_UPDATE_TYPE:
        found.append(message.body)
    for attachment in message.attachments or ():
        if attachment.format == ADDRESS_UPDATE_TYPE:
            if "json" not in attachment.data:
                raise BadAddressUpdateError("an address-update attachment must carry data.json")
            found.append(attachment.data["json"])
    if len(found) > 1:
        raise BadAddressUpdateError("a message carries more than one address update")
    return AddressUpdate.from_dict(found[0]) if found else None


def update_message(update: AddressUpdate) -> Message:
    """A message that carries only an address update (a rotation step on its own)."""
    return Message.new(ADDRESS_UPDATE_TYPE, update.to_dict())


@dataclass
class RotationPolicy:
    """When to rotate on its own: after ``every_messages`` received at the current
    address, or ``every_seconds`` after it was made (0: never); ``grace_seconds``: how
    long a replaced address is still picked up from after the peer's confirmation."""

    every_messages: int = 100
    every_seconds: int = 7 * 86400
    grace_seconds: int = 3600

    def to_dict(self) -> dict[str, int]:
        return {
            "every_messages": self.every_messages,
            "every_seconds": self.every_seconds,
            "grace_seconds": self.grace_seconds,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RotationPolicy:
        return cls(int(obj["every_messages"]), int(obj["every_seconds"]), int(obj["grace_seconds"]))


@dataclass
class OwnAddress:
    held: HeldAddress
    state: OwnState
    created: int
    received: int = 0
    retire_after: int | None = None

    @property
    def address_id(self) -> str:
        return self.held.address.address_id

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.held.to_dict(),  # the holder key too: this record lives in the vault
            "state": self.state,
            "created": self.created,
            "received": self.received,
            "retire_after": self.retire_after,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> OwnAddress:
        holder = obj.get("holder")
        held = HeldAddress(
            Address.from_dict(obj["address"]),
            str(obj["pickup_id"]),
            holder if isinstance(holder, str) else None,
        )
        return cls(
            held, obj["state"], int(obj["created"]), int(obj["received"]), obj["retire_after"]
        )


@dataclass
class PeerAddress:
    address: Address
    state: PeerState

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address.to_dict(), "state": self.state}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> PeerAddress:
        return cls(Address.from_dict(obj["address"]), obj["state"])


@dataclass
class AddressBook:
    """The addresses of one relationship, and what the next message must tell the peer."""

    own: list[OwnAddress] = field(default_factory=list)
    peer: list[PeerAddress] = field(default_factory=list)
    policy: RotationPolicy = field(default_factory=RotationPolicy)
    #: ids of the peer's addresses whose ``use`` we must confirm in our next message.
    to_confirm: list[str] = field(default_factory=list)
    #: ids of our addresses retired at the service that the peer must forget.
    to_retire: list[str] = field(default_factory=list)

    # --- our own addresses ---------------------------------------------------------

    def own_current(self) -> OwnAddress | None:
        return next((a for a in self.own if a.state == "current"), None)

    def rotating(self) -> bool:
        return any(a.state == "announced" for a in self.own)

    def pickup_addresses(self) -> list[OwnAddress]:
        """Every address still picked up from: current, announced and draining ones."""
        return [a for a in self.own if a.state != "retired"]

    def start(self, held: HeldAddress, *, now: int | None = None) -> None:
        """The relationship's first own address: announced until the peer confirms it."""
        self.own.append(OwnAddress(held, "announced", now or int(time.time())))

    def rotate(self, held: HeldAddress, *, now: int | None = None) -> None:
        """Announce ``held`` as our new address; any earlier announcement is replaced."""
        for address in self.own:
            if address.state == "announced":
                # Never confirmed: the peer may still use it; drain it like an old one.
                address.state = "draining"
                address.retire_after = (now or int(time.time())) + self.policy.grace_seconds
        self.own.append(OwnAddress(held, "announced", now or int(time.time())))

    def should_rotate(self, *, now: int | None = None) -> bool:
        """The policy's verdict: the current address has served long enough."""
        current = self.own_current()
        if current is None or self.rotating():
            return False
        now = now or int(time.time())
        policy = self.policy
        return (0 < policy.every_messages <= current.received) or (
            0 < policy.every_seconds <= now - current.created
        )

    def received_at(self, address_id: str, *, now: int | None = None, count: bool = True) -> None:
        """A message arrived at one of our addresses: count it (``count``: the owner's
        messages count towards rotation, the layer's own do not); one at an announced
        address proves the peer switched to it, as a confirmation would."""
        for address in self.own:
            if address.address_id == address_id:
                address.received += 1 if count else 0
                if address.state == "announced":
                    self._confirmed(address_id, now=now)
                return

    def due_retirements(self, *, now: int | None = None) -> list[OwnAddress]:
        """Draining addresses whose grace period has passed: drain, then retire them."""
        now = now or int(time.time())
        return [
            a
            for a in self.own
            if a.state == "draining" and a.retire_after is not None and a.retire_after <= now
        ]

    def retired(self, address_id: str) -> None:
        """``address_id`` was retired at its service: tell the peer, then forget it."""
        self.own = [a for a in self.own if a.address_id != address_id]
        if address_id not in self.to_retire:
            self.to_retire.append(address_id)

    def block(self) -> list[OwnAddress]:
        """Every address of ours the peer knows: all to be retired at their services."""
        return [a for a in self.own if a.state != "retired"]

    def _confirmed(self, address_id: str, *, now: int | None = None) -> None:
        now = now or int(time.time())
        target = next((a for a in self.own if a.address_id == address_id), None)
        if target is None or target.state != "announced":
            return  # a repeated or stale confirmation: nothing left to do
        for address in self.own:
            if address.state in ("current", "announced") and address is not target:
                address.state = "draining"
                address.retire_after = now + self.policy.grace_seconds
        target.state = "current"

    # --- the peer's addresses ------------------------------------------------------

    def peer_targets(self) -> list[Address]:
        """Where to send, in order: the peer's current address, then fallbacks."""
        ordered = sorted(self.peer, key=lambda p: p.state != "current")
        return [p.address for p in ordered]

    def set_peer(self, address: Address) -> None:
        """The peer's first address (from an invitation): current from the start."""
        self.peer = [PeerAddress(address, "current")]

    def drop_peer(self, address_id: str) -> None:
        self.peer = [p for p in self.peer if p.address.address_id != address_id]

    # --- updates -------------------------------------------------------------------

    def outgoing(self) -> AddressUpdate:
        """What our next message tells the peer (repeated until it has effect)."""
        announced = [a for a in self.own if a.state == "announced"]
        newest = announced[-1] if announced else None
        return AddressUpdate(
            add=(newest.held.address,) if newest else (),
            use=newest.address_id if newest else None,
            confirm=tuple(self.to_confirm),
            retire=tuple(self.to_retire),
        )

    def sent(self, update: AddressUpdate) -> None:
        """``update`` went out in a committed message: confirmations and retirements are
        said once (the peer repeats its ``use`` until it hears the confirmation)."""
        self.to_confirm = [c for c in self.to_confirm if c not in update.confirm]
        self.to_retire = [r for r in self.to_retire if r not in update.retire]

    def apply(self, update: AddressUpdate, *, now: int | None = None) -> None:
        """Take a peer's update into the book (after it authenticated: it is the peer's)."""
        known = {p.address.address_id: p for p in self.peer}
        added = {a.address_id: a for a in update.add}
        if update.use is not None and update.use not in known and update.use not in added:
            raise BadAddressUpdateError("an address update says to use an address it never added")
        for address_id in update.retire:
            self.drop_peer(address_id)
            known.pop(address_id, None)
        for address in update.add:
            if address.address_id not in known:
                self.peer.append(PeerAddress(address, "previous"))
        if update.use is not None:
            for peer in self.peer:
                if peer.address.address_id == update.use:
                    peer.state = "current"
                elif peer.state == "current":
                    peer.state = "previous"
            if update.use not in self.to_confirm:
                self.to_confirm.append(update.use)
        # Keep the newest few: the current one first, then the latest fallbacks.
        if len(self.peer) > MAX_PEER_ADDRESSES:
            current = [p for p in self.peer if p.state == "current"]
            others = [p for p in self.peer if p.state != "current"]
            self.peer = current + others[-(MAX_PEER_ADDRESSES - len(current)) :]
        for address_id in update.confirm:
            self._confirmed(address_id, now=now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "own": [a.to_dict() for a in self.own],
            "peer": [p.to_dict() for p in self.peer],
            "policy": self.policy.to_dict(),
            "to_confirm": list(self.to_confirm),
            "to_retire": list(self.to_retire),
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> AddressBook:
        return cls(
            own=[OwnAddress.from_dict(a) for a in obj["own"]],
            peer=[PeerAddress.from_dict(p) for p in obj["peer"]],
            policy=RotationPolicy.from_dict(obj["policy"]),
            to_confirm=[str(c) for c in obj["to_confirm"]],
            to_retire=[str(r) for r in obj["to_retire"]],
        )


def ids(addresses: Sequence[OwnAddress]) -> list[str]:
    return [a.address_id for a in addresses]
