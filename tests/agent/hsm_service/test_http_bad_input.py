"""Bad input at every route of a real HSM service process: a 4xx with a code, never a
5xx, and nothing changes (the key keeps its one use, is not destroyed or generated)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.hsm_service import auth
from agent.hsm_service.client import HsmClient
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from tests.agent.hsm_service.hsmprocess import HsmServiceProcess, capability

#: (route, resource, action) of every authenticated POST route.
POSTS = [
    ("/v1/keys/hsm-sign/sign", "hsm:keys/hsm-sign", "hsm/sign"),
    ("/v1/keys/hsm-sign/ecdh", "hsm:keys/hsm-sign", "hsm/ecdh"),
    ("/v1/keys/hsm-sign/generate", "hsm:keys/hsm-sign", "hsm/generate"),
    ("/v1/keys/hsm-sign/destroy", "hsm:keys/hsm-sign", "hsm/destroy"),
    ("/v1/keys/hsm-sign/approval-claims", "hsm:keys/hsm-sign", "hsm/approve"),
    ("/v1/policy", "hsm:service", "hsm/policy"),
    ("/v1/policy/approval-claims", "hsm:service", "hsm/policy"),
]
BODIES: list[bytes] = [
    b"",
    b'{"payload": "aGVsbG',  # truncated
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b"[]",
    b'"a string"',
    b"{}",
    b'{"payload": 42}',
    b'{"payload": "!!!not base64url!!!"}',
    b'{"payload": "aGk", "approvals": "many"}',
    b'{"payload": "aGk", "approvals": [{"approver_id": 1}]}',
    b'{"payload": "aGk", "nonce": 7}',
    b'{"payload": "aGk", "nonce": "short"}',
    b'{"payload": "aGk", "expires": -1}',
    b'{"payload": "aGk", "unknown": true}',
    b'{"payload": "aGk", "payload": "aGk"}',  # duplicate member
    b'{"peer": "aGk"}',
    b'{"algorithm": 5}',
    b'{"operation": "melt", "nonce": "aaaaaaaaaaaaaaaaaaaa"}',
    b'{"operation": "sign", "payload": "aGk", "nonce": "aaaaaaaaaaaaaaaaaaaa", "lifetime": 0}',
    b'{"change": [], "nonce": "aaaaaaaaaaaaaaaaaaaa"}',
    b'{"a": ' * 200 + b"1" + b"}" * 200,  # deep nesting
]


@pytest.fixture
def service(
    write_config: Any, tmp_path: Path, operators: dict[str, Any]
) -> Iterator[HsmServiceProcess]:
    process = HsmServiceProcess(
        write_config(
            {"hsm-sign": {"max-uses": 1, "operations": ["sign", "destroy"]}},
            extra={"policy-changes": {"quorum": {"m": 1, "approvers": ["alice"]}}},
        ),
        tmp_path,
    )
    yield process
    process.stop()


def signed_post(
    url: str, holder: KeyHandle, bundle: Any, route: str, resource: str, action: str, body: bytes
) -> httpx.Response:
    headers = auth.authorization_headers(
        holder,
        bundle,
        audience="test-hsm",
        method="POST",
        target=route,
        body=body,
        resource=resource,
        action=action,
    )
    return httpx.post(url + route, content=body, headers=headers, timeout=30)


def test_bad_bodies_at_every_route(
    service: HsmServiceProcess, client_keys: dict[str, KeyHandle]
) -> None:
    holder = client_keys["alice-app"]
    bundle = capability(client_keys["admin"], holder, uses=1000)
    seen: set[str] = set()
    for route, resource, action in POSTS:
        for body in BODIES:
            response = signed_post(service.url, holder, bundle, route, resource, action, body)
            where = f"{route} {body[:40]!r}"
            assert 400 <= response.status_code < 500, (where, response.text)
            error = response.json()["error"]
            assert isinstance(error["code"], str) and error["code"], where
            seen.add(error["code"])
        huge = b'{"payload": "' + b"A" * (2 * 1024 * 1024) + b'"}'
        response = signed_post(service.url, holder, bundle, route, resource, action, huge)
        assert response.status_code == 413, route
        assert response.json()["error"]["code"] == "body_too_large"
    assert "bad_request" in seen
    # Nothing happened: the key still has its single use and was not destroyed.
    client = HsmClient(service.url, holder, bundle)
    assert client.key("hsm-sign")["state"] == "active"
    client.sign("hsm-sign", b"still here")


def test_unauthenticated_and_malformed_credentials(service: HsmServiceProcess) -> None:
    routes = [("GET", "/v1/keys"), ("GET", "/v1/keys/hsm-sign"), ("GET", "/v1/audit/head")]
    routes += [("POST", route) for route, _, _ in POSTS]
    header_sets: list[dict[str, str]] = [
        {},
        {"authorization": "Bearer secret"},
        {"authorization": "Janus-Invocation x.y.z", "janus-capability": "!!"},
        {"authorization": "Janus-Invocation x.y.z", "janus-capability": b64url.encode(b"{}")},
        {"authorization": "Janus-Invocation", "janus-capability": "e30"},
        {"authorization": "Janus-Invocation a", "janus-capability": "A" * 20000},
    ]
    for method, route in routes:
        for headers in header_sets:
            response = httpx.request(
                method, service.url + route, headers=headers, content=b"{}", timeout=30
            )
            assert 400 <= response.status_code < 500, (method, route, headers, response.text)
            assert response.json()["error"]["code"]


def test_moved_or_replayed_invocation_is_refused(
    service: HsmServiceProcess, client_keys: dict[str, KeyHandle]
) -> None:
    holder = client_keys["alice-app"]
    # Two uses: had the two moved attempts below counted, the genuine one would fail.
    bundle = capability(client_keys["admin"], holder, uses=2)
    body = json.dumps({"payload": b64url.encode(b"one")}).encode()
    route, resource, action = POSTS[0]
    headers = auth.authorization_headers(
        holder,
        bundle,
        audience="test-hsm",
        method="POST",
        target=route,
        body=body,
        resource=resource,
        action=action,
    )
    # Another body under the same invocation: the digest no longer matches.
    other = json.dumps({"payload": b64url.encode(b"two")}).encode()
    moved = httpx.post(service.url + route, content=other, headers=headers)
    assert moved.status_code == 403, moved.text
    # Another route (destroy) under the invocation made for sign.
    moved = httpx.post(service.url + "/v1/keys/hsm-sign/destroy", content=body, headers=headers)
    assert moved.status_code == 403, moved.text
    first = httpx.post(service.url + route, content=body, headers=headers)
    assert first.status_code == 200, first.text
    replay = httpx.post(service.url + route, content=body, headers=headers)
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "replayed"


def test_bad_policy_change_is_refused(
    service: HsmServiceProcess, client_keys: dict[str, KeyHandle], operators: dict[str, Any]
) -> None:
    holder = client_keys["alice-app"]
    client = HsmClient(service.url, holder, capability(client_keys["admin"], holder))
    change = {"key": 5}
    request = client.policy_approval_request(change, nonce="n" * 20, lifetime=60)
    approvals = [operators["alice"].approve(request.claims)]
    with pytest.raises(Exception) as exc:
        client.change_policy(
            change, approvals=approvals, nonce=request.nonce, expires=request.expires
        )
    assert 400 <= getattr(exc.value, "status", 0) < 500, exc.value
    client.sign("hsm-sign", b"policy unchanged")


def test_unknown_routes_and_methods(service: HsmServiceProcess) -> None:
    assert httpx.get(service.url + "/v1/nothing").json()["error"]["code"] == "no_route"
    response = httpx.delete(service.url + "/v1/keys")
    assert response.status_code == 405
    bad_label = httpx.get(service.url + "/v1/keys/..%2f..%2fetc")
    assert 400 <= bad_label.status_code < 500
