"""Who may write to a group, and who is a member when: the ``admit`` rule and the fold.

Pure logic over a :class:`SyncStore`, the groups this owner is in and the sync-key
certificates it knows; no vault, no network (so the rules are tested on their own).

``admit`` (called by the sync node on every message a peer sends, before it is stored)
refuses, each with its own code (agent/sync/group_errors.py):

- a message of a conversation that is no group here;
- an author key no certificate binds to an owner's root (``sync_key_uncertified``);
- a content type groups do not carry;
- a membership record that is malformed, not by the creator, or removing the creator;
- a message whose author's root no membership record of the group ever named (nor the
  creator): ``group_not_member``.

Everything it looks at grows only (certificates, records seen), so a message refused
now for lack of a record is admitted once the record is here (its peer offers it again
and it is requested as the parent of later ones), and every member ends up holding the
same messages.  A message admitted by an owner who *was* a member is kept and synced
(so every member keeps the same log), but shown only if its author was a member under
its own causal past (:meth:`GroupRules.member_at`): the same answer on every member.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.sync.group_errors import (
    GroupChangeRefusedError,
    NotMemberAuthorError,
    UncertifiedAuthorError,
    UnknownGroupMessageError,
    UnsupportedGroupContentError,
)
from agent.sync.group_log import CONTENT_TYPES, OP_TYPES, Op, fold, parse_op
from agent.sync.messages import Message
from agent.sync.store import SyncStore


@dataclass
class _Log:
    """What the rules keep of one group's log (rebuilt from the store once per process)."""

    creator: str
    named: set[str] = field(default_factory=set)  # every root a record ever named
    ops: dict[str, tuple[str, Op]] = field(default_factory=dict)  # delivered records


class GroupRules:
    """The admit rule and the membership of every group of one owner."""

    def __init__(self, store: SyncStore, certs: dict[str, str]) -> None:
        self.store = store
        self.certs = certs  # sync-key did -> root did (verified certificates only)
        self._logs: dict[str, _Log] = {}

    def add_group(self, conversation: str, creator: str) -> None:
        """A group this owner is in (from the vault, or joined now): load its records."""
        log = self._logs[conversation] = _Log(creator, {creator})
        delivered = {m.id for _, m in self.store.delivered(conversation)}
        loaded = [m for _, m in self.store.delivered(conversation)]
        loaded += self.store.get(conversation, self.store.waiting(conversation))
        for message in loaded:
            if message.content_type in OP_TYPES:
                root = self.certs.get(message.author)
                if root is None:
                    continue
                op = parse_op(message.content_type, message.body, parents=len(message.parents))
                if root == creator:
                    log.named.update(op.members)
                    if message.id in delivered:
                        log.ops[message.id] = (root, op)

    def create_record(self, conversation: str) -> str | None:
        """The id of the group's (first) create record delivered here, if any."""
        log = self._logs[conversation]
        for mid in self.store.history(conversation):
            entry = log.ops.get(mid)
            if entry is not None and entry[1].kind == "create" and entry[0] == log.creator:
                return mid
        return None

    def remove_group(self, conversation: str) -> None:
        self._logs.pop(conversation, None)

    def groups(self) -> list[str]:
        return list(self._logs)

    def creator(self, conversation: str) -> str:
        return self._logs[conversation].creator

    def author_root(self, message: Message) -> str | None:
        return self.certs.get(message.author)

    # --- admit ------------------------------------------------------------------------

    def admit(self, message: Message) -> None:
        log = self._logs.get(message.conversation)
        if log is None:
            raise UnknownGroupMessageError("a message of a conversation that is no group here")
        root = self.certs.get(message.author)
        if root is None:
            raise UncertifiedAuthorError("no certificate binds the message's author to an owner")
        if message.content_type in OP_TYPES:
            op = parse_op(message.content_type, message.body, parents=len(message.parents))
            if root != log.creator:
                raise GroupChangeRefusedError("only the group's creator changes its membership")
            if op.kind == "remove" and log.creator in op.members:
                raise GroupChangeRefusedError("the group's creator cannot be removed")
            log.named.update(op.members)
        elif message.content_type in CONTENT_TYPES:
            if root not in log.named:
                raise NotMemberAuthorError("the author is no member of the group")
        else:
            raise UnsupportedGroupContentError("a content type groups do not carry")

    # --- membership -------------------------------------------------------------------

    def delivered(self, messages: list[Message]) -> None:
        """Messages now delivered here (posted or received): note membership records."""
        for message in messages:
            log = self._logs.get(message.conversation)
            if log is None or message.content_type not in OP_TYPES:
                continue
            root = self.certs.get(message.author)
            if root is None:
                continue
            op = parse_op(message.content_type, message.body, parents=len(message.parents))
            log.ops[message.id] = (root, op)
            if root == log.creator:
                log.named.update(op.members)

    def _ordered(self, conversation: str, within: set[str] | None) -> list[tuple[str, Op]]:
        log = self._logs[conversation]
        if not log.ops:
            return []
        order = self.store.history(conversation)
        return [log.ops[m] for m in order if m in log.ops and (within is None or m in within)]

    def members(self, conversation: str) -> frozenset[str]:
        """The members now: the fold over every delivered record, in history order."""
        return fold(self._ordered(conversation, None), self._logs[conversation].creator)

    def member_at(self, message: Message) -> bool:
        """Whether the author was a member under the message's causal past (its ancestors)."""
        root = self.certs.get(message.author)
        log = self._logs.get(message.conversation)
        if root is None or log is None:
            return False
        ancestors = set(self.store.ancestors(message.conversation, message.id))
        ancestors.discard(message.id)
        return root in fold(self._ordered(message.conversation, ancestors), log.creator)
