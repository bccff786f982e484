"""Group membership as records in the group's own log, and the rule that folds them.

A group is a sync conversation.  Its membership changes are sync messages of their own
content types, signed like any other, and the membership is a *fold* over them:

- ``janus.group/create`` ``{"name", "members": [root did:key, …]}`` — no parents; the
  creator and the listed owners are members;
- ``janus.group/add`` ``{"member": did}`` and ``janus.group/remove`` ``{"member": did}``.

Only the creator changes membership (the ``admit`` rule refuses any other author, and
the creator's own removal), so the one thing left to resolve is concurrent changes of
the creator's own devices: the fold applies the records in the log's *history order*
(depth, timestamp, id), which every member that holds the same messages computes
alike.  The membership a message was written under is the fold over the records among
its causal ancestors: fixed once the message is delivered (its ancestors are), and the
same on every member.  Bodies are canonical JSON, so one change has one encoding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from agent.sync.group_errors import MalformedGroupRecordError
from janus_hsm.errors import JanusHSMError
from janus_hsm.public_keys import algorithm_of, from_did_key
from janus_hsm.strictjson import canonical_json

CREATE_TYPE: Final = "janus.group/create"
ADD_TYPE: Final = "janus.group/add"
REMOVE_TYPE: Final = "janus.group/remove"
OP_TYPES: Final = frozenset({CREATE_TYPE, ADD_TYPE, REMOVE_TYPE})
TEXT_TYPE: Final = "text/plain"
DATA_TYPE: Final = "application/octet-stream"
CONTENT_TYPES: Final = frozenset({TEXT_TYPE, DATA_TYPE})
#: Members a group lists at once (each member's batches cost one relationship message).
MAX_MEMBERS: Final = 64
MAX_NAME: Final = 64

OpKind = Literal["create", "add", "remove"]
_KINDS: Final[dict[str, OpKind]] = {CREATE_TYPE: "create", ADD_TYPE: "add", REMOVE_TYPE: "remove"}


@dataclass(frozen=True)
class Op:
    """One membership change."""

    kind: OpKind
    members: tuple[str, ...]
    name: str | None = None


def op_message(op: Op) -> tuple[str, bytes]:
    """(content type, body) of a membership change."""
    if op.kind == "create":
        body: dict[str, object] = {"name": op.name, "members": sorted(op.members)}
        return CREATE_TYPE, canonical_json(body)
    (member,) = op.members
    return (ADD_TYPE if op.kind == "add" else REMOVE_TYPE), canonical_json({"member": member})


def _did(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("did:key:") or len(value) > 128:
        raise MalformedGroupRecordError("a member is named by its root did:key")
    try:
        algorithm = algorithm_of(from_did_key(value))
    except JanusHSMError:
        raise MalformedGroupRecordError("a member is named by a did:key Janus supports") from None
    if not algorithm.can_sign:
        raise MalformedGroupRecordError("a member's root did:key is a signing key")
    return value


def parse_op(content_type: str, body: bytes, *, parents: int) -> Op:
    """A membership record's body, strictly: anything else is MalformedGroupRecordError."""
    kind = _KINDS.get(content_type)
    if kind is None:
        raise MalformedGroupRecordError("not a membership record")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedGroupRecordError("a membership record's body is JSON") from None
    if not isinstance(obj, dict):
        raise MalformedGroupRecordError("a membership record's body is a JSON object")
    if kind == "create":
        if set(obj) != {"name", "members"}:
            raise MalformedGroupRecordError("a create record has name and members only")
        name, members = obj["name"], obj["members"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise MalformedGroupRecordError(f"a group name is 1 to {MAX_NAME} characters")
        if not isinstance(members, list) or len(members) > MAX_MEMBERS:
            raise MalformedGroupRecordError(f"a group lists at most {MAX_MEMBERS} members")
        checked = tuple(_did(m) for m in members)
        if list(checked) != sorted(set(checked)):
            raise MalformedGroupRecordError("a create record lists distinct members, sorted")
        if parents:
            raise MalformedGroupRecordError("a create record has no parents")
        op = Op("create", checked, name)
    else:
        if set(obj) != {"member"}:
            raise MalformedGroupRecordError(f"an {kind} record has member only")
        op = Op(kind, (_did(obj["member"]),))
    if op_message(op)[1] != body:
        raise MalformedGroupRecordError("a membership record's body is canonical JSON")
    return op


def fold(ops: Iterable[tuple[str, Op]], creator: str) -> frozenset[str]:
    """The members after ``ops`` ((author root, change), in history order).

    Changes by anyone but the creator are skipped (``admit`` refuses them first, but the
    fold must not depend on that), and the creator is never removed.
    """
    members: set[str] = set()
    for author, op in ops:
        if author != creator:
            continue
        if op.kind == "create":
            members.add(creator)
            members.update(op.members)
        elif op.kind == "add":
            members.update(op.members)
        else:
            members.difference_update(m for m in op.members if m != creator)
    return frozenset(members)
