"""Invitations: file, janus: URI and QR forms; strict parsing with typed errors."""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from agent.relationships.delivery import Address
from agent.relationships.invitation import (
    BadInvitationError,
    Invitation,
    InvitationExpiredError,
)
from agent.relationships.prekeys import PrekeyStore
from agent.relationships.suite import Suite
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle


def _key(provider: Any, uri: str, alg: Algorithm) -> KeyHandle:
    try:
        handle: KeyHandle = provider.find(uri)
    except Exception:
        handle = provider.generate(uri, alg)
    return handle


@pytest.fixture
def keys(pkcs11_provider: Any, key_name: str) -> tuple[KeyHandle, KeyHandle]:
    root = _key(pkcs11_provider, f"pkcs11:token=janus-test;object={key_name}-root", Algorithm.ES256)
    agree = _key(
        pkcs11_provider, f"pkcs11:token=janus-test;object={key_name}-agree", Algorithm.X25519
    )
    return root, agree


def address() -> Address:
    return Address(
        "https://recv.example",
        b64url.encode(secrets.token_bytes(16)),
        b64url.encode(secrets.token_bytes(32)),
    )


def make(keys: tuple[KeyHandle, KeyHandle], tmp_path: Path, *, ttl: int = 3600) -> Invitation:
    root, agree = keys
    bundle = PrekeyStore(tmp_path / "prekeys", Suite.X25519).publish(
        root, agree, one_time=0, one_time_pq=0, ttl=ttl
    )
    return Invitation.create(
        root,
        invitation_id=secrets.token_urlsafe(16),
        bundle=bundle,
        address=address(),
        expires=bundle.expires,
    )


def test_every_form_parses_back(keys: tuple[KeyHandle, KeyHandle], tmp_path: Path) -> None:
    invitation = make(keys, tmp_path)
    for form in (invitation.to_file(), invitation.to_uri(), invitation.to_uri().encode()):
        parsed = Invitation.parse(form)
        assert parsed.id == invitation.id and parsed.address == invitation.address
        assert parsed.inviter == keys[0].did
    drawn = invitation.qr_terminal()
    assert drawn.count("\n") > 20
    written = invitation.qr_png(tmp_path / "invite.png")
    assert written and all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_expired_invitation_says_what_to_do(
    keys: tuple[KeyHandle, KeyHandle], tmp_path: Path
) -> None:
    invitation = make(keys, tmp_path, ttl=120)
    with pytest.raises(InvitationExpiredError, match="ask its sender for a new one"):
        Invitation.parse(invitation.to_file(), now=invitation.expires + 1)


def _resign(keys: tuple[KeyHandle, KeyHandle], invitation: Invitation, **changes: Any) -> str:
    from policies.jws import sign_compact

    payload = json.loads(base64.urlsafe_b64decode(invitation.jws.split(".")[1] + "=="))
    payload.update(changes)
    return sign_compact(keys[0], {"typ": "janus-rel-invitation+jws"}, payload)


def test_swapped_address_does_not_verify(keys: tuple[KeyHandle, KeyHandle], tmp_path: Path) -> None:
    invitation = make(keys, tmp_path)
    header, payload, signature = invitation.jws.split(".")
    changed = json.loads(base64.urlsafe_b64decode(payload + "=="))
    changed["address"] = address().to_dict()
    forged_payload = b64url.encode(json.dumps(changed).encode())
    with pytest.raises(BadInvitationError):
        Invitation.from_jws(f"{header}.{forged_payload}.{signature}")


@pytest.mark.parametrize(
    "change",
    [
        {"type": "https://example.org/other"},
        {"id": "short"},
        {"expires": "soon"},
        {"extra": 1},
        {"address": {"service": "https://x.example"}},
        {"bundle": {"root_did": "x"}},
    ],
)
def test_bad_members_are_typed_errors(
    keys: tuple[KeyHandle, KeyHandle], tmp_path: Path, change: dict[str, Any]
) -> None:
    invitation = make(keys, tmp_path)
    with pytest.raises(BadInvitationError):
        Invitation.from_jws(_resign(keys, invitation, **change))


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"\xff\xfe",
        b"hello",
        b"[]",
        b'{"type": "https://janus.dev/rel/1.0/invitation"}',
        b'{"type": "https://janus.dev/rel/1.0/invitation", "invitation": 5}',
        b'{"type": "x", "invitation": "a.b.c"}',
        b'{"type": "https://janus.dev/rel/1.0/invitation", "invitation": "a.b.c"}',
        b"janus:other?v=1",
        b"janus:invitation?v=2&jws=a.b.c",
        b"janus:invitation?v=1&jws=a.b.c&x=1",
        b"janus:invitation?v=1&v=1&jws=a",
        b"janus:invitation?v=1",
        b"janus:invitation?v=1&jws=a.b.c",
        b"{" + b" " * 40000 + b"}",
    ],
)
def test_garbage_is_a_typed_error(text: bytes) -> None:
    with pytest.raises(BadInvitationError):
        Invitation.parse(text)
