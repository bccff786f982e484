"""Sync records and batches: one encoding each, a strict all-or-nothing parser."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sync.errors import (
    BadSignatureError,
    MalformedRecordError,
    SyncError,
    UnsupportedVersionError,
)
from agent.sync.ids import new_conversation_id
from agent.sync.protocol import SyncNode
from agent.sync.records import (
    MAX_BATCH_BYTES,
    MAX_IDS,
    IdsRecord,
    MessageRecord,
    RecordType,
    encode_record,
    ids_records,
    pack_batch,
    parse_batch,
    parse_record,
    record_size,
)
from agent.sync.store import SyncStore

from .dag import random_dag

CONV = new_conversation_id()
DAG = random_dag(CONV, 8, random.Random(3))
IDS = [m.id for m in DAG]


def sample_batch() -> bytes:
    return pack_batch(
        [
            *ids_records(RecordType.ACK, CONV, IDS[:3]),
            MessageRecord(DAG[0]),
            *ids_records(RecordType.OFFER, CONV, IDS),
            *ids_records(RecordType.REQUEST, CONV, IDS[5:]),
        ]
    )


def test_records_round_trip_and_sizes_are_exact() -> None:
    records = parse_batch(sample_batch())
    assert [type(r) for r in records] == [IdsRecord, MessageRecord, IdsRecord, IdsRecord]
    assert records[1] == MessageRecord(DAG[0])
    assert isinstance(records[2], IdsRecord) and set(records[2].ids) == set(IDS)
    assert pack_batch(records) == sample_batch()
    assert len(sample_batch()) == 1 + sum(record_size(r) for r in records)


def test_id_lists_are_split_sorted_and_deduplicated() -> None:
    many = [new_conversation_id() for _ in range(MAX_IDS + 5)]
    records = ids_records(RecordType.OFFER, CONV, many + many[:3])
    assert [len(r.ids) for r in records] == [MAX_IDS, 5]
    for record in records:
        assert parse_record(encode_record(record)) == record


def _record_with(ids: bytes) -> bytes:
    return bytes([RecordType.OFFER]) + bytes(32) + ids


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", MalformedRecordError),
        (b"\x02" + bytes(10), MalformedRecordError),
        (b"\x09" + bytes(64), MalformedRecordError),
        (_record_with(b""), MalformedRecordError),
        (_record_with(bytes(31)), MalformedRecordError),
        (_record_with(bytes(32) * 2), MalformedRecordError),  # repeated id
        (_record_with(b"\x01" * 32 + b"\x00" * 32), MalformedRecordError),  # not sorted
        (_record_with(bytes(32) * (MAX_IDS + 1)), MalformedRecordError),
        (bytes([RecordType.MESSAGE]) + bytes(32) + b"\x01", SyncError),
    ],
)
def test_bad_records_are_typed_errors(data: bytes, error: type[SyncError]) -> None:
    with pytest.raises(error):
        parse_record(data)


def test_a_message_record_of_another_conversation_is_refused() -> None:
    data = encode_record(MessageRecord(DAG[0]))
    with pytest.raises(MalformedRecordError, match="another conversation"):
        parse_record(data[:1] + bytes(32) + data[33:])


def test_bad_batches_are_typed_errors() -> None:
    good = sample_batch()
    for bad, error in [
        (b"", MalformedRecordError),
        (b"\x02" + good[1:], UnsupportedVersionError),
        (good[:-1], MalformedRecordError),
        (good + b"\x00\x00", MalformedRecordError),
        (b"\x01" + bytes(MAX_BATCH_BYTES), MalformedRecordError),
        (good.replace(DAG[0].body, DAG[0].body.upper()), BadSignatureError),
    ]:
        with pytest.raises(error):
            parse_batch(bad)
    with pytest.raises(MalformedRecordError):
        parse_batch("text")
    with pytest.raises(MalformedRecordError):
        encode_record(IdsRecord(RecordType.ACK, CONV, ()))


def test_a_bad_batch_changes_no_state() -> None:
    """The valid records before the bad one are not applied either."""
    nodes = []
    for _ in range(2):
        node = SyncNode(SyncStore(":memory:"))
        for message in DAG[:4]:
            node.post(message, 0)
        node.open("peer", CONV, 0)
        nodes.append(node)
    hit, untouched = nodes
    good = pack_batch(
        [
            MessageRecord(DAG[5]),
            *ids_records(RecordType.ACK, CONV, IDS[:2]),
            *ids_records(RecordType.REQUEST, CONV, IDS[:4]),
        ]
    )
    with pytest.raises(MalformedRecordError):
        hit.receive("peer", good + b"\x00\x00\x00\x09junk", 0)
    assert hit.store.has(CONV, IDS) == set(IDS[:4])
    assert hit.store.unknown_to(CONV, "peer") == untouched.store.unknown_to(CONV, "peer")
    assert hit.poll("peer", 0) == untouched.poll("peer", 0) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2000), st.binary(min_size=1, max_size=6))
def test_any_corruption_of_a_batch_is_a_sync_error_or_parses_canonically(
    noise: bytes, where: int, insert: bytes
) -> None:
    good = sample_batch()
    where = min(where, len(good))
    for candidate in (noise, b"\x01" + noise, good[:where] + insert + good[where:]):
        try:
            records = parse_batch(candidate)
        except SyncError as exc:
            assert exc.code
        else:
            assert pack_batch(records) == candidate
