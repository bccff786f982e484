"""Signed events: what parse accepts, and that it refuses everything else with a
typed error (the bus is an untrusted carrier)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.bus import EVENT_TYP, Event, EventFormatError, sign_event
from agent.bus.events import MAX_BODY
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from tests.agent.bus.helpers import destroyed_event, revocation_event, use_event


def reassemble(key: KeyHandle, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A JWS over ``header`` and ``payload``, genuinely signed by ``key``."""
    signing_input = (
        b64url.encode(json.dumps(header).encode())
        + "."
        + b64url.encode(json.dumps(payload).encode())
    )
    return signing_input + "." + b64url.encode(key.sign(signing_input.encode()))


def parts(event: Event) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = event.compact.split(".")
    return json.loads(b64url.decode(header)), json.loads(b64url.decode(payload))


def test_every_kind_round_trips(instance_key: KeyHandle, other_key: KeyHandle) -> None:
    for event in (
        revocation_event(instance_key),
        destroyed_event(other_key),
        use_event(instance_key, 3),
    ):
        parsed = Event.parse(event.compact)
        assert parsed == event
        assert Event.parse(event.compact.encode()) == event
        header, payload = parts(event)
        assert header["typ"] == EVENT_TYP
        assert set(payload) == {"id", "kind", "iss", "iat", "body"}
        assert len(event.id) == 22
    assert use_event(instance_key).id != use_event(instance_key).id


def _mutations(key: KeyHandle, other: KeyHandle) -> list[tuple[str, str | bytes]]:
    good = use_event(key)
    header, payload = parts(good)
    cases: list[tuple[str, str | bytes]] = [
        ("not ascii", "é".encode() + good.compact.encode()),
        ("two parts", good.compact.rsplit(".", 1)[0]),
        ("too large", "a" * 200_000),
        ("typ", reassemble(key, {**header, "typ": "JWT"}, payload)),
        ("extra header", reassemble(key, {**header, "crit": ["x"]}, payload)),
        ("alg none", reassemble(key, {**header, "alg": "none"}, payload)),
        ("kid of another key", reassemble(key, {**header, "kid": f"{other.did}#x"}, payload)),
        ("short id", reassemble(key, header, {**payload, "id": "abc"})),
        ("unknown kind", reassemble(key, header, {**payload, "kind": "party"})),
        ("float iat", reassemble(key, header, {**payload, "iat": 1.5})),
        ("negative iat", reassemble(key, header, {**payload, "iat": -1})),
        ("extra member", reassemble(key, header, {**payload, "exp": 1})),
        ("body extra", reassemble(key, header, {**payload, "body": {**payload["body"], "x": 1}})),
        (
            "uses negative",
            reassemble(key, header, {**payload, "body": {**payload["body"], "uses": {"c": -1}}}),
        ),
        ("iss not did", reassemble(key, header, {**payload, "iss": "alice"})),
        # Signed by another key than the one the header and iss name.
        ("wrong signer", reassemble(other, header, payload)),
        (
            "revocation record garbage",
            reassemble(
                key,
                header,
                {**payload, "kind": "revocation", "body": {"record": "x.y.z", "bundle": {}}},
            ),
        ),
    ]
    return cases


def test_parse_refuses_malformed_and_forged_events(
    instance_key: KeyHandle, other_key: KeyHandle
) -> None:
    # The mutations are made the same way as this one, which parses: each is refused
    # for what was changed, not for how it was assembled.
    header, payload = parts(use_event(instance_key))
    assert Event.parse(reassemble(instance_key, header, payload)).id == payload["id"]
    for name, data in _mutations(instance_key, other_key):
        with pytest.raises(EventFormatError) as caught:
            Event.parse(data)
        assert caught.value.code == "bad_event", name


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("party", {}),
        ("use", {"cap": "c", "uses": {}, "action": "a", "extra": 1}),
        ("key-destroyed", {"grant": "g", "leaf": "l", "reason": "r" * 300}),
        ("revocation", {"record": "not a jws", "bundle": {}}),
        ("revocation", {"record": "a.b.c", "bundle": "not an object"}),
        ("use", {"cap": "c", "uses": {"c": 1}, "action": "a" * MAX_BODY}),
    ],
)
def test_sign_event_refuses_what_parse_would(
    instance_key: KeyHandle, kind: str, body: dict[str, Any]
) -> None:
    with pytest.raises(EventFormatError):
        sign_event(instance_key, kind, body, now=1)
