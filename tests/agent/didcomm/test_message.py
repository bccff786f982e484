"""The plaintext message model: JSON in and out, strict about the headers it defines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.didcomm import Attachment, Message, MessageError
from agent.didcomm.pack import pack_plaintext
from agent.didcomm.unpack import unpack

from . import spec_vectors as v


def test_spec_plaintext_round_trips() -> None:
    message = Message.from_dict(v.PLAINTEXT)
    assert message.id == "1234567890"
    assert message.from_ == "did:example:alice"
    assert message.to == ("did:example:bob",)
    assert message.created_time == 1516269022 and message.expires_time == 1516385931
    out = message.to_dict()
    assert out.pop("typ") == "application/didcomm-plain+json"
    assert out == v.PLAINTEXT
    assert Message.from_json(message.to_json()) == message


def test_unknown_headers_are_kept_and_attachments_parsed() -> None:
    obj = {
        "id": "1",
        "type": "https://didcomm.org/x/1.0/y",
        "thid": "t",
        "pthid": "p",
        "please_ack": ["receipt"],
        "lang": "en",
        "attachments": [
            {"id": "a", "media_type": "text/plain", "data": {"base64": "aGk="}, "x-extra": 1},
            {"data": {"links": ["https://example.com/z"], "hash": "abc"}, "byte_count": 3},
            {"data": {"json": {"k": [1, 2]}}, "lastmod_time": 5},
        ],
    }
    message = Message.from_dict(obj)
    assert message.headers == {"please_ack": ["receipt"], "lang": "en"}
    assert message.attachments is not None and len(message.attachments) == 3
    assert message.attachments[0].extra == {"x-extra": 1}
    out = message.to_dict()
    assert out["body"] == {}  # written although the input had none
    assert out["attachments"] == obj["attachments"]
    assert out["please_ack"] == ["receipt"] and out["thid"] == "t"


def test_new_fills_id_and_times() -> None:
    message = Message.new("https://example.com/t/1.0/m", {"a": 1}, expires_in=60)
    assert len(message.id) == 36 and message.created_time is not None
    assert message.expires_time == message.created_time + 60


def test_non_ascii_survives_the_envelope() -> None:
    message = Message.new("https://example.com/t/1.0/m", {"text": "zażółć 🐍"})
    assert "zażółć" in message.to_json()
    assert unpack(pack_plaintext(message)).message.body == {"text": "zażółć 🐍"}


BAD: list[tuple[str, Any]] = [
    ("no id", {"type": "t"}),
    ("empty id", {"id": "", "type": "t"}),
    ("id not a string", {"id": 1, "type": "t"}),
    ("no type", {"id": "1"}),
    ("null type", {"id": "1", "type": None}),
    ("body not an object", {"id": "1", "type": "t", "body": []}),
    ("from not a DID", {"id": "1", "type": "t", "from": "alice"}),
    ("from with fragment", {"id": "1", "type": "t", "from": "did:example:a#k"}),
    ("to a string", {"id": "1", "type": "t", "to": "did:example:b"}),
    ("to with non-DID", {"id": "1", "type": "t", "to": ["bob"]}),
    ("to with fragment", {"id": "1", "type": "t", "to": ["did:example:b#k"]}),
    ("created_time a float", {"id": "1", "type": "t", "created_time": 1.5}),
    ("created_time a bool", {"id": "1", "type": "t", "created_time": True}),
    ("expires_time a string", {"id": "1", "type": "t", "expires_time": "1"}),
    ("negative time", {"id": "1", "type": "t", "created_time": -1}),
    ("thid not a string", {"id": "1", "type": "t", "thid": 5}),
    ("wrong typ", {"id": "1", "type": "t", "typ": "application/json"}),
    ("attachments not a list", {"id": "1", "type": "t", "attachments": {}}),
    ("attachment without data", {"id": "1", "type": "t", "attachments": [{"id": "a"}]}),
    ("attachment data empty", {"id": "1", "type": "t", "attachments": [{"data": {}}]}),
    (
        "attachment links not list",
        {"id": "1", "type": "t", "attachments": [{"data": {"links": "x"}}]},
    ),
    ("not an object", ["id", "type"]),
]


@pytest.mark.parametrize(("why", "obj"), BAD, ids=[b[0] for b in BAD])
def test_strict_parsing(why: str, obj: Any) -> None:
    with pytest.raises(MessageError):
        Message.from_dict(obj)
    with pytest.raises(MessageError):
        Message.from_json(json.dumps(obj))


@pytest.mark.parametrize(
    "text",
    [
        '{"id": "1", "type": "t", "id": "2"}',
        '{"id": "1", "type": "t", "body": {"n": NaN}}',
        '{"id": "1", "type": "t"',
        "[" * 100_000 + "]" * 100_000,
        b'{"id": "\xff", "type": "t"}',
    ],
    ids=["duplicate member", "NaN", "truncated", "deep nesting", "not UTF-8"],
)
def test_strict_json(text: str | bytes) -> None:
    with pytest.raises(MessageError):
        Message.from_json(text)


def test_typ_without_application_prefix_is_accepted() -> None:
    assert Message.from_dict({"id": "1", "type": "t", "typ": "didcomm-plain+json"}).id == "1"


def test_headers_may_not_shadow_fields() -> None:
    with pytest.raises(MessageError):
        Message(id="1", type="t", headers={"from": "did:example:x"})


def test_attachment_needs_data() -> None:
    with pytest.raises(MessageError):
        Attachment(data={"nothing": 1})
