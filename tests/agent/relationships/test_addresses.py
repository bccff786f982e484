"""Address updates: strict parsing, and the overlap rotation between two address books."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from agent.didcomm.message import Message
from agent.relationships.addresses import (
    ADDRESS_UPDATE_TYPE,
    AddressBook,
    AddressUpdate,
    BadAddressUpdateError,
    attach,
    extract,
    update_message,
)
from agent.relationships.delivery import Address, HeldAddress
from janus_hsm import b64url


def held(service: str = "https://recv.example") -> HeldAddress:
    return HeldAddress(
        Address(
            service, b64url.encode(secrets.token_bytes(16)), b64url.encode(secrets.token_bytes(32))
        ),
        b64url.encode(secrets.token_bytes(16)),
    )


def exchange(sender: AddressBook, receiver: AddressBook, *, now: int = 1000) -> AddressUpdate:
    """What one message carries from ``sender`` to ``receiver`` (both books updated)."""
    update = sender.outgoing()
    sender.sent(update)
    wire = attach(Message.new("https://example.org/note", {"text": "x"}), update).to_json()
    found = extract(Message.from_json(wire))
    if found is not None:
        receiver.apply(found, now=now)
    return update


def test_update_round_trips_in_any_message() -> None:
    new = held().address
    update = AddressUpdate(add=(new,), use=new.address_id, confirm=("c" * 22,), retire=("r" * 22,))
    carried = attach(Message.new("https://example.org/anything", {"k": 1}), update)
    assert extract(Message.from_json(carried.to_json())) == update
    alone = update_message(update)
    assert alone.type == ADDRESS_UPDATE_TYPE
    assert extract(Message.from_json(alone.to_json())) == update
    assert extract(Message.new("https://example.org/plain")) is None


@pytest.mark.parametrize(
    "bad",
    [
        [],
        "text",
        {"add": "x"},
        {"add": [{"service": "https://a.example"}]},
        {"use": 5},
        {"use": ""},
        {"confirm": [1]},
        {"retire": "id"},
        {"retire": ["x"] * 9},
        {"unknown": []},
        {"add": [held().address.to_dict()] * 9},
        {"add": [{**held().address.to_dict(), "service": "ftp://x"}]},
    ],
)
def test_bad_updates_are_typed_errors(bad: Any) -> None:
    with pytest.raises(BadAddressUpdateError):
        AddressUpdate.from_dict(bad)


def test_use_of_an_address_never_added_changes_nothing() -> None:
    book = AddressBook()
    first = held().address
    book.set_peer(first)
    before = book.to_dict()
    with pytest.raises(BadAddressUpdateError):
        book.apply(AddressUpdate(use="x" * 22))
    assert book.to_dict() == before


def test_two_attachments_are_refused() -> None:
    update = AddressUpdate(confirm=("a" * 22,))
    once = attach(Message.new("https://example.org/n"), update)
    twice = attach(once, update)
    with pytest.raises(BadAddressUpdateError):
        extract(twice)


def test_overlap_rotation_between_two_books() -> None:
    blair, alex = AddressBook(), AddressBook()
    blair.policy.grace_seconds = 60
    old = held()
    blair.start(old)
    exchange(blair, alex)  # Blair announces her first address
    assert [p.address for p in alex.peer] == [old.address]
    exchange(alex, blair)  # Alex confirms it
    first = blair.own_current()
    assert first is not None and first.address_id == old.address.address_id

    new = held()
    blair.rotate(new, now=1000)
    assert {a.address_id for a in blair.pickup_addresses()} == {
        old.address.address_id,
        new.address.address_id,
    }
    exchange(blair, alex)  # announce: Alex switches at once, keeps the old as fallback
    assert alex.peer_targets() == [new.address, old.address]
    # Blair still picks up from both until the confirmation
    assert len(blair.pickup_addresses()) == 2
    exchange(alex, blair, now=1000)  # the confirmation
    current = blair.own_current()
    assert current is not None and current.address_id == new.address.address_id
    assert blair.due_retirements(now=1059) == []  # the grace period: still drained
    due = blair.due_retirements(now=1060)
    assert [a.address_id for a in due] == [old.address.address_id]
    blair.retired(old.address.address_id)
    exchange(blair, alex)
    assert alex.peer_targets() == [new.address]
    assert blair.outgoing() == AddressUpdate()  # nothing more to say


def test_arrival_at_the_new_address_counts_as_confirmation() -> None:
    blair, alex = AddressBook(), AddressBook()
    old, new = held(), held()
    blair.start(old)
    exchange(blair, alex)
    exchange(alex, blair)
    blair.rotate(new)
    exchange(blair, alex)
    blair.received_at(new.address.address_id, now=5)
    current = blair.own_current()
    assert current is not None and current.address_id == new.address.address_id


def test_policy_rotation_and_block() -> None:
    book = AddressBook()
    book.policy.every_messages = 3
    first = held()
    book.start(first, now=100)
    book.apply(AddressUpdate(confirm=(first.address.address_id,)), now=100)
    for _ in range(2):
        book.received_at(first.address.address_id)
    assert not book.should_rotate(now=101)
    book.received_at(first.address.address_id)
    assert book.should_rotate(now=101)
    book.rotate(held(), now=101)
    assert not book.should_rotate(now=101)  # one rotation at a time
    assert len(book.block()) == 2  # every address the peer knows


def test_time_policy() -> None:
    book = AddressBook()
    book.policy.every_seconds = 50
    first = held()
    book.start(first, now=100)
    book.apply(AddressUpdate(confirm=(first.address.address_id,)), now=100)
    assert not book.should_rotate(now=149)
    assert book.should_rotate(now=150)


def test_book_round_trips() -> None:
    book = AddressBook()
    book.start(held())
    book.set_peer(held().address)
    assert AddressBook.from_dict(book.to_dict()).to_dict() == book.to_dict()
