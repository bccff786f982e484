"""The cloud agent's logic with a SoftHSM owner root (the HTTP layer is tested apart)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.service import CloudAgent, CloudConfig
from agent.errors import GrantInactiveError
from agent.evidence import verify_evidence
from agent.protocol import KEYREQ_TYP, PICKUP_TYP, sign_request
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.capability import Bundle
from policies.errors import (
    CaveatFailedError,
    FormatError,
    RevokedError,
    VerificationError,
)
from policies.invocation import invoke
from policies.issue import grant
from policies.revocation import sign_revocation
from tests.policies.keys import software_keys

PAYMENTS = Ability(
    "janus:payments/eur",
    "sign/payment",
    ({"field": "amount", "le": 10000}, {"field": "currency", "eq": "EUR"}),
)


@pytest.fixture(scope="module")
def owner(pkcs11_provider: Pkcs11Provider) -> KeyHandle:
    uri = "pkcs11:object=cloud-owner"
    try:
        return pkcs11_provider.find(uri)
    except KeyNotFoundError:  # first use in this session
        return pkcs11_provider.generate(uri, Algorithm.ES256)


@pytest.fixture
def cloud(tmp_path: Path, owner: KeyHandle) -> Iterator[CloudAgent]:
    agent = CloudAgent(
        CloudConfig(
            state_dir=tmp_path / "cloud", passphrase_source=lambda: "cloud pass", owner=owner.did
        )
    )
    yield agent
    agent.close()


def new_grant(
    cloud: CloudAgent,
    owner: KeyHandle,
    *,
    uses: int = 5,
    ttl: int = 600,
    abilities: list[Ability] | None = None,
    depth: int = 0,
) -> tuple[str, Bundle]:
    now = int(time.time())
    request = sign_request(owner, typ=KEYREQ_TYP, audience=cloud.did, now=now)
    record = cloud.create_grant(request)
    bundle = grant(
        owner,
        audience=record.did,
        abilities=abilities or [PAYMENTS],
        ttl_seconds=ttl,
        uses=uses,
        depth=depth,
        now=now,
    )
    cloud.install(record.grant_id, bundle.to_json())
    return record.grant_id, bundle


def pay(cloud: CloudAgent, grant_id: str, amount: int) -> dict[str, Any]:
    return cloud.act(
        grant_id,
        "sign/payment",
        "janus:payments/eur",
        {"amount": amount, "currency": "EUR", "to": "alice"},
    ).result


def test_five_payments_then_refused_and_key_destroyed(cloud: CloudAgent, owner: KeyHandle) -> None:
    grant_id, _ = new_grant(cloud, owner, uses=5)
    key_uri = cloud.store.grant(grant_id).key_uri
    evidence = [pay(cloud, grant_id, 1000 * (i + 1))["evidence"] for i in range(5)]
    for item in evidence:
        verified = verify_evidence(json.loads(json.dumps(item)), root=owner.did)
        assert verified.principal == owner.did
        assert verified.action == "sign/payment"
    with pytest.raises(GrantInactiveError, match="used up"):
        pay(cloud, grant_id, 100)
    assert cloud.store.grant(grant_id).status == "destroyed"
    with pytest.raises(KeyNotFoundError):
        cloud.keys.find(key_uri)


def test_response_body_splices_the_prerendered_bundle_faithfully(
    cloud: CloudAgent, owner: KeyHandle
) -> None:
    """to_json renders the grant's bundle once; the body must equal a plain rendering."""
    grant_id, _ = new_grant(cloud, owner, uses=5)
    awkward = {"amount": 5, "currency": "EUR", "to": 'a"}},"bundle":{}}\u2028é\\'}
    result = cloud.act(grant_id, "sign/payment", "janus:payments/eur", awkward)
    assert result.bundle_text is not None  # the grant's own bundle: spliced
    plain = {"action": result.action, "grant_id": result.grant_id, **result.result}
    body = json.loads(result.to_json())
    assert body == json.loads(json.dumps(plain))
    assert body["evidence"]["payload"] == awkward
    assert verify_evidence(body["evidence"], root=owner.did).payload == awkward
    without = dataclasses.replace(result, bundle_text=None)
    assert json.loads(without.to_json()) == body


