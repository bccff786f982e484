"""The canonical text every signature and hash is computed over must never drift."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from janus_hsm.strictjson import StrictJSONError, canonical_json, canonical_text, loads

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(JSON, st.booleans())
def test_canonical_text_is_sorted_compact_json(value: Any, ascii_only: bool) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only)
    assert canonical_text(value, ascii_only=ascii_only) == expected
    assert canonical_json(value, ascii_only=ascii_only) == expected.encode()


def test_canonical_text_examples() -> None:
    assert canonical_text({"b": 1, "a": ["é", None]}) == '{"a":["é",null],"b":1}'
    assert canonical_text({"b": 1, "a": ["é", None]}, ascii_only=True) == (
        '{"a":["\\u00e9",null],"b":1}'
    )


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": "\\ud800"}',  # a high surrogate alone
        b'{"a": "x\\uDC00y"}',  # a low one, upper-case hex
        b'{"\\udfff": 1}',  # in a member name
        b'["\\ud83d", "\\ude00"]',  # a pair split over two strings
        '{"a": "\ud800"}',  # text given as str holding the character itself
    ],
)
def test_lone_surrogates_are_refused(text: bytes | str) -> None:
    """Valid JSON syntax, but not Unicode: it could not be signed, hashed or stored."""
    with pytest.raises(StrictJSONError, match="lone surrogate") as refused:
        loads(text, "body")
    assert str(refused.value).startswith("body: ")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001f600"}),  # a pair is one character
        (b'{"a": "\\\\ud800"}', {"a": "\\ud800"}),  # an escaped backslash, then text
        (b'{"a": "\xf0\x9f\x98\x80"}', {"a": "\U0001f600"}),  # the same, as UTF-8
    ],
)
def test_surrogate_pairs_and_lookalikes_parse(text: bytes, value: Any) -> None:
    assert loads(text, "body") == value
