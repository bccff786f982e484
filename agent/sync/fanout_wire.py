"""The plaintext of a device-pair message: an announcement or an owner-level message.

Every device-pair session is a relationship session (PQXDH + header-encrypted Double
Ratchet, docs/relationships-wire.md); its plaintexts are canonical JSON objects::

    {"v": 1, "kind": "announce", "list": COMPACT, "bundles": [BUNDLE, …]}
    {"v": 1, "kind": "message", "to": OWNER_DID, "type": CONTENT_TYPE, "body": JSON}

An announcement carries one owner's signed device list and bundles of its current
devices (at most one per device).  A message is addressed to an owner (``to``): on a
session with a peer's device that is the receiving device's own owner; on a session
with the sender's own other device, the peer owner the message was sent to (the copy
that keeps every device of the sender's owner in step).  Spec:
docs/devices-and-groups.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from agent.sync.device_format import MAX_DEVICES, SIGNING_ALGS, check_did
from agent.sync.fanout_errors import MalformedFanoutError
from janus_hsm.strictjson import canonical_json, loads_object

FANOUT_VERSION: Final = 1
#: A content type: a short printable string (a URI, as the relationship layer's types).
MAX_TYPE: Final = 200
_LIST_MAX: Final = 16 * 1024
_ANNOUNCE_MEMBERS: Final = frozenset({"v", "kind", "list", "bundles", "addresses"})


@dataclass(frozen=True)
class Announcement:
    list: str
    bundles: tuple[dict[str, Any], ...]
    #: Where each device takes its device-pair messages: device did -> address at its
    #: owner's receiving service (docs/relationships-wire.md, "Addresses").
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "v": FANOUT_VERSION,
            "kind": "announce",
            "list": self.list,
            "bundles": list(self.bundles),
        }
        if self.addresses:
            obj["addresses"] = dict(self.addresses)
        return canonical_json(obj)


@dataclass(frozen=True)
class OwnerMessage:
    to: str
    type: str
    body: Any

    def encode(self) -> bytes:
        return canonical_json(
            {"v": FANOUT_VERSION, "kind": "message", "to": self.to, "type": self.type,
             "body": self.body}
        )  # fmt: skip


def parse_plaintext(data: bytes) -> Announcement | OwnerMessage:
    """A decrypted plaintext, strictly: any other shape is MalformedFanoutError."""
    error = MalformedFanoutError
    obj = loads_object(data, "a device-pair message", error=error)
    if obj.get("v") != FANOUT_VERSION:
        raise error(f"a device-pair message of version {FANOUT_VERSION} is expected")
    kind = obj.get("kind")
    if kind == "announce":
        if not {"v", "kind", "list", "bundles"} <= set(obj) <= _ANNOUNCE_MEMBERS:
            raise error("an announcement has exactly v, kind, list, bundles and addresses")
        listed, bundles = obj["list"], obj["bundles"]
        if not isinstance(listed, str) or len(listed) > _LIST_MAX:
            raise error("an announcement's list is a compact JWS of at most 16 KiB")
        if not isinstance(bundles, list) or len(bundles) > MAX_DEVICES:
            raise error(f"an announcement carries at most {MAX_DEVICES} bundles")
        if not all(isinstance(b, dict) for b in bundles):
            raise error("an announcement's bundles are JSON objects")
        return Announcement(listed, tuple(bundles), _addresses(obj.get("addresses", {})))
    if kind == "message":
        if set(obj) != {"v", "kind", "to", "type", "body"}:
            raise error("a message has exactly v, kind, to, type and body")
        to = check_did(obj["to"], "a message's owner", SIGNING_ALGS, error)
        content_type = obj["type"]
        if not isinstance(content_type, str) or not 0 < len(content_type) <= MAX_TYPE:
            raise error(f"a message's type is a string of 1-{MAX_TYPE} characters")
        return OwnerMessage(to, content_type, obj["body"])
    raise error("a device-pair message is an announcement or a message")


def _addresses(value: object) -> dict[str, dict[str, str]]:
    """An announcement's device addresses, each checked as a relationship address is."""
    from agent.relationships.delivery import Address
    from agent.relationships.errors import RelationshipError

    error = MalformedFanoutError
    if not isinstance(value, dict) or len(value) > MAX_DEVICES:
        raise error(f"an announcement names the addresses of at most {MAX_DEVICES} devices")
    out: dict[str, dict[str, str]] = {}
    for did, raw in value.items():
        check_did(did, "an address's device", SIGNING_ALGS, error)
        try:
            out[did] = Address.from_dict(raw).to_dict()
        except RelationshipError:
            raise error("an announced device address is malformed") from None
    return out
