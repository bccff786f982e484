"""The principal's DID document, derived from its hardware keys."""

from __future__ import annotations

from pathlib import Path

from agent.edge.agent import EdgeAgent
from agent.edge.identity import did_document, did_url
from hardware.softhsm import SoftHSMToken
from janus_hsm.public_keys import from_did_key, from_jwk


def test_did_document_lists_signing_and_agreement_keys(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    edge, _ = EdgeAgent.init(tmp_path / "edge", softhsm_token.uri())
    doc = edge.did_document()
    assert doc["id"] == edge.did
    assert doc["authentication"] == [did_url(edge.root)]
    assert doc["keyAgreement"] == [did_url(edge.agreement)]
    methods = {m["id"]: m for m in doc["verificationMethod"]}
    assert from_jwk(methods[did_url(edge.root)]["publicKeyJwk"]) == from_did_key(edge.did)
    assert methods[did_url(edge.agreement)]["controller"] == edge.did
    # Without a separate agreement key, a P-256 root agrees keys itself (ECDH in token).
    alone = did_document(edge.root)
    assert alone["keyAgreement"] == [did_url(edge.root)]


def test_init_is_idempotent(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    first, _ = EdgeAgent.init(tmp_path / "edge", softhsm_token.uri())
    again, created = EdgeAgent.init(tmp_path / "edge", softhsm_token.uri())
    assert not created
    assert again.did == first.did
    reopened = EdgeAgent.open(tmp_path / "edge")
    assert reopened.did == first.did
