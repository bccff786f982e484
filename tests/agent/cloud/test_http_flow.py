"""The whole story against a real cloud-agent process on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.didcomm import Message, pack_anoncrypt, wrap_forward
from agent.edge.agent import EdgeAgent
from hardware.softhsm import SoftHSMToken
from janus_hsm.errors import JanusHSMError
from policies.abilities import Ability

PAYMENTS = Ability(
    "janus:payments/eur",
    "sign/payment",
    ({"field": "amount", "le": 10000}, {"field": "currency", "eq": "EUR"}),
)
MAILBOX = Ability("janus:mailbox", "msg/receive")


@pytest.fixture(scope="module")
def edge(softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory) -> EdgeAgent:
    agent, _ = EdgeAgent.init(tmp_path_factory.mktemp("edge"), softhsm_token.uri())
    return agent


@pytest.fixture(scope="module")
def cloud(edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    process = CloudProcess(tmp_path_factory.mktemp("cloud"), owner=edge.did)
    yield process
    process.stop()


def pay(cloud: CloudProcess, grant_id: str, amount: int) -> httpx.Response:
    return httpx.post(
        f"{cloud.url}/v1/grants/{grant_id}/actions/sign/payment",
        json={
            "resource": "janus:payments/eur",
            "request": {"amount": amount, "currency": "EUR", "to": "alice"},
        },
        timeout=30,
    )


def test_payments_limits_evidence_and_revocation(
    edge: EdgeAgent, cloud: CloudProcess, tmp_path: Path
) -> None:
    granted = edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=5)
    grant_id = granted["grant_id"]
    for amount in (1000, 2000, 3000, 4000):
        assert pay(cloud, grant_id, amount).status_code == 200
    too_big = pay(cloud, grant_id, 20000)
    assert too_big.status_code == 403
    assert too_big.json()["error"]["code"] == "caveat_failed"
    fifth = pay(cloud, grant_id, 5000)
    assert fifth.status_code == 200
    sixth = pay(cloud, grant_id, 100)
    assert sixth.status_code in (410, 429)
    assert sixth.json()["error"]["code"] in ("grant_inactive", "uses_exhausted")

    evidence = tmp_path / "evidence.json"
    evidence.write_text(json.dumps(fifth.json()["evidence"]))
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "edge",
            "verify",
            str(evidence),
            "--root",
            edge.did,
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["payload"]["amount"] == 5000

    second = edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=5)
    assert pay(cloud, second["grant_id"], 100).status_code == 200
    revoked = edge.revoke(second["grant_id"])
    assert revoked["destroyed"] == [second["grant_id"]]
    after = pay(cloud, second["grant_id"], 100)
    assert after.status_code == 410
    status = httpx.get(f"{cloud.url}/v1/grants/{second['grant_id']}").json()
    assert status["status"] == "destroyed" and status["reason"] == "revoked"


def test_messages_held_for_an_offline_owner_then_picked_up(
    edge: EdgeAgent, cloud: CloudProcess
) -> None:
    edge.grant(cloud.url, [MAILBOX], ttl_seconds=600, uses=100)
    routing_key = httpx.get(f"{cloud.url}/v1/did").json()["routing_key"]
    owner_key = edge.agreement.did
    text = f"hello while you were away {uuid.uuid4()}"
    message = Message(
        id=str(uuid.uuid4()),
        type="https://janus.dev/messages/1.0/note",
        body={"text": text},
        to=(owner_key,),
    )
    envelope = wrap_forward(
        pack_anoncrypt(message, [owner_key]), to=owner_key, routing_keys=[routing_key]
    )
    posted = httpx.post(
        f"{cloud.url}/v1/didcomm",
        content=envelope.encode(),
        headers={"content-type": "application/didcomm-encrypted+json"},
    )
    assert posted.status_code == 202, posted.text
    picked = edge.pickup(cloud.url)
    assert [m["message"]["body"]["text"] for m in picked] == [text]
    assert edge.pickup(cloud.url) == []  # acknowledged, so deleted


def test_bad_requests_get_json_errors(cloud: CloudProcess) -> None:
    huge = httpx.post(f"{cloud.url}/v1/invoke", content=b"{" + b" " * 70000 + b"}")
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "bad_request"
    garbage = httpx.post(f"{cloud.url}/v1/invoke", content=b"not json")
    assert garbage.status_code == 400
    missing = httpx.get(f"{cloud.url}/v1/grants/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    unsigned = httpx.post(f"{cloud.url}/v1/grants", json={})
    assert unsigned.status_code == 403


def test_a_request_that_is_not_unicode_text_is_refused_and_not_counted(
    edge: EdgeAgent, cloud: CloudProcess
) -> None:
    """A lone surrogate is valid JSON syntax but cannot be signed or hashed: 400, not 500."""
    grant_id = edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=5)["grant_id"]
    body = b'{"resource": "janus:payments/eur", "request": {"amount": 5, "to": "\\ud800"}}'
    refused = httpx.post(
        f"{cloud.url}/v1/grants/{grant_id}/actions/sign/payment",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "bad_format"  # as for any malformed JSON
    assert "lone surrogate" in refused.json()["error"]["message"]
    counted = pay(cloud, grant_id, 5)
    assert counted.status_code == 200 and list(counted.json()["uses"].values()) == [1]


def test_health_metrics_and_openapi(cloud: CloudProcess) -> None:
    assert httpx.get(f"{cloud.url}/healthz").json()["status"] == "ok"
    metrics = httpx.get(f"{cloud.url}/metrics").text
    assert "janus_cloud_requests_total" in metrics
    spec: dict[str, Any] = httpx.get(f"{cloud.url}/openapi.json").json()

    paths = set(spec["paths"])
    assert {
        "/v1/grants",
        "/v1/grants/{grant_id}/actions/{action}",
        "/v1/didcomm",
        "/v1/pickup",
        "/v1/revocations",
        "/healthz",
        "/metrics",
    } <= paths


def test_external_invocations_forged_replayed_and_over_limit(
    edge: EdgeAgent, cloud: CloudProcess, tmp_path: Path
) -> None:
    import time

    from janus_hsm.algorithms import Algorithm
    from policies.capability import Bundle
    from policies.invocation import invoke
    from tests.policies.keys import software_keys

    keys = software_keys(tmp_path / "k", {"worker": Algorithm.EdDSA, "thief": Algorithm.EdDSA})
    worker, thief = keys["worker"], keys["thief"]
    granted = edge.grant(
        cloud.url,
        [PAYMENTS, Ability("janus:payments/eur", "cap/delegate")],
        ttl_seconds=600,
        uses=10,
        depth=1,
    )
    delegated = httpx.post(
        f"{cloud.url}/v1/grants/{granted['grant_id']}/actions/cap/delegate",
        json={
            "resource": "janus:payments/eur",
            "request": {
                "to": worker.did,
                "can": "sign/payment",
                "with": "janus:payments/eur",
                "ttl": "5m",
                "uses": 2,
            },
        },
    ).json()["bundle"]
    leaf = Bundle.parse(json.dumps(delegated)).leaf
    agent_did = httpx.get(f"{cloud.url}/v1/did").json()["did"]

    def call(signer: Any, request: dict[str, Any], invocation: str | None = None) -> Any:
        inv = invocation or invoke(
            signer,
            capability_id=leaf.id,
            action="sign/payment",
            resource="janus:payments/eur",
            request=request,
            now=int(time.time()),
            audience=agent_did,
        )
        return httpx.post(
            f"{cloud.url}/v1/invoke",
            json={"bundle": delegated, "invocation": inv, "request": request},
        ), inv

    ok, inv = call(worker, {"amount": 10, "currency": "EUR"})
    assert ok.status_code == 200, ok.text
    replay, _ = call(worker, {"amount": 10, "currency": "EUR"}, inv)
    assert replay.status_code == 409 and replay.json()["error"]["code"] == "replayed"
    forged, _ = call(thief, {"amount": 10, "currency": "EUR"})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "wrong_holder"
    tampered, _ = call(
        worker,
        {"amount": 10, "currency": "EUR"},
        inv[:-4] + ("AAAA" if not inv.endswith("AAAA") else "BBBB"),
    )
    assert tampered.status_code in (400, 403)
    second, _ = call(worker, {"amount": 20, "currency": "EUR"})
    assert second.status_code == 200
    elsewhere = invoke(
        worker,
        capability_id=leaf.id,
        action="sign/payment",
        resource="janus:payments/eur",
        request={"amount": 5, "currency": "EUR"},
        now=int(time.time()),
        audience="did:key:z6MkOtherVerifier",
    )
    misaddressed, _ = call(worker, {"amount": 5, "currency": "EUR"}, elsewhere)
    assert misaddressed.status_code == 403
    over, _ = call(worker, {"amount": 30, "currency": "EUR"})
    assert over.status_code == 429 and over.json()["error"]["code"] == "uses_exhausted"


def test_ed25519_rooted_identity_grants_and_receives(
    softhsm_token: SoftHSMToken, cloud: CloudProcess, tmp_path: Path
) -> None:
    """An EdDSA root signs; its X25519 key on the same token receives messages."""
    from janus_hsm.algorithms import Algorithm

    ed_edge, _ = EdgeAgent.init(
        tmp_path / "ed-edge", softhsm_token.uri(), root_algorithm=Algorithm.EdDSA, name="ed"
    )
    assert ed_edge.root.algorithm is Algorithm.EdDSA
    assert ed_edge.did_document()["keyAgreement"][0].startswith(ed_edge.agreement.did)
    # This cloud agent accepts only the module's ES256 owner: its own owner check refuses.
    with pytest.raises(Exception, match="owner"):
        ed_edge.grant(cloud.url, [MAILBOX], ttl_seconds=60, uses=1)
    own = CloudProcess(tmp_path / "ed-cloud", owner=ed_edge.did)
    try:
        ed_edge.grant(own.url, [MAILBOX], ttl_seconds=600, uses=10)
        routing_key = httpx.get(f"{own.url}/v1/did").json()["routing_key"]
        to = ed_edge.agreement.did
        message = Message(
            id=str(uuid.uuid4()),
            type="https://janus.dev/messages/1.0/note",
            body={"text": "to an Ed25519 principal"},
            to=(to,),
        )
        envelope = wrap_forward(pack_anoncrypt(message, [to]), to=to, routing_keys=[routing_key])
        assert httpx.post(f"{own.url}/v1/didcomm", content=envelope.encode()).status_code == 202
        picked = ed_edge.pickup(own.url)
        assert all("error" not in m for m in picked), picked
        assert [m["message"]["body"]["text"] for m in picked] == ["to an Ed25519 principal"]
    finally:
        own.stop()
    with pytest.raises(Exception, match="not ES256"):
        EdgeAgent.init(tmp_path / "other", softhsm_token.uri(), name="ed")


def test_api_token_guards_grant_actions(edge: EdgeAgent, tmp_path: Path) -> None:
    token_file = tmp_path / "api-token"
    token_file.write_text("s3cret-api-token\n")
    token_file.chmod(0o600)
    guarded = CloudProcess(tmp_path / "guarded", owner=edge.did, api_token_file=token_file)
    try:
        granted = edge.grant(guarded.url, [PAYMENTS], ttl_seconds=600, uses=5)
        url = f"{guarded.url}/v1/grants/{granted['grant_id']}/actions/sign/payment"
        body = {"resource": "janus:payments/eur", "request": {"amount": 1, "currency": "EUR"}}
        assert httpx.post(url, json=body).status_code == 401
        wrong = httpx.post(url, json=body, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        ok = httpx.post(url, json=body, headers={"authorization": "Bearer s3cret-api-token"})
        assert ok.status_code == 200
        assert httpx.get(f"{guarded.url}/v1/grants/{granted['grant_id']}").json()["status"] == (
            "active"
        )
    finally:
        guarded.stop()


def test_attestation_is_asked_of_the_root_before_the_cloud_agent(edge: EdgeAgent) -> None:
    # SoftHSM has no attestation: the grant fails before any key is requested (the URL
    # below would refuse a connection, which would be a different error).
    with pytest.raises(JanusHSMError) as caught:
        edge.grant("http://127.0.0.1:9", [PAYMENTS], ttl_seconds=60, uses=1, attest=True)
    assert caught.value.code == "attestation_unavailable"


def test_key_errors_reach_clients_as_a_code_without_keystore_details() -> None:
    from agent.http_service import error_response
    from janus_hsm.errors import KeyNotFoundError

    response = error_response(
        KeyNotFoundError("soft:dir=/srv/cloud/keys;object=grant-x was deleted")
    )
    body = json.loads(bytes(response.body))
    assert response.status_code == 500
    assert body["error"]["code"] == "key_not_found"
    assert "/srv" not in body["error"]["message"] and "grant-x" not in body["error"]["message"]
