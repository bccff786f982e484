"""The edge agent's root on a (virtual) YubiKey: identity, signing, DIDComm unpack by ECDH.

``EdgeAgent.init`` on ``piv:`` URIs runs in process with only PC/SC discovery replaced
(``find_card`` returns the virtual card); tests/agent/test_cli_piv_pcsc.py drives the
same through pcscd from the shell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.didcomm import wrap_forward
from agent.didcomm.message import Message
from agent.didcomm.pack import pack_anoncrypt, pack_signed
from agent.didcomm.unpack import unpack
from agent.edge.agent import EdgeAgent
from agent.edge.identity import did_document
from agent.errors import BadRequestError, ConflictError
from hardware.virtual_piv import VERSION_5_4, VirtualPivApplet, VirtualYubiKey
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.piv import PivProvider, discovery
from janus_hsm.backends.piv import provider as piv_provider
from janus_hsm.errors import MechanismUnsupportedError
from janus_hsm.public_keys import from_did_key

SERIAL = 31415926
PlugKey = Callable[..., VirtualYubiKey]


@pytest.fixture
def plug(monkeypatch: pytest.MonkeyPatch) -> Iterator[PlugKey]:
    """``plug(version=...)``: a virtual YubiKey that PIV discovery finds by its serial."""
    readers: list[str] = []

    def make(version: tuple[int, int, int] = (5, 7, 2)) -> VirtualYubiKey:
        key = VirtualYubiKey(piv=VirtualPivApplet(serial=SERIAL, version=version))
        info = discovery.CardInfo(f"Virtual YubiKey {id(key)}", SERIAL, ".".join(map(str, version)))
        readers.append(info.reader)

        def find_card(*, serial: int | None, reader: str | None) -> Any:
            assert serial in (None, SERIAL)
            return info, key.connect

        monkeypatch.setattr(discovery, "find_card", find_card)
        return key

    monkeypatch.setenv("JANUS_PIN", "123456")
    yield make
    for reader in readers:
        piv_provider._cards.pop(reader, None)


def _slots(key: VirtualYubiKey) -> dict[str, Algorithm]:
    with PivProvider.from_connection(key.connect(), pin_source=lambda: "123456") as provider:
        return {h.uri.rsplit("slot=", 1)[1]: h.algorithm for h in provider.list_keys()}


def test_init_puts_the_root_in_9c_and_the_agreement_key_in_9d(
    plug: PlugKey, tmp_path: Path
) -> None:
    key = plug()
    edge, created = EdgeAgent.init(tmp_path / "edge", f"piv:serial={SERIAL}")
    assert created is True
    assert _slots(key) == {"9c": Algorithm.ES256, "9d": Algorithm.X25519}
    assert edge.root.uri == f"piv:serial={SERIAL};slot=9c"
    assert edge.agreement.uri == f"piv:serial={SERIAL};slot=9d"
    assert edge.root.properties.pin_policy == "always"  # 9c's default: PIN per signature
    assert edge.did_document()["keyAgreement"] == [
        f"{edge.agreement.did}#{edge.agreement.did.removeprefix('did:key:')}"
    ]
    reopened = EdgeAgent.open(tmp_path / "edge")
    assert reopened.did == edge.did and reopened.agreement.did == edge.agreement.did
    assert "slot=9c" in reopened.config.root_uri and "slot=9d" in reopened.config.agreement_uri

    # Running init again on the same state directory finds its own keys: idempotent.
    again, created = EdgeAgent.init(tmp_path / "edge", f"piv:serial={SERIAL}")
    assert created is False and again.did == edge.did
    assert _slots(key) == {"9c": Algorithm.ES256, "9d": Algorithm.X25519}


def test_occupied_slots_are_refused_unless_reuse_is_asked_for(
    plug: PlugKey, tmp_path: Path
) -> None:
    key = plug()
    mine, _ = EdgeAgent.init(tmp_path / "first", f"piv:serial={SERIAL}")
    with pytest.raises(ConflictError, match=r"slot 9c .* already holds .*--reuse-existing"):
        EdgeAgent.init(tmp_path / "second", f"piv:serial={SERIAL}")
    assert not (tmp_path / "second" / "edge.toml").exists()
    adopted, created = EdgeAgent.init(
        tmp_path / "second", f"piv:serial={SERIAL}", reuse_existing=True
    )
    assert created is False and adopted.did == mine.did
    # Reuse never swaps algorithms: an ES256 key is not an Ed25519 root.
    with pytest.raises(ConflictError, match="--root-alg ES256"):
        EdgeAgent.init(
            tmp_path / "third",
            f"piv:serial={SERIAL}",
            root_algorithm=Algorithm.EdDSA,
            reuse_existing=True,
        )
    assert _slots(key) == {"9c": Algorithm.ES256, "9d": Algorithm.X25519}


def test_a_free_agreement_slot_is_checked_before_anything_is_generated(
    plug: PlugKey, tmp_path: Path
) -> None:
    key = plug()
    with PivProvider.from_connection(key.connect(), pin_source=lambda: "123456") as provider:
        provider.generate("piv:slot=9d", Algorithm.ES256)
    with pytest.raises(ConflictError, match="slot 9d"):
        EdgeAgent.init(tmp_path / "edge", f"piv:serial={SERIAL}")
    assert _slots(key) == {"9d": Algorithm.ES256}  # 9c left empty
    # Adopting a P-256 agreement key is fine: it does ECDH.
    edge, created = EdgeAgent.init(tmp_path / "edge", f"piv:serial={SERIAL}", reuse_existing=True)
    assert created is True and edge.agreement.algorithm is Algorithm.ES256


def test_the_uri_slot_and_root_algorithm_are_respected(plug: PlugKey, tmp_path: Path) -> None:
    key = plug()
    edge, _ = EdgeAgent.init(
        tmp_path / "edge", f"piv:serial={SERIAL};slot=9a", root_algorithm=Algorithm.EdDSA
    )
    assert _slots(key) == {"9a": Algorithm.EdDSA, "9d": Algorithm.X25519}
    assert edge.did.startswith("did:key:z6Mk")
    with pytest.raises(BadRequestError, match="slot 9d"):
        EdgeAgent.init(tmp_path / "other", f"piv:serial={SERIAL};slot=9d")


def test_old_firmware_refuses_ed25519_and_agrees_with_p256(plug: PlugKey, tmp_path: Path) -> None:
    key = plug(VERSION_5_4)
    with pytest.raises(MechanismUnsupportedError, match=r"firmware 5\.4\.\d+: Ed25519 .* 5\.7"):
        EdgeAgent.init(tmp_path / "edge", f"piv:serial={SERIAL}", root_algorithm=Algorithm.EdDSA)
    assert _slots(key) == {}
    edge, _ = EdgeAgent.init(
        tmp_path / "edge", f"piv:serial={SERIAL}", root_algorithm=Algorithm.ES384
    )
    assert _slots(key) == {"9c": Algorithm.ES384, "9d": Algorithm.ES256}
    message = Message(id="1", type="https://example.org/ping", body={"n": 2})
    opened = unpack(pack_anoncrypt(message, [edge.agreement.did]), edge.agreement_keys())
    assert opened.message.body == {"n": 2}


def test_root_on_the_card_signs_and_decrypts() -> None:
    key = VirtualYubiKey(piv=VirtualPivApplet(serial=27182818))
    with PivProvider.from_connection(key.connect(), pin_source=lambda: "123456") as provider:
        root = provider.generate("piv:slot=9c", Algorithm.ES256)
        agreement = provider.generate("piv:slot=9d", Algorithm.X25519)
        document = did_document(root, agreement)
        assert document["id"] == root.did
        assert from_did_key(root.did) == root.public_key()

        message = Message(id="1", type="https://example.org/ping", body={"n": 1})
        signed = pack_signed(
            Message(id="2", type="https://example.org/ping", body={"n": 1}, from_=root.did),
            root,
        )
        assert unpack(signed).message.body == {"n": 1}

        for recipient in (agreement, root):  # X25519 in 9d, and the P-256 root itself
            envelope = pack_anoncrypt(message, [recipient.did])
            opened = unpack(envelope, [recipient])
            assert opened.message.body == {"n": 1}


def test_grant_from_a_yubikey_root_to_a_real_cloud_agent_with_attestation(
    plug: PlugKey, tmp_path: Path
) -> None:
    # The whole edge flow with the root on the card, against a real cloud-agent process:
    # the grant carries the card's attestation, and a verifier that requires it accepts
    # the cloud agent's evidence only under the card's (test) attestation root.
    import httpx

    from agent.cloud.process import CloudProcess
    from agent.evidence import verify_evidence
    from policies.abilities import Ability
    from policies.errors import AttestationRequiredError
    from policies.verify import Verifier

    key = plug()
    edge, _ = EdgeAgent.init(tmp_path / "edge", f"piv:serial={SERIAL}")
    cloud = CloudProcess(tmp_path / "cloud", owner=edge.did)
    try:
        payments = Ability("janus:payments/eur", "sign/payment", ({"field": "amount", "le": 100},))
        granted = edge.grant(cloud.url, [payments], ttl_seconds=600, uses=2, attest=True)
        response = httpx.post(
            f"{cloud.url}/v1/grants/{granted['grant_id']}/actions/sign/payment",
            json={"resource": "janus:payments/eur", "request": {"amount": 42}},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        evidence = response.json()["evidence"]

        # A message held for the owner is picked up and decrypted by ECDH on the card.
        mailbox = Ability("janus:mailbox", "msg/receive")
        edge.grant(cloud.url, [mailbox], ttl_seconds=600, uses=10)
        routing_key = httpx.get(f"{cloud.url}/v1/did", timeout=30).json()["routing_key"]
        owner_key = edge.agreement.did
        note = Message(id="n-1", type="https://janus.dev/messages/1.0/note",
                       body={"text": "for the card"}, to=(owner_key,))  # fmt: skip
        envelope = wrap_forward(
            pack_anoncrypt(note, [owner_key]), to=owner_key, routing_keys=[routing_key]
        )
        posted = httpx.post(f"{cloud.url}/v1/didcomm", content=envelope.encode(), timeout=30)
        assert posted.status_code == 202, posted.text
        picked = edge.pickup(cloud.url)
        assert [m["message"]["body"]["text"] for m in picked] == ["for the card"]
    finally:
        cloud.stop()
    root_cert = key.piv.attestation_root_certificate
    trusted = Verifier(require_attestation=True, attestation_roots=[root_cert])
    verified = verify_evidence(evidence, root=edge.did, verifier=trusted)
    assert verified.principal == edge.did and verified.payload == {"amount": 42}
    with pytest.raises(AttestationRequiredError):  # Yubico's roots do not vouch for it
        verify_evidence(evidence, root=edge.did, verifier=Verifier(require_attestation=True))


def test_a_touch_always_root_enforces_the_policys_touch_requirement(
    plug: PlugKey, tmp_path: Path
) -> None:
    from hardware.virtual_piv import ScriptedTouch
    from policies.abilities import Ability
    from policies.issue import grant
    from policies.policy import IssuancePolicy

    key = plug()
    touches = ScriptedTouch()
    key.piv.touch = touches
    edge, _ = EdgeAgent.init(tmp_path / "edge", f"piv:serial={SERIAL}", root_touch_policy="always")
    assert edge.root.properties.touch_policy == "always"
    assert edge.agreement.properties.touch_policy != "always"  # ECDH stays touch-free
    policy = IssuancePolicy.loads(
        'version = 1\n[[rule]]\nname = "t"\naudiences = ["*"]\n'
        'abilities = [{ can = "sign/*", with = "janus:x/*" }]\nmax_ttl = "1h"\nmax_uses = 5\n'
        'require = ["touch"]\n'
    )
    before = len(touches.requests)
    bundle = grant(
        edge.root,
        audience=edge.agreement.did,
        abilities=[Ability("janus:x/y", "sign/z")],
        ttl_seconds=60,
        uses=1,
        policy=policy,
    )
    assert bundle.leaf.issuer == edge.did and len(touches.requests) == before + 1
    with pytest.raises(BadRequestError, match="touch policy"):
        EdgeAgent.init(tmp_path / "other", f"piv:serial={SERIAL}", root_touch_policy="sometimes")
