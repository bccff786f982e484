"""The edge agent's root on a (virtual) YubiKey: identity, signing, DIDComm unpack by ECDH."""

from __future__ import annotations

from agent.didcomm.message import Message
from agent.didcomm.pack import pack_anoncrypt, pack_signed
from agent.didcomm.unpack import unpack
from agent.edge.identity import did_document
from hardware.virtual_piv import VirtualPivApplet, VirtualYubiKey
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.piv import PivProvider
from janus_hsm.public_keys import from_did_key


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
