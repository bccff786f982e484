"""The sync envelope, the sync-key certificate and the batch summary: strict parsing."""

from __future__ import annotations

import json

import pytest

from agent.sync.group_errors import BadSyncKeyCertificateError, MalformedEnvelopeError
from agent.sync.ids import new_conversation_id
from agent.sync.messages import Message
from agent.sync.records import MessageRecord, RecordType, ids_records, pack_batch
from agent.sync.sync_key import CERT_TYP, SyncKey, certify, parse_certificate
from agent.sync.transport import Envelope, parse_envelope, summarize, worth_sending
from janus_hsm import b64url
from policies.jws import sign_compact

ROOT, KEY = SyncKey.generate(), SyncKey.generate()


def test_a_certificate_binds_the_sync_key_to_the_root() -> None:
    cert = certify(ROOT, KEY, now=1_700_000_000)
    parsed = parse_certificate(cert.compact)
    assert (parsed.root_did, parsed.sync_did, parsed.issued) == (ROOT.did, KEY.did, 1_700_000_000)


def _tampered(compact: str) -> str:
    head, payload, sig = compact.split(".")
    body = json.loads(b64url.decode(payload))
    body["sub"] = SyncKey.generate().did  # another key, under the root's signature
    return ".".join([head, b64url.encode(json.dumps(body).encode()), sig])


@pytest.mark.parametrize(
    "compact",
    [
        None,
        "x" * 5000,
        "a.b",
        _tampered(certify(ROOT, KEY).compact),
        sign_compact(ROOT, {"typ": "other"}, {"iss": ROOT.did, "sub": KEY.did, "iat": 1}),
        sign_compact(ROOT, {"typ": CERT_TYP}, {"iss": ROOT.did, "sub": KEY.did, "iat": -1}),
        sign_compact(ROOT, {"typ": CERT_TYP}, {"iss": ROOT.did, "sub": KEY.did}),
        sign_compact(ROOT, {"typ": CERT_TYP}, {"iss": KEY.did, "sub": KEY.did, "iat": 1}),
    ],
)
def test_bad_certificates_are_typed_refusals(compact: object) -> None:
    with pytest.raises(BadSyncKeyCertificateError) as caught:
        parse_certificate(compact)
    assert caught.value.code == "bad_sync_key_certificate"


def test_envelope_round_trip() -> None:
    envelope = Envelope(b"\x01", ("k",), ((new_conversation_id(), ROOT.did),))
    assert parse_envelope(envelope.to_body()) == envelope


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"v": 1, "batch": "AQ", "keys": []},
        {"v": 2, "batch": "AQ", "keys": [], "groups": []},
        {"v": 1, "batch": "A Q", "keys": [], "groups": []},
        {"v": 1, "batch": 1, "keys": [], "groups": []},
        {"v": 1, "batch": "AQ", "keys": [1], "groups": []},
        {"v": 1, "batch": "AQ", "keys": ["k"] * 65, "groups": []},
        {"v": 1, "batch": "AQ", "keys": [], "groups": [{"id": "x"}]},
        {"v": 1, "batch": "AQ", "keys": [], "groups": [{"id": 1, "creator": "d"}]},
        {"v": 1, "batch": "A" * 100_000, "keys": [], "groups": []},
    ],
)
def test_bad_envelopes_are_typed_refusals(body: object) -> None:
    with pytest.raises(MalformedEnvelopeError) as caught:
        parse_envelope(body)
    assert caught.value.code == "malformed_sync_envelope"


def test_summary_reads_authors_offers_and_the_rest() -> None:
    conv = new_conversation_id()
    message = Message.create(
        KEY, conversation=conv, parents=[], content_type="text/plain", body=b"x", timestamp=1
    )
    offers = ids_records(RecordType.OFFER, conv, [message.id])
    only_offers = summarize(pack_batch(offers))
    assert only_offers.offers == [(conv, message.id)] and not only_offers.other
    assert not worth_sending(only_offers, lambda c, m: True)
    assert worth_sending(only_offers, lambda c, m: False)
    full = summarize(pack_batch([MessageRecord(message), *offers]))
    assert full.authors == {KEY.did} and full.other and full.conversations == {conv}
    assert worth_sending(full, lambda c, m: True)


def test_push_sends_a_message_in_the_first_batch() -> None:
    from agent.sync.protocol import SyncNode
    from agent.sync.store import SyncStore

    conv = new_conversation_id()
    nodes = [SyncNode(SyncStore(":memory:", durable=False)) for _ in range(2)]
    for node, peer in zip(nodes, ("b", "a"), strict=True):
        node.open(peer, conv, 0.0)
    a, b = nodes
    for pushed in (False, True):
        message = Message.create(
            KEY, conversation=conv, parents=[], content_type="text/plain",
            body=b"x", timestamp=int(pushed),
        )  # fmt: skip
        a.post(message, 0.0)
        if pushed:
            a.push("b", conv, [message.id])
        batch = a.poll("b", 0.0)
        assert batch is not None
        delivered = [m.id for m in b.receive("a", batch, 0.0).delivered]
        assert delivered == ([message.id] if pushed else [])  # unpushed: only offered
