"""The HSM service's HTTP API against a real ``janus hsm serve`` process.

Every client request is a signed invocation of an administrator's capability; the
engine's policy refusals arrive with their code and reason; quorum works through the
service's own approval claims.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)

from agent.hsm_service.auth import (
    AUTH_SCHEME,
    CAPABILITY_HEADER,
    AuthError,
    encode_bundle,
    presented,
)
from agent.hsm_service.client import HsmClient, HsmClientError, new_nonce
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle, raw_to_der
from tests.agent.hsm_service.hsmprocess import (
    HsmServiceProcess,
    approved,
    capability,
    client,
    key_ability,
)

Started = Callable[..., HsmServiceProcess]


@pytest.fixture
def start_service(write_config: Callable[..., Path], tmp_path: Path) -> Iterator[Started]:
    """``start_service(keys, **config options)``: a service process, stopped after."""
    started: list[HsmServiceProcess] = []

    def start(keys: dict[str, Any], **options: Any) -> HsmServiceProcess:
        process = HsmServiceProcess(write_config(keys, **options), tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def verify_es256(public_key_b64: str, signature: bytes, data: bytes) -> None:
    public = load_der_public_key(b64url.decode(public_key_b64))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(raw_to_der(signature, 32), data, ec.ECDSA(hashes.SHA256()))


def refusal(exc: pytest.ExceptionInfo[HsmClientError]) -> tuple[int, str, str | None]:
    return exc.value.status, exc.value.code, exc.value.reason


def test_list_show_sign_and_audit_head(
    start_service: Started, client_keys: dict[str, KeyHandle], clients: dict[str, str]
) -> None:
    service = start_service({"hsm-sign": {}, "hsm-ed": {"clients": [clients["bob-app"]]}})
    alice = client(service.url, client_keys["admin"], client_keys["alice-app"])
    keys = alice.list_keys()
    assert [k["label"] for k in keys] == ["hsm-sign"]  # bob's key is not even named
    view = alice.key("hsm-sign")
    assert view["alg"] == "ES256" and view["state"] == "active" and view["quorum"] == 0
    assert "pin" not in str(view).lower()
    signature = alice.sign("hsm-sign", b"hello")
    verify_es256(view["public_key"], signature, b"hello")
    head = alice.audit_head()
    assert head["statement"]["seq"] >= 1
    health = httpx.get(f"{service.url}/healthz").json()
    assert health == {"status": "ok", "service": "test-hsm"}
    assert "/v1/keys/{label}/sign" in httpx.get(f"{service.url}/openapi.json").json()["paths"]
    assert "janus_hsm_operations" in httpx.get(f"{service.url}/metrics").text


def test_every_policy_refusal_has_its_code(
    start_service: Started, client_keys: dict[str, KeyHandle], clients: dict[str, str]
) -> None:
    service = start_service(
        {
            "hsm-sign": {"max-uses": 1},
            "hsm-ed": {"state": "deactivated"},
            "hsm-ecdh": {"operations": ["ecdh"]},
        }
    )
    admin = client_keys["admin"]
    alice = client(service.url, admin, client_keys["alice-app"])
    bob = client(service.url, admin, client_keys["bob-app"])
    cases: list[tuple[Callable[[], Any], tuple[int, str, str | None]]] = [
        (lambda: bob.sign("hsm-sign", b"x"), (403, "hsm_refused", "client_not_allowed")),
        (lambda: alice.sign("nope", b"x"), (404, "hsm_refused", "unknown_key")),
        (lambda: alice.sign("hsm-ed", b"x"), (403, "hsm_refused", "key_state")),
        (lambda: alice.sign("hsm-ecdh", b"x"), (403, "hsm_refused", "operation_not_allowed")),
    ]
    for call, expected in cases:
        with pytest.raises(HsmClientError) as exc:
            call()
        assert refusal(exc)[1:] == expected[1:], exc.value
        assert refusal(exc)[0] == expected[0] or expected[2] == "key_state"
    alice.sign("hsm-sign", b"first")
    with pytest.raises(HsmClientError) as exc:
        alice.sign("hsm-sign", b"second")
    assert refusal(exc)[1:] == ("hsm_refused", "max_uses")


def test_rate_limit_refusal(start_service: Started, client_keys: dict[str, KeyHandle]) -> None:
    service = start_service(
        {"hsm-x25519": {"operations": ["ecdh"], "rate": {"count": 1, "per-seconds": 3600}}}
    )
    alice = client(service.url, client_keys["admin"], client_keys["alice-app"])
    peer_der = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    assert len(alice.ecdh("hsm-x25519", peer_der)) == 32
    with pytest.raises(HsmClientError) as exc:
        alice.ecdh("hsm-x25519", peer_der)
    assert refusal(exc) == (429, "hsm_refused", "rate_limited")


def test_client_authentication_refusals(
    start_service: Started, client_keys: dict[str, KeyHandle], clients: dict[str, str]
) -> None:
    service = start_service({"hsm-sign": {}})
    admin, alice_key = client_keys["admin"], client_keys["alice-app"]
    # No credentials at all.
    bare = httpx.get(f"{service.url}/v1/keys")
    assert bare.status_code == 403 and bare.json()["error"]["code"] == "hsm_unauthenticated"
    # A capability granted by someone who is not an administrator.
    stranger = HsmClient(service.url, alice_key, capability(client_keys["bob-app"], alice_key))
    with pytest.raises(HsmClientError) as exc:
        stranger.list_keys()
    assert exc.value.code == "wrong_root"
    # A capability for another key's abilities only.
    narrow = client(service.url, admin, alice_key, abilities=[key_ability("other")])
    with pytest.raises(HsmClientError) as exc:
        narrow.sign("hsm-sign", b"x")
    assert exc.value.code == "not_authorized"
    # Use limit of the capability itself.
    limited = client(service.url, admin, alice_key, uses=1)
    limited.sign("hsm-sign", b"x")
    with pytest.raises(HsmClientError) as exc:
        limited.sign("hsm-sign", b"x")
    assert exc.value.status == 429
    # Expired capability (issued long enough ago to be past the verifier's skew).
    expired = client(service.url, admin, alice_key, ttl=60, now=int(time.time()) - 600)
    with pytest.raises(HsmClientError) as exc:
        expired.sign("hsm-sign", b"x")
    assert exc.value.code == "expired"


def test_quorum_through_http(
    start_service: Started, client_keys: dict[str, KeyHandle], operators: dict[str, Any]
) -> None:
    quorum = {"m": 2, "approvers": ["alice", "bob", "carol"]}
    service = start_service({"hsm-sign": {"quorum": quorum}})
    alice = client(service.url, client_keys["admin"], client_keys["alice-app"])
    ops = operators
    view = alice.key("hsm-sign")
    assert view["quorum"] == 2
    body = {"payload": b64url.encode(b"wire 1M")}

    def refused_with(reason: str, **quorum_args: Any) -> None:
        with pytest.raises(HsmClientError) as exc:
            alice.sign("hsm-sign", b"wire 1M", **quorum_args)
        assert (exc.value.code, exc.value.reason) == ("hsm_refused", reason), exc.value

    refused_with("quorum_required")
    refused_with("quorum_required", **approved(alice, [ops["alice"]], "hsm-sign", "sign", body))
    twice = approved(alice, [ops["alice"], ops["alice"]], "hsm-sign", "sign", body)
    refused_with("quorum_required", **twice)
    other = approved(
        alice, [ops["alice"], ops["bob"]], "hsm-sign", "sign", {"payload": b64url.encode(b"x")}
    )
    refused_with("quorum_invalid", **other)
    short = approved(alice, [ops["alice"], ops["bob"]], "hsm-sign", "sign", body, lifetime=1)
    time.sleep(1.5)
    refused_with("quorum_invalid", **short)

    # What the approvers saw: the service's claims for exactly this request.
    request = alice.approval_request("hsm-sign", "sign", body, nonce="n" * 24, lifetime=60)
    claims = request.claims
    assert claims["operation"] == "sign" and claims["key"] == "hsm-sign"
    assert claims["requester"] == client_keys["alice-app"].did
    assert request.required == 2
    assert {i for i, _ in request.approvers} == {"alice", "bob", "carol"}

    good = approved(alice, [ops["bob"], ops["carol"]], "hsm-sign", "sign", body)
    signature = alice.sign("hsm-sign", b"wire 1M", **good)
    verify_es256(view["public_key"], signature, b"wire 1M")
    refused_with("approval_reused", **good)


def test_revocation_through_the_ledger(
    start_service: Started, client_keys: dict[str, KeyHandle]
) -> None:
    from policies.revocation import sign_revocation

    service = start_service({"hsm-sign": {}})
    admin, holder = client_keys["admin"], client_keys["alice-app"]
    bundle = capability(admin, holder)
    alice = HsmClient(service.url, holder, bundle)
    alice.sign("hsm-sign", b"before")
    record = sign_revocation(admin, revoked_id=bundle.leaf.id, now=int(time.time()))
    # Only a signer in the chain may revoke: the holder's own key is not one.
    forged = sign_revocation(client_keys["bob-app"], revoked_id=bundle.leaf.id, now=0)
    body = {"revocation": forged, "bundle": bundle.to_dict()}
    assert httpx.post(f"{service.url}/v1/revocations", json=body).status_code == 403
    alice.sign("hsm-sign", b"still valid")
    body = {"revocation": record, "bundle": bundle.to_dict()}
    answer = httpx.post(f"{service.url}/v1/revocations", json=body)
    assert answer.status_code == 201 and answer.json()["revoked"] == bundle.leaf.id
    assert httpx.post(f"{service.url}/v1/revocations", json=body).status_code == 200
    with pytest.raises(HsmClientError) as exc:
        alice.sign("hsm-sign", b"after")
    assert exc.value.code == "revoked"


def test_approval_claims_for_a_key_without_quorum_are_refused(
    start_service: Started, client_keys: dict[str, KeyHandle]
) -> None:
    quorum = {"m": 1, "approvers": ["alice"], "operations": ["destroy"]}
    service = start_service({"hsm-sign": {"operations": ["sign", "destroy"], "quorum": quorum}})
    alice = client(service.url, client_keys["admin"], client_keys["alice-app"])
    body = {"payload": b64url.encode(b"x")}
    with pytest.raises(HsmClientError) as exc:
        alice.approval_request("hsm-sign", "sign", body, nonce="n" * 20, lifetime=60)
    assert exc.value.status == 400 and "needs no approvals" in str(exc.value)
    request = alice.approval_request("hsm-sign", "destroy", {}, nonce="n" * 20, lifetime=60)
    assert request.required == 1 and [i for i, _ in request.approvers] == ["alice"]
    alice.sign("hsm-sign", b"no approval needed to sign")


def test_generate_and_destroy_through_http(
    start_service: Started,
    client_keys: dict[str, KeyHandle],
    key_name: str,
    hsm_provider: Any,
    hsm_token: Any,
) -> None:
    from janus_hsm.algorithms import Algorithm
    from janus_hsm.errors import KeyNotFoundError

    made, doomed = f"gen-{key_name}"[:60], f"old-{key_name}"[:60]
    doomed_uri = f"pkcs11:token={hsm_token.label};object={doomed}"
    hsm_provider.generate(doomed_uri, Algorithm.ES256)
    service = start_service(
        {
            made: {"operations": ["generate", "sign"], "algorithm": "ES256"},
            doomed: {"operations": ["sign", "destroy"], "state": "deactivated"},
        }
    )
    alice = client(service.url, client_keys["admin"], client_keys["alice-app"])
    before = alice.key(made)
    assert before["public_key"] is None and before["alg"] == "ES256"
    with pytest.raises(HsmClientError) as exc:
        alice.perform(made, "generate", {"algorithm": "EdDSA"})
    assert exc.value.status == 400 and "configured as ES256" in str(exc.value)
    view = alice.perform(made, "generate", {"algorithm": "ES256"})
    assert view["public_key"] and view["did"]
    verify_es256(view["public_key"], alice.sign(made, b"new key"), b"new key")
    on_token = hsm_provider.lookup(f"pkcs11:token={hsm_token.label};object={made}")
    assert on_token.did == view["did"]
    with pytest.raises(HsmClientError) as exc:  # it exists now
        alice.perform(made, "generate", {})
    assert 400 <= exc.value.status < 500

    assert alice.perform(doomed, "destroy", {}) == {"label": doomed, "destroyed": True}
    assert alice.key(doomed)["state"] == "destroyed"
    with pytest.raises(KeyNotFoundError):
        hsm_provider.lookup(doomed_uri)
    with pytest.raises(HsmClientError) as exc:
        alice.perform(doomed, "destroy", {})
    assert exc.value.reason == "key_state"


def test_policy_change_with_approvals_through_http(
    start_service: Started,
    client_keys: dict[str, KeyHandle],
    clients: dict[str, str],
    operators: dict[str, Any],
) -> None:
    service = start_service(
        {"hsm-sign": {}},
        extra={"policy-changes": {"quorum": {"m": 2, "approvers": ["alice", "bob", "carol"]}}},
    )
    admin = client_keys["admin"]
    alice = client(service.url, admin, client_keys["alice-app"])
    bob = client(service.url, admin, client_keys["bob-app"])
    with pytest.raises(HsmClientError) as exc:
        bob.sign("hsm-sign", b"not yet")
    assert exc.value.reason == "client_not_allowed"
    change = {"action": "add-client", "key": "hsm-sign", "client": clients["bob-app"]}
    request = alice.policy_approval_request(change, nonce=new_nonce(), lifetime=120)
    assert request.claims["operation"] == "policy-change" and request.required == 2
    one = [operators["alice"].approve(request.claims)]
    with pytest.raises(HsmClientError) as exc:
        alice.change_policy(change, approvals=one, nonce=request.nonce, expires=request.expires)
    assert exc.value.reason == "quorum_required"
    assert bob.list_keys() == []  # still nothing for bob
    two = [*one, operators["carol"].approve(request.claims)]
    answer = alice.change_policy(
        change, approvals=two, nonce=request.nonce, expires=request.expires
    )
    assert answer == {"changed": True}
    bob.sign("hsm-sign", b"bob is a client now")


def test_capability_header_is_strict_base64url(client_keys: dict[str, KeyHandle]) -> None:
    """One spelling per bundle: characters outside base64url are refused, not skipped."""
    bundle = capability(client_keys["admin"], client_keys["alice-app"])
    headers = {"authorization": f"{AUTH_SCHEME} a.b.c"}
    encoded = encode_bundle(bundle)
    assert presented({**headers, CAPABILITY_HEADER.lower(): encoded}).bundle.leaf.id == (
        bundle.leaf.id
    )
    padded = encoded + "=" * (-len(encoded) % 4)  # the padded spelling is the same bytes
    assert presented({**headers, CAPABILITY_HEADER.lower(): padded}).bundle.leaf.id == (
        bundle.leaf.id
    )
    middle = len(encoded) // 2
    for bad in (
        encoded[:middle] + "!" + encoded[middle:],
        encoded[:middle] + " " + encoded[middle:],
        encoded + "+",
        "=" + encoded,
    ):
        with pytest.raises(AuthError) as exc:
            presented({**headers, CAPABILITY_HEADER.lower(): bad})
        assert exc.value.code == "hsm_unauthenticated"
        assert "base64url" in str(exc.value)