def test_over_limit_amount_refused_without_spending(cloud: CloudAgent, owner: KeyHandle) -> None:
    grant_id, bundle = new_grant(cloud, owner, uses=5)
    with pytest.raises(CaveatFailedError):
        pay(cloud, grant_id, 20000)
    assert cloud.ledger.uses(bundle.leaf.id) == 0
    pay(cloud, grant_id, 10000)
    assert cloud.ledger.uses(bundle.leaf.id) == 1


def test_tampered_evidence_fails(cloud: CloudAgent, owner: KeyHandle) -> None:
    grant_id, _ = new_grant(cloud, owner)
    evidence = pay(cloud, grant_id, 500)["evidence"]
    for change in (
        {"amount": 50000, "currency": "EUR", "to": "alice"},
        {"amount": 500, "currency": "EUR", "to": "mallory"},
    ):
        forged = {**evidence, "payload": change}
        with pytest.raises(VerificationError):
            verify_evidence(forged, root=owner.did)
    with pytest.raises(VerificationError):
        verify_evidence(evidence, root=cloud.did)  # wrong root
    with pytest.raises(FormatError):
        verify_evidence({"typ": "something-else"})


def test_revocation_destroys_the_key_at_once(cloud: CloudAgent, owner: KeyHandle) -> None:
    grant_id, bundle = new_grant(cloud, owner)
    pay(cloud, grant_id, 1)
    record = sign_revocation(owner, revoked_id=bundle.leaf.id, now=int(time.time()))
    result = cloud.revoke(record)
    assert result["destroyed"] == [grant_id]
    with pytest.raises(GrantInactiveError, match="revoked"):
        pay(cloud, grant_id, 1)


