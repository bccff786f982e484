"""The canonical text every signature and hash is computed over must never drift."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from janus_hsm.strictjson import canonical_json, canonical_text

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
