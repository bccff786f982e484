"""Malformed input on every route of a real cloud agent: a 4xx with a stable code.

Every kind of broken body (empty, truncated, not JSON, not UTF-8, the wrong JSON type,
members of the wrong type, too deep, too large) is posted to every route that takes one;
each answer must be a JSON error with a ``code`` and a 4xx status, and the agent must
still be healthy and able to serve afterwards.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from agent.protocol import PICKUP_TYP, sign_request
from hardware.softhsm import SoftHSMToken
from policies.abilities import Ability

MAILBOX = Ability("janus:mailbox", "msg/receive")
PAYMENTS = Ability("janus:payments/eur", "sign/payment")

RAW_BODIES: dict[str, bytes] = {
    "empty": b"",
    "truncated": b'{"request": "ey',
    "not json": b"not json",
    "invalid utf-8": b"\xff\xfe\xfa",
    "utf-8 bom": b'\xef\xbb\xbf{"request": "x"}',
    "lone surrogate": b'{"request": "\\ud800"}',
    "empty object": b"{}",
    "array": b"[]",
    "number": b"5",
    "string": b'"x"',
    "null": b"null",
    "duplicate members": b'{"request": "a", "request": "b"}',
    "nan": b'{"request": NaN}',
    "float": b'{"limit": 1.5}',
    "huge number": b'{"limit": ' + b"9" * 5000 + b"}",
    "deep nesting": b"[" * 50_000 + b"]" * 50_000,
    "deep object": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "oversize": b'{"request": "' + b"x" * 70_000 + b'"}',
    "nul bytes": b'{"request": "\x00"}',
}

# Objects whose members have the wrong types, for every member some route reads.
WRONG_TYPES: dict[str, object] = {
    "request int": {"request": 5},
    "request list": {"request": ["a"]},
    "request object": {"request": {"a": 1}},
    "request bad jws": {"request": "a.b.c"},
    "request empty jws": {"request": ".."},
    "limit bool": {"request": "a.b.c", "limit": True},
    "limit string": {"request": "a.b.c", "limit": "10"},
    "limit negative": {"request": "a.b.c", "limit": -1},
    "limit huge": {"request": "a.b.c", "limit": 10**30},
    "resource int": {"resource": 5, "request": {}},
    "resource ok, request string": {"resource": "janus:mailbox", "request": "x"},
    "resource ok, request list": {"resource": "janus:mailbox", "request": []},
    "bundle int": {"bundle": 5, "invocation": "x", "request": {}},
    "bundle empty": {"bundle": {}, "invocation": "a.b.c", "request": {}},
    "bundle wrong members": {"bundle": {"chain": 5}, "invocation": "a.b.c", "request": {}},
    "bundle chain list of junk": {
        "bundle": {"chain": [1, None, {}], "evidence": []},
        "invocation": "a.b.c",
        "request": {},
    },
    "invocation list": {"bundle": {"chain": []}, "invocation": [], "request": {}},
    "record int": {"record": 5},
    "record junk": {"record": "a.b.c"},
    "record object": {"record": {"a": 1}},
    "didcomm jwe junk": {
        "protected": "e30",
        "recipients": [{"header": {"kid": 5}, "encrypted_key": ""}],
        "iv": 1,
        "ciphertext": None,
        "tag": [],
    },
    "didcomm jws junk": {"payload": "e30", "signatures": [{"protected": 1, "signature": 2}]},
    "didcomm plaintext": {"id": "1", "type": "x", "body": {}},
}


@pytest.fixture(scope="module")
def edge(softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory) -> EdgeAgent:
    agent, _ = EdgeAgent.init(tmp_path_factory.mktemp("edge"), softhsm_token.uri())
    return agent


@pytest.fixture(scope="module")
def cloud(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    process = CloudProcess(tmp_path_factory.mktemp("cloud"), owner=edge.did)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def routes(edge: EdgeAgent, cloud: CloudProcess) -> list[tuple[str, str]]:
    """Every route that reads a body, with real grant ids (pending and active)."""
    active = edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=100)["grant_id"]
    mailbox = edge.grant(cloud.url, [MAILBOX], ttl_seconds=600, uses=100)["grant_id"]
    pending = httpx.post(f"{cloud.url}/v1/grants", json={"request": None}).json()
    assert pending["error"]["code"] in {"invalid", "bad_request"}  # the owner must sign
    return [
        ("POST", "/v1/grants"),
        ("PUT", f"/v1/grants/{active}/bundle"),
        ("PUT", "/v1/grants/unknown/bundle"),
        ("POST", f"/v1/grants/{active}/actions/sign/payment"),
        ("POST", f"/v1/grants/{mailbox}/actions/msg/receive"),
        ("POST", f"/v1/grants/{active}/actions/msg/send"),
        ("POST", f"/v1/grants/{active}/actions/cap/delegate"),
        ("POST", f"/v1/grants/{active}/actions/no/such"),
        ("POST", "/v1/grants/unknown/actions/sign/payment"),
        ("POST", "/v1/invoke"),
        ("POST", "/v1/didcomm"),
        ("POST", "/v1/pickup"),
        ("POST", "/v1/revocations"),
    ]


def assert_refused(response: httpx.Response, what: str) -> None:
    assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.text}"
    body = response.json()
    code = body["error"]["code"]
    assert isinstance(code, str) and code, f"{what}: {body}"
    assert isinstance(body["error"]["message"], str)


def healthy(cloud: CloudProcess) -> None:
    assert cloud.process.poll() is None, cloud.output()
    assert httpx.get(f"{cloud.url}/healthz", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("kind", sorted(RAW_BODIES))
def test_raw_malformed_bodies_on_every_route(
    cloud: CloudProcess, routes: list[tuple[str, str]], kind: str
) -> None:
    with httpx.Client(base_url=cloud.url, timeout=30) as client:
        for method, path in routes:
            answer = client.request(method, path, content=RAW_BODIES[kind])
            assert_refused(answer, f"{method} {path} with {kind}")
    healthy(cloud)


@pytest.mark.parametrize("kind", sorted(WRONG_TYPES))
def test_wrongly_typed_members_on_every_route(
    cloud: CloudProcess, routes: list[tuple[str, str]], kind: str
) -> None:
    body = json.dumps(WRONG_TYPES[kind]).encode()
    with httpx.Client(base_url=cloud.url, timeout=30) as client:
        for method, path in routes:
            answer = client.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
            assert_refused(answer, f"{method} {path} with {kind}")
    healthy(cloud)


def raw_request(cloud: CloudProcess, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes httpx would refuse to send; the answer, whole (the server closes)."""
    with socket.create_connection(("127.0.0.1", cloud.port), timeout=10) as conn:
        conn.sendall(head + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_a_lying_content_length_is_refused(cloud: CloudProcess) -> None:
    for declared in (b"abc", b"-1"):  # refused by the HTTP parser itself
        answer = raw_request(cloud, b"POST /v1/didcomm HTTP/1.1\r\nContent-Length: " + declared)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    too_big = raw_request(cloud, b"POST /v1/didcomm HTTP/1.1\r\nContent-Length: 1000000000")
    assert too_big.startswith(b"HTTP/1.1 400 ") and b'"code":"bad_request"' in too_big
    healthy(cloud)


def test_an_oversize_chunked_body_is_refused_while_read(cloud: CloudProcess) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 4096

    for method, path in (("POST", "/v1/didcomm"), ("PUT", "/v1/grants/x/bundle")):
        answer = httpx.request(method, f"{cloud.url}{path}", content=chunks(), timeout=30)
        assert_refused(answer, f"chunked {path}")
        assert answer.json()["error"]["code"] == "bad_request"
    healthy(cloud)


def test_a_bundle_that_is_not_utf8_is_refused_as_such(
    cloud: CloudProcess, routes: list[tuple[str, str]]
) -> None:
    path = next(p for m, p in routes if m == "PUT" and "unknown" not in p)
    answer = httpx.put(f"{cloud.url}{path}", content=b'{"chain": ["\xff"]}')
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "code": "bad_request",
        "message": "request body is not UTF-8 text",
    }


def test_a_pickup_limit_must_be_a_number(edge: EdgeAgent, cloud: CloudProcess) -> None:
    agent_did = httpx.get(f"{cloud.url}/v1/did").json()["did"]
    signed = sign_request(edge.root, typ=PICKUP_TYP, audience=agent_did, now=int(time.time()))
    answer = httpx.post(f"{cloud.url}/v1/pickup", json={"request": signed, "limit": True})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_request"


def test_unknown_routes_and_methods_answer_json_errors(cloud: CloudProcess) -> None:
    missing = httpx.get(f"{cloud.url}/v1/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_route"
    wrong = httpx.get(f"{cloud.url}/v1/didcomm")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    healthy(cloud)


def test_the_agent_still_serves_after_the_garbage(
    edge: EdgeAgent, cloud: CloudProcess, routes: list[tuple[str, str]]
) -> None:
    granted = edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=1)
    signed = httpx.post(
        f"{cloud.url}/v1/grants/{granted['grant_id']}/actions/sign/payment",
        json={"resource": "janus:payments/eur", "request": {"amount": 5}},
        timeout=30,
    )
    assert signed.status_code == 200, signed.text