def test_revocation_between_a_counted_use_and_its_action_reports_inactive(
    cloud: CloudAgent, owner: KeyHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is destroyed the moment the revocation arrives, even under a request in
    flight: that request gets the stable 'grant_inactive' (no keystore details), and
    its use stays counted."""
    grant_id, bundle = new_grant(cloud, owner)
    record = sign_revocation(owner, revoked_id=bundle.leaf.id, now=int(time.time()))
    counted = cloud.ledger.spend_one

    def spend_then_revoke(request: Any) -> Any:
        receipt = counted(request)
        cloud.revoke(record)  # lands after the commit, before the signature
        return receipt

    monkeypatch.setattr(cloud.ledger, "spend_one", spend_then_revoke)
    with pytest.raises(GrantInactiveError, match="in flight") as caught:
        pay(cloud, grant_id, 1)
    assert "soft:" not in str(caught.value) and "keys" not in str(caught.value)
    assert cloud.ledger.uses(bundle.leaf.id) == 1
    assert cloud.store.grant(grant_id).status == "destroyed"
    assert grant_id not in cloud._unlocked


def test_an_expired_grant_acts_not_even_within_the_verifiers_skew(
    cloud: CloudAgent, owner: KeyHandle
) -> None:
    """Other parties' clocks get 60 s of skew; the agent's own grant ends at its expiry
    (another instance may have destroyed the key already), and is then retired."""
    # The grant is stamped in whole seconds, so it lasts between ttl - 1 and ttl seconds:
    # 3 leaves the first payment ample time on a busy machine.
    grant_id, bundle = new_grant(cloud, owner, ttl=3)
    key_uri = cloud.store.grant(grant_id).key_uri
    expires = cloud.store.grant(grant_id).expires_at
    assert expires is not None
    pay(cloud, grant_id, 1)
    time.sleep(max(0.0, expires - time.time()) + 0.1)  # past expiry, well within the skew
    with pytest.raises(GrantInactiveError, match="expired"):
        pay(cloud, grant_id, 1)
    assert cloud.ledger.uses(bundle.leaf.id) == 1
    assert cloud.store.grant(grant_id).status == "destroyed"
    with pytest.raises(KeyNotFoundError):
        cloud.keys.find(key_uri)


def test_without_an_owner_no_one_can_claim_anothers_mailbox(tmp_path: Path) -> None:
    """An agent anyone may grant to takes a root's word only for the root's own DID:
    a stranger naming the victim's key-agreement DID in its evidence gets no mail."""
    from agent.cloud.inbound import receive_forward
    from agent.didcomm import Message, pack_anoncrypt, wrap_forward
    from agent.errors import NotFoundError

    keys = software_keys(tmp_path / "k", {"mallory": Algorithm.EdDSA, "victim-x": Algorithm.X25519})
    mallory, victim = keys["mallory"], keys["victim-x"]
    open_agent = CloudAgent(
        CloudConfig(state_dir=tmp_path / "cloud", passphrase_source=lambda: "cloud pass")
    )
    try:
        record = open_agent.create_grant(None)
        bundle = grant(
            mallory,
            audience=record.did,
            abilities=[Ability("janus:mailbox", "msg/receive")],
            ttl_seconds=600,
            uses=10,
            evidence={"keyAgreement": [victim.did]},
            now=int(time.time()),
        )
        open_agent.install(record.grant_id, bundle.to_json())
        inner = pack_anoncrypt(Message(id="m1", type="t", body={}, to=(victim.did,)), [victim.did])
        forward = wrap_forward(inner, to=victim.did, routing_keys=[open_agent.routing_key.did])
        with pytest.raises(NotFoundError, match="no mailbox grant"):
            receive_forward(open_agent, forward.encode())
        # The root's own DID still has its mailbox.
        own = wrap_forward(inner, to=mallory.did, routing_keys=[open_agent.routing_key.did])
        assert receive_forward(open_agent, own.encode())["for"] == mallory.did
    finally:
        open_agent.close()


def test_an_installed_capability_is_not_replaced(cloud: CloudAgent, owner: KeyHandle) -> None:
    """Anyone holding a delegable capability from the owner could otherwise swap a
    narrower chain in under the owner's grant; a retry of the same one is answered."""
    from agent.errors import ConflictError

    grant_id, bundle = new_grant(cloud, owner, depth=1)
    assert cloud.install(grant_id, bundle.to_json()).status == "active"  # the same: fine
    record = cloud.store.grant(grant_id)
    narrower = grant(
        owner,
        audience=record.did,
        abilities=[PAYMENTS],
        ttl_seconds=60,
        uses=1,
        now=int(time.time()),
    )
    with pytest.raises(ConflictError, match="already has its capability"):
        cloud.install(grant_id, narrower.to_json())
    assert cloud.store.grant(grant_id).bundle == record.bundle


def test_a_grant_ended_by_another_instance_is_reported_inactive(
    cloud: CloudAgent, owner: KeyHandle, tmp_path: Path
) -> None:
    # A second process on the same state (SQLite ledger and keystore): the first one
    # keeps the grant's key unlocked between requests, so it must learn of the end
    # from the ledger's refusal, say "inactive", and forget the key.
    grant_id, bundle = new_grant(cloud, owner)
    pay(cloud, grant_id, 1)
    other = CloudAgent(
        CloudConfig(
            state_dir=tmp_path / "cloud", passphrase_source=lambda: "cloud pass", owner=owner.did
        )
    )
    try:
        record = sign_revocation(owner, revoked_id=bundle.leaf.id, now=int(time.time()))
        assert other.revoke(record)["destroyed"] == [grant_id]
    finally:
        other.close()
    with pytest.raises(GrantInactiveError, match="revoked"):
        pay(cloud, grant_id, 1)
    assert grant_id not in cloud._unlocked
    assert cloud.ledger.uses(bundle.leaf.id) == 1


def test_sweep_forgets_keys_destroyed_elsewhere(
    cloud: CloudAgent, owner: KeyHandle, tmp_path: Path
) -> None:
    grant_id, bundle = new_grant(cloud, owner)
    pay(cloud, grant_id, 1)
    assert grant_id in cloud._unlocked
    other = CloudAgent(
        CloudConfig(
            state_dir=tmp_path / "cloud", passphrase_source=lambda: "cloud pass", owner=owner.did
        )
    )
    try:
        other.revoke(sign_revocation(owner, revoked_id=bundle.leaf.id, now=int(time.time())))
    finally:
        other.close()
    cloud.sweep()
    assert grant_id not in cloud._unlocked


def test_a_revoked_capability_cannot_be_installed(cloud: CloudAgent, owner: KeyHandle) -> None:
    now = int(time.time())
    record = cloud.create_grant(sign_request(owner, typ=KEYREQ_TYP, audience=cloud.did, now=now))
    bundle = grant(
        owner, audience=record.did, abilities=[PAYMENTS], ttl_seconds=600, uses=5, now=now
    )
    cloud.ledger.revoke(bundle.leaf.id, record="test", data={"by": "test"})
    with pytest.raises(RevokedError):
        cloud.install(record.grant_id, bundle.to_json())
    assert cloud.store.grant(record.grant_id).status == "pending"


def test_only_the_owner_may_request_keys(cloud: CloudAgent, tmp_path: Path) -> None:
    stranger = software_keys(tmp_path / "k", {"s": Algorithm.EdDSA})["s"]
    request = sign_request(stranger, typ=KEYREQ_TYP, audience=cloud.did, now=int(time.time()))
    with pytest.raises(VerificationError, match="owner"):
        cloud.create_grant(request)
    with pytest.raises(VerificationError):
        cloud.create_grant(None)


def test_bundle_for_another_key_or_root_is_refused(
    cloud: CloudAgent, owner: KeyHandle, tmp_path: Path
) -> None:
    now = int(time.time())
    record = cloud.create_grant(sign_request(owner, typ=KEYREQ_TYP, audience=cloud.did, now=now))
    other = software_keys(tmp_path / "k", {"o": Algorithm.EdDSA})["o"]
    wrong_audience = grant(
        owner, audience=other.did, abilities=[PAYMENTS], ttl_seconds=60, uses=1, now=now
    )
    with pytest.raises(Exception, match="not to this grant's key"):
        cloud.install(record.grant_id, wrong_audience.to_json())
    wrong_root = grant(
        other, audience=record.did, abilities=[PAYMENTS], ttl_seconds=60, uses=1, now=now
    )
    with pytest.raises(VerificationError):
        cloud.install(record.grant_id, wrong_root.to_json())


def test_delegate_then_external_holder_invokes(
    cloud: CloudAgent, owner: KeyHandle, tmp_path: Path
) -> None:
    worker = software_keys(tmp_path / "k", {"w": Algorithm.ES256})["w"]
    grant_id, _ = new_grant(
        cloud,
        owner,
        uses=5,
        depth=1,
        abilities=[PAYMENTS, Ability("janus:payments/eur", "cap/delegate")],
    )
    delegated = cloud.act(
        grant_id,
        "cap/delegate",
        "janus:payments/eur",
        {
            "to": worker.did,
            "can": "sign/payment",
            "with": "janus:payments/eur",
            "ttl": "5m",
            "uses": 2,
        },
    ).result["bundle"]
    child = Bundle.parse(json.dumps(delegated))
    assert child.leaf.audience == worker.did
    request = {"amount": 700, "currency": "EUR"}
    inv = invoke(
        worker,
        capability_id=child.leaf.id,
        action="sign/payment",
        resource="janus:payments/eur",
        request=request,
        now=int(time.time()),
        audience=cloud.did,
    )
    result = cloud.invoke_external(json.dumps(delegated), inv, request)
    verified = verify_evidence(result.result["evidence"], root=owner.did)
    assert verified.holder == worker.did and verified.signer == cloud.store.grant(grant_id).did
    with pytest.raises(Exception, match="nonce"):
        cloud.invoke_external(json.dumps(delegated), inv, request)  # replay


def test_messages_are_held_until_acknowledged(cloud: CloudAgent, owner: KeyHandle) -> None:
    grant_id, _ = new_grant(
        cloud, owner, uses=10, abilities=[Ability("janus:mailbox", "msg/receive")]
    )
    envelope = {"protected": "x", "recipients": [], "iv": "a", "ciphertext": "b", "tag": "c"}
    for _ in range(3):
        cloud.act(grant_id, "msg/receive", "janus:mailbox", {"message": envelope})

    def pickup(ack: list[str]) -> dict[str, Any]:
        return cloud.pickup(
            sign_request(owner, typ=PICKUP_TYP, audience=cloud.did, now=int(time.time()), ack=ack)
        )

    first = pickup([])
    assert len(first["messages"]) == 3 and first["remaining"] == 3
    again = pickup([])  # not acknowledged: still there
    assert [m["id"] for m in again["messages"]] == [m["id"] for m in first["messages"]]
    done = pickup([m["id"] for m in first["messages"]])
    assert done["acknowledged"] == 3 and done["remaining"] == 0


def test_send_message_on_the_owners_behalf(
    cloud: CloudAgent, owner: KeyHandle, tmp_path: Path
) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from agent.didcomm import unpack

    recipient = software_keys(tmp_path / "r", {"bob": Algorithm.X25519})["bob"]
    received: list[bytes] = []

    class Inbox(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(202)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Inbox)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}/inbox"
    try:
        grant_id, _ = new_grant(
            cloud,
            owner,
            uses=2,
            abilities=[
                Ability("janus:outbox", "msg/send", ({"field": "endpoint", "prefix": endpoint},))
            ],
        )
        sent = cloud.act(
            grant_id,
            "msg/send",
            "janus:outbox",
            {"to": recipient.did, "endpoint": endpoint, "body": {"text": "from the cloud"}},
        )
        assert sent.result["status"] == 202
        opened = unpack(received[0], [recipient])
        assert opened.message.body == {"text": "from the cloud"}
        with pytest.raises(CaveatFailedError):  # the caveat pins the destination
            cloud.act(
                grant_id,
                "msg/send",
                "janus:outbox",
                {"to": recipient.did, "endpoint": "http://127.0.0.1:9/x", "body": {}},
            )
    finally:
        server.shutdown()


