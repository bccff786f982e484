"""Padding of bodies to size buckets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.relationships import padding
from agent.relationships.errors import MalformedMessageError, PlaintextTooLargeError


@given(st.binary(max_size=5000))
def test_pad_then_unpad_is_the_identity_and_lands_on_a_bucket(data: bytes) -> None:
    padded = padding.pad(data)
    assert len(padded) + padding.TAG_LEN in padding.BUCKETS
    assert padding.unpad(padded) == data


def test_bucket_edges() -> None:
    largest_small = 256 - padding.TAG_LEN - 1
    assert padding.bucket_for(largest_small) == 256
    assert padding.bucket_for(largest_small + 1) == 1024
    assert padding.bucket_for(padding.MAX_PLAINTEXT) == 65536
    with pytest.raises(PlaintextTooLargeError):
        padding.bucket_for(padding.MAX_PLAINTEXT + 1)


def test_unpadded_or_odd_sized_bodies_are_refused() -> None:
    for bad in (b"", bytes(240), b"x" * 240, b"\x80" + bytes(100)):
        with pytest.raises(MalformedMessageError):
            padding.unpad(bad)
