"""Group membership and the admit rule, on their own (no tokens, no network).

The Hypothesis test plays a creator with two devices changing membership concurrently
while a member writes, the replicas exchanging messages in any order: every replica
ends with the same members and the same verdict on every message.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sync.errors import NotAdmittedError
from agent.sync.group_log import ADD_TYPE, CREATE_TYPE, Op, fold, op_message, parse_op
from agent.sync.group_rules import GroupRules
from agent.sync.ids import new_conversation_id
from agent.sync.messages import Message
from agent.sync.store import SyncStore
from agent.sync.sync_key import SyncKey

ROOT = SyncKey.generate()  # the creator's root (a token key in real use)
DEVICES = [SyncKey.generate(), SyncKey.generate()]  # the creator's two sync keys
MEMBER_ROOTS = [SyncKey.generate() for _ in range(3)]
MEMBER_KEYS = [SyncKey.generate() for _ in range(3)]
CERTS = {d.did: ROOT.did for d in DEVICES} | {
    k.did: r.did for k, r in zip(MEMBER_KEYS, MEMBER_ROOTS, strict=True)
}
_clock = [int(time.time() * 1000)]


def write(key: SyncKey, store: SyncStore, conv: str, content_type: str, body: bytes) -> Message:
    _clock[0] += 1
    return Message.create(
        key, conversation=conv, parents=store.heads(conv), content_type=content_type,
        body=body, timestamp=_clock[0],
    )  # fmt: skip


def replica(conv: str) -> tuple[SyncStore, GroupRules]:
    store = SyncStore(":memory:", durable=False)
    rules = GroupRules(store, dict(CERTS))
    rules.add_group(conv, ROOT.did)
    return store, rules


def give(store: SyncStore, rules: GroupRules, messages: list[Message]) -> None:
    rules.delivered(store.add(messages).delivered)


actions = st.lists(
    st.one_of(
        st.tuples(st.just("op"), st.integers(0, 1), st.booleans(), st.integers(0, 2)),
        st.tuples(st.just("text"), st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.just("merge"), st.integers(0, 2), st.integers(0, 2)),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(actions=actions, seed=st.integers(0, 2**32 - 1))
def test_concurrent_changes_resolve_alike_everywhere(
    actions: list[tuple[Any, ...]], seed: int
) -> None:
    conv = new_conversation_id()
    replicas = [replica(conv) for _ in range(3)]
    everything: dict[str, Message] = {}
    store0 = replicas[0][0]
    create = write(DEVICES[0], store0, conv, *op_message(Op("create", (MEMBER_ROOTS[0].did,), "g")))
    for store, rules in replicas:
        give(store, rules, [create])
    everything[create.id] = create
    for action in actions:
        if action[0] == "op":  # a creator device changes membership
            _, r, adding, m = action
            store, rules = replicas[r]
            op = Op("add" if adding else "remove", (MEMBER_ROOTS[m].did,))
            made = write(DEVICES[r], store, conv, *op_message(op))
        elif action[0] == "text":  # replica 2 is a member owner writing
            _, m, _ = action
            store, rules = replicas[2]
            made = write(MEMBER_KEYS[m], store, conv, "text/plain", b"hi")
        else:
            _, src, dst = action
            got = replicas[src][0]
            wanted = [m for _, m in got.delivered(conv)]
            give(replicas[dst][0], replicas[dst][1], wanted)
            continue
        give(store, rules, [made])
        everything[made.id] = made
    shuffled = list(everything.values())
    random.Random(seed).shuffle(shuffled)
    late = replica(conv)  # a member that gets everything at once, in any order
    replicas.append(late)
    for store, rules in replicas:
        for message in shuffled:  # one by one: children may come before parents
            give(store, rules, [message])
    members = {frozenset(rules.members(conv)) for _, rules in replicas}
    assert len(members) == 1
    verdicts = {
        tuple(rules.member_at(m) for m in sorted(everything.values(), key=lambda m: m.id))
        for _, rules in replicas
    }
    assert len(verdicts) == 1
    # The fold is over the history order, which every replica computes alike.
    history = store0.history(conv)
    ops = [
        (CERTS.get(everything[i].author, ""), parse_op(everything[i].content_type,
         everything[i].body, parents=len(everything[i].parents)))
        for i in history if everything[i].content_type.startswith("janus.group/")
    ]  # fmt: skip
    assert members == {fold(ops, ROOT.did)}


def test_concurrent_add_and_remove_follow_the_history_order() -> None:
    conv = new_conversation_id()
    (s1, r1), (s2, r2) = replica(conv), replica(conv)
    create = write(DEVICES[0], s1, conv, *op_message(Op("create", (), "g")))
    for store, rules in ((s1, r1), (s2, r2)):
        give(store, rules, [create])
    target = MEMBER_ROOTS[1].did
    add = write(DEVICES[0], s1, conv, *op_message(Op("add", (target,))))
    remove = write(DEVICES[1], s2, conv, *op_message(Op("remove", (target,))))
    give(s1, r1, [add, remove])
    give(s2, r2, [remove, add])
    assert r1.members(conv) == r2.members(conv)
    last = s1.history(conv)[-1]
    assert (target in r1.members(conv)) == (last == add.id)


def test_a_removed_members_later_messages_are_not_shown_but_kept() -> None:
    conv = new_conversation_id()
    store, rules = replica(conv)
    member = MEMBER_ROOTS[0].did
    give(store, rules, [write(DEVICES[0], store, conv, *op_message(Op("create", (member,), "g")))])
    before = write(MEMBER_KEYS[0], store, conv, "text/plain", b"in")
    give(store, rules, [before])
    give(store, rules, [write(DEVICES[0], store, conv, *op_message(Op("remove", (member,))))])
    after = write(MEMBER_KEYS[0], store, conv, "text/plain", b"out")
    rules.admit(after)  # named once: kept, so every member keeps the same log
    give(store, rules, [after])
    assert rules.member_at(before) and not rules.member_at(after)
    assert member not in rules.members(conv)


def refusal(rules: GroupRules, message: Message) -> str:
    with pytest.raises(NotAdmittedError) as caught:
        rules.admit(message)
    return caught.value.code


def test_admit_refuses_bad_records_with_their_codes() -> None:
    conv = new_conversation_id()
    store, rules = replica(conv)
    member = MEMBER_ROOTS[0].did
    give(store, rules, [write(DEVICES[0], store, conv, *op_message(Op("create", (member,), "g")))])
    stranger = SyncKey.generate()
    other = new_conversation_id()
    cases = {
        "group_unknown_conversation": write(DEVICES[0], store, other, "text/plain", b"x"),
        "sync_key_uncertified": write(stranger, store, conv, "text/plain", b"x"),
        "group_change_refused": write(
            MEMBER_KEYS[0], store, conv, *op_message(Op("add", (MEMBER_ROOTS[1].did,)))
        ),
        "group_not_member": write(MEMBER_KEYS[2], store, conv, "text/plain", b"x"),
        "group_bad_content_type": write(MEMBER_KEYS[0], store, conv, "image/png", b"x"),
        "malformed_group_record": write(DEVICES[0], store, conv, ADD_TYPE, b'{"member": 1}'),
    }
    for code, message in cases.items():
        assert refusal(rules, message) == code
    remove_root = write(DEVICES[1], store, conv, *op_message(Op("remove", (ROOT.did,))))
    assert refusal(rules, remove_root) == "group_change_refused"
    rules.admit(write(MEMBER_KEYS[0], store, conv, "text/plain", b"fine"))  # a member: admitted


@pytest.mark.parametrize(
    ("content_type", "body", "parents"),
    [
        (ADD_TYPE, b"not json", 1),
        (ADD_TYPE, b"[]", 1),
        (ADD_TYPE, b'{"member":"did:key:z6Mk","x":1}', 1),
        (ADD_TYPE, b'{"member":"did:web:example.org"}', 1),
        (ADD_TYPE, b'{ "member":"' + MEMBER_ROOTS[0].did.encode() + b'"}', 1),  # not canonical
        (CREATE_TYPE, b'{"members":[],"name":""}', 0),
        (CREATE_TYPE, b'{"members":[],"name":"g"}', 1),  # a create record has no parents
        (CREATE_TYPE, b'{"members":["b","a"],"name":"g"}', 0),
        ("text/plain", b"{}", 1),
    ],
    ids=[  # fixed: one record names a key generated at import
        "add-not-json",
        "add-not-an-object",
        "add-extra-field",
        "add-not-a-did-key",
        "add-not-canonical",
        "create-empty-name",
        "create-with-parents",
        "create-unsorted-members",
        "other-type",
    ],
)
def test_malformed_membership_records(content_type: str, body: bytes, parents: int) -> None:
    with pytest.raises(NotAdmittedError) as caught:
        parse_op(content_type, body, parents=parents)
    assert caught.value.code == "malformed_group_record"


def test_membership_records_round_trip() -> None:
    for op in (
        Op("create", tuple(sorted(r.did for r in MEMBER_ROOTS)), "friends"),
        Op("add", (MEMBER_ROOTS[0].did,)),
        Op("remove", (MEMBER_ROOTS[1].did,)),
    ):
        content_type, body = op_message(op)
        assert parse_op(content_type, body, parents=0 if op.kind == "create" else 1) == op