def test_openapi_describes_every_route(cloud: CloudAgent) -> None:
    from agent.cloud.http import build_app
    from agent.cloud.openapi import OPENAPI
    from agent.cloud.receiving import ReceivingService
    from agent.cloud.sending import SendingService

    receiving, sending = ReceivingService(cloud), SendingService(cloud)
    try:
        app = build_app(cloud, receiving=receiving, sending=sending)  # every route there is
    finally:
        sending.stop()
        receiving.close()
        cloud.actions.clear()
    routes = {r.path.replace("{action:path}", "{action}") for r in app.routes}  # type: ignore[attr-defined]
    assert routes == set(OPENAPI["paths"])


def test_concurrent_actions_never_lose_a_paid_use(cloud: CloudAgent, owner: KeyHandle) -> None:
    """Racing requests: exactly the limit succeeds, the rest are refused, none crash."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.errors import AgentError
    from policies.errors import PolicyError

    grant_id, bundle = new_grant(cloud, owner, uses=5)
    outcomes: list[str] = []

    def attempt(n: int) -> None:
        try:
            pay(cloud, grant_id, n + 1)
            outcomes.append("ok")
        except (AgentError, PolicyError) as exc:
            outcomes.append(type(exc).__name__)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(attempt, range(24)))
    assert outcomes.count("ok") == 5, outcomes
    assert set(outcomes) - {"ok"} <= {"LimitExceededError", "GrantInactiveError"}, outcomes
    assert cloud.ledger.uses(bundle.leaf.id) == 5
    assert cloud.store.grant(grant_id).status == "destroyed"
