"""One relationship as the vault keeps it: who the peer is, the session, the addresses.

A record is JSON inside the vault (sealed there); it is read back only from the vault,
whose records authenticate, so its parser checks structure, not intent.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.relationships.addresses import AddressBook
from agent.relationships.errors import BadStateError, RelationshipError
from janus_hsm import b64url

RecordState = Literal["active", "blocked"]

#: A label names a relationship on the command line: short, printable, no path tricks.
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@+-]{0,63}")

#: Consecutive messages that fail to decrypt at this relationship's own addresses
#: before its session is taken as wedged (a stale or lost state on one side).
WEDGE_THRESHOLD = 3


class BadLabelError(RelationshipError):
    code = "bad_relationship_label"


def check_label(label: object) -> str:
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise BadLabelError(
            "a relationship name is 1-64 characters: letters, digits, space and . _ @ + -, "
            "starting with a letter or digit"
        )
    return label


def new_id() -> str:
    return secrets.token_urlsafe(16)


@dataclass
class Relationship:
    id: str
    label: str
    #: Shared by both sides: the invitation's id; names the relationship in a
    #: re-establishment so the peer knows which one is meant.
    shared_id: str
    role: Literal["inviter", "accepter"]
    peer_did: str
    peer_agreement: dict[str, str]
    suite: str
    ratchet: bytes
    addresses: AddressBook
    created: int
    state: RecordState = "active"
    #: The peer's prekey bundle for re-establishment (dict form), if it sent one.
    peer_bundle: dict[str, Any] | None = None
    #: Our own re-establishment bundle's signed prekey ids (kept while the relationship lives).
    own_prekeys: tuple[str, str] | None = None
    epoch: int = 0
    sent: int = 0
    received: int = 0
    failures: int = 0
    wedged: bool = False
    #: When we last started a re-establishment (rate-limits automatic ones).
    reestablished_at: int | None = None
    #: True from our re-establishment until a message of the new session arrives.
    reestablishing: bool = False
    notes: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "id": self.id,
                "label": self.label,
                "shared_id": self.shared_id,
                "role": self.role,
                "peer_did": self.peer_did,
                "peer_agreement": self.peer_agreement,
                "suite": self.suite,
                "ratchet": b64url.encode(self.ratchet),
                "addresses": self.addresses.to_dict(),
                "created": self.created,
                "state": self.state,
                "peer_bundle": self.peer_bundle,
                "own_prekeys": list(self.own_prekeys) if self.own_prekeys else None,
                "epoch": self.epoch,
                "sent": self.sent,
                "received": self.received,
                "failures": self.failures,
                "wedged": self.wedged,
                "reestablished_at": self.reestablished_at,
                "reestablishing": self.reestablishing,
                "notes": self.notes[-20:],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Relationship:
        try:
            d = json.loads(data)
            if d.get("v") != 1:
                raise BadStateError("a relationship record of an unknown version")
            own = d["own_prekeys"]
            return cls(
                id=str(d["id"]),
                label=str(d["label"]),
                shared_id=str(d["shared_id"]),
                role=d["role"],
                peer_did=str(d["peer_did"]),
                peer_agreement=dict(d["peer_agreement"]),
                suite=str(d["suite"]),
                ratchet=b64url.decode(d["ratchet"]),
                addresses=AddressBook.from_dict(d["addresses"]),
                created=int(d["created"]),
                state=d["state"],
                peer_bundle=d["peer_bundle"],
                own_prekeys=(str(own[0]), str(own[1])) if own else None,
                epoch=int(d["epoch"]),
                sent=int(d["sent"]),
                received=int(d["received"]),
                failures=int(d["failures"]),
                wedged=bool(d["wedged"]),
                reestablished_at=d["reestablished_at"],
                reestablishing=bool(d["reestablishing"]),
                notes=[str(n) for n in d["notes"]],
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BadStateError(f"a relationship record is damaged: {type(exc).__name__}") from None

    def summary(self) -> dict[str, Any]:
        own = self.addresses.own_current()
        return {
            "name": self.label,
            "peer": self.peer_did,
            "state": "wedged" if self.wedged and self.state == "active" else self.state,
            "created": self.created,
            "sent": self.sent,
            "received": self.received,
            "epoch": self.epoch,
            "rotating": self.addresses.rotating(),
            "own_addresses": len(self.addresses.pickup_addresses()),
            "peer_addresses": len(self.addresses.peer),
            "current_address_service": own.held.address.service if own else None,
        }


def safety_number(
    did_a: str, agreement_a: dict[str, str], did_b: str, agreement_b: dict[str, str]
) -> str:
    """60 digits both sides compute alike, to compare in person (as Signal's are).

    Each side's half is a hash of its root did:key and its agreement key; the halves
    are ordered so both sides print the same number.
    """
    halves = sorted(
        _half(did, agreement) for did, agreement in ((did_a, agreement_a), (did_b, agreement_b))
    )
    digits = "".join(halves)
    return " ".join(digits[i : i + 5] for i in range(0, len(digits), 5))


def _half(did: str, agreement: dict[str, str]) -> str:
    data = (
        b"janus safety number v1|"
        + did.encode()
        + b"|"
        + json.dumps(agreement, sort_keys=True).encode()
    )
    digest = data
    # Iterated like Signal's fingerprints, so a chosen key matching a victim's digits
    # costs many hashes per try.
    for _ in range(5200):
        digest = hashlib.sha512(digest + data).digest()
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5)
    )
