"""Malformed input on every route of the receiving and sending services: a typed 4xx.

The same broken bodies as tests/agent/cloud/test_malformed_requests.py, plus members
that are wrong for these routes, posted to a real agent serving both services; every
answer is a JSON error with a ``code``, no use of the grant is counted, nothing is
stored, and the agent stays healthy.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from agent.relationships.delivery import SENDING_RESOURCE, SUBMIT_ACTION, ReceivingClient
from hardware.softhsm import SoftHSMToken
from janus_hsm.public_keys import b64url_encode
from policies.abilities import Ability
from tests.agent.cloud.test_malformed_requests import RAW_BODIES, WRONG_TYPES, assert_refused

SEALED = b64url_encode(b"\x01" + os.urandom(104))
SERVICE_WRONG: dict[str, object] = {
    **WRONG_TYPES,
    "sealed int": {"sealed": 5, "ciphertext": "AAAA"},
    "sealed not b64": {"sealed": "!!", "ciphertext": "AAAA"},
    "sealed short": {"sealed": "AAAA", "ciphertext": "AAAA"},
    "sealed junk": {"sealed": SEALED, "ciphertext": "AAAA"},
    "sealed bad version": {"sealed": b64url_encode(b"\x07" + os.urandom(104)), "ciphertext": "AA"},
    "ciphertext empty": {"sealed": SEALED, "ciphertext": ""},
    "ciphertext list": {"sealed": SEALED, "ciphertext": []},
    "extra member": {"sealed": SEALED, "ciphertext": "AAAA", "from": "someone"},
    "grant id int": {"grant_id": 5, "request": {}},
    "grant unknown": {"grant_id": "nope", "request": {}},
    "request list": {"grant_id": "nope", "request": []},
}


@pytest.fixture(scope="module")
def edge(softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory) -> EdgeAgent:
    state = tmp_path_factory.mktemp("edge")
    EdgeAgent.init(state, softhsm_token.uri())
    with (state / "policy.toml").open("a") as policy:
        policy.write(
            '\n[[rule]]\nname = "sending"\naudiences = ["*"]\n'
            'abilities = [{ can = "msg/submit", with = "janus:sending" }]\n'
            'max_ttl = "1h"\nmax_uses = 100\n'
        )
    return EdgeAgent.open(state)


@pytest.fixture(scope="module")
def cloud(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    process = CloudProcess(
        tmp_path_factory.mktemp("cloud"),
        owner=edge.did,
        extra_args=["--receiving", "--sending", "--sending-allow-host", "127.0.0.1"],
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def grant_id(edge: EdgeAgent, cloud: CloudProcess) -> str:
    ability = Ability(SENDING_RESOURCE, SUBMIT_ACTION)
    return str(edge.grant(cloud.url, [ability], ttl_seconds=600, uses=100)["grant_id"])


@pytest.fixture(scope="module")
def routes(grant_id: str) -> list[tuple[str, str]]:
    return [
        ("POST", "/v1/receiving/addresses"),
        ("POST", "/v1/receiving/retire"),
        ("POST", "/v1/receiving/pickup"),
        ("POST", "/v1/receiving/ack"),
        ("POST", "/v1/receiving/deliveries"),
        ("POST", "/v1/sending/submissions"),
        ("POST", f"/v1/grants/{grant_id}/actions/msg/submit"),
    ]


def unchanged(cloud: CloudProcess, edge: EdgeAgent, grant_id: str) -> None:
    """Healthy, nothing stored, and no use of the grant counted."""
    assert cloud.process.poll() is None, cloud.output()
    assert httpx.get(f"{cloud.url}/healthz", timeout=10).json()["status"] == "ok"
    for name, table in (("receiving.db", "deliveries"), ("sending.db", "submissions")):
        db = sqlite3.connect(cloud.state_dir / name)
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0  # noqa: S608
        db.close()
    ledger = sqlite3.connect(cloud.state_dir / "cloud.db")
    assert ledger.execute("SELECT COALESCE(SUM(uses), 0) FROM janus_links").fetchone()[0] == 0
    ledger.close()


@pytest.mark.parametrize("kind", sorted(RAW_BODIES))
def test_raw_malformed_bodies(
    cloud: CloudProcess, edge: EdgeAgent, grant_id: str, routes: list[tuple[str, str]], kind: str
) -> None:
    with httpx.Client(base_url=cloud.url, timeout=30) as client:
        for method, path in routes:
            answer = client.request(method, path, content=RAW_BODIES[kind])
            assert_refused(answer, f"{method} {path} with {kind}")
    unchanged(cloud, edge, grant_id)


@pytest.mark.parametrize("kind", sorted(SERVICE_WRONG))
def test_wrongly_typed_members(
    cloud: CloudProcess, edge: EdgeAgent, grant_id: str, routes: list[tuple[str, str]], kind: str
) -> None:
    body = json.dumps(SERVICE_WRONG[kind]).encode()
    with httpx.Client(base_url=cloud.url, timeout=30) as client:
        for method, path in routes:
            answer = client.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
            assert_refused(answer, f"{method} {path} with {kind}")
    unchanged(cloud, edge, grant_id)


BAD_SUBMITS: dict[str, dict[str, object]] = {
    "missing ciphertext": {"receiving": "http://127.0.0.1:9", "sealed": SEALED},
    "sealed short": {"receiving": "http://127.0.0.1:9", "sealed": "AAAA", "ciphertext": "AA"},
    "ftp url": {"receiving": "ftp://127.0.0.1", "sealed": SEALED, "ciphertext": "AAAA"},
    "private host": {"receiving": "https://10.1.2.3", "sealed": SEALED, "ciphertext": "AAAA"},
    "localhost": {"receiving": "https://localhost", "sealed": SEALED, "ciphertext": "AAAA"},
    "http public": {"receiving": "http://example.com", "sealed": SEALED, "ciphertext": "AAAA"},
    "url with user": {"receiving": "https://u:p@example.com", "sealed": SEALED, "ciphertext": "A"},
    "delay negative": {
        "receiving": "http://127.0.0.1:9",
        "sealed": SEALED,
        "ciphertext": "AAAA",
        "delay": -1,
    },
    "delay float": {
        "receiving": "http://127.0.0.1:9",
        "sealed": SEALED,
        "ciphertext": "AAAA",
        "delay": 1.5,
    },
    "delay huge": {
        "receiving": "http://127.0.0.1:9",
        "sealed": SEALED,
        "ciphertext": "AAAA",
        "delay": 10**9,
    },
    "unknown member": {
        "receiving": "http://127.0.0.1:9",
        "sealed": SEALED,
        "ciphertext": "AAAA",
        "to": "someone",
    },
}


@pytest.mark.parametrize("kind", sorted(BAD_SUBMITS))
def test_bad_submissions_count_no_use(
    cloud: CloudProcess, edge: EdgeAgent, grant_id: str, kind: str
) -> None:
    for path, body in (
        ("/v1/sending/submissions", {"grant_id": grant_id, "request": BAD_SUBMITS[kind]}),
        (
            f"/v1/grants/{grant_id}/actions/msg/submit",
            {"resource": SENDING_RESOURCE, "request": BAD_SUBMITS[kind]},
        ),
    ):
        answer = httpx.post(f"{cloud.url}{path}", json=body, timeout=30)
        assert_refused(answer, f"{path} with {kind}")
    unchanged(cloud, edge, grant_id)


def test_status_of_unknown_submissions(cloud: CloudProcess) -> None:
    for submission in ("x", "A" * 22, "%2e%2e", "A" * 500):
        answer = httpx.get(f"{cloud.url}/v1/sending/submissions/{submission}", timeout=10)
        assert_refused(answer, submission)
        assert answer.json()["error"]["code"] in ("submission_unknown", "no_route")


def test_signed_request_for_another_route_is_refused(edge: EdgeAgent, cloud: CloudProcess) -> None:
    client = ReceivingClient(cloud.url)
    held = client.create_address(edge.root)
    signed = client._signed(edge.root, "pickup", pickup_id=held.pickup_id)
    answer = httpx.post(f"{cloud.url}/v1/receiving/retire", json=signed, timeout=10)
    assert answer.status_code == 403
    again = httpx.post(f"{cloud.url}/v1/receiving/pickup", json=signed, timeout=10)
    assert again.status_code == 200
    replay = httpx.post(f"{cloud.url}/v1/receiving/pickup", json=signed, timeout=10)
    assert replay.status_code == 403
