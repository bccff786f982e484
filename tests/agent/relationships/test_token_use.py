"""What touches the token while two owners talk: nothing per message, nothing per pickup.

Both owners' root and agreement keys (real SoftHSM keys) are wrapped so that every
signature and every ECDH they make is counted, while messages go both ways through real
cloud agents and are picked up in several rounds.
"""

from __future__ import annotations

from pathlib import Path

from agent.edge.agent import EdgeAgent
from agent.relationships.manager import Relationships
from hardware.softhsm import SoftHSMToken
from janus_hsm.provider import KeyHandle, KeyProperties
from janus_hsm.public_keys import PublicKey
from tests.agent.relationships.owners import Owner, connect, owner, texts


class TokenCounter(KeyHandle):
    """A real token key whose signatures and ECDHs are counted (the key still does them)."""

    def __init__(self, inner: KeyHandle) -> None:
        self.inner = inner
        self.signs = 0
        self.exchanges = 0

    @property
    def uri(self) -> str:
        return self.inner.uri

    @property
    def properties(self) -> KeyProperties:
        return self.inner.properties

    def public_key(self) -> PublicKey:
        return self.inner.public_key()

    def _sign_eddsa(self, data: bytes) -> bytes:
        self.signs += 1
        return self.inner.sign(data)

    def _sign_ecdsa_digest(self, digest: bytes) -> bytes:
        self.signs += 1
        return self.inner.sign_digest(digest)

    def _exchange(self, peer_public_key: PublicKey) -> bytes:
        self.exchanges += 1
        return self.inner.exchange(peer_public_key)

    def count(self) -> tuple[int, int]:
        return self.signs, self.exchanges


def _counted(who: Owner) -> tuple[Relationships, TokenCounter, TokenCounter]:
    edge = EdgeAgent.open(who.state)
    root, agreement = TokenCounter(edge.root), TokenCounter(edge.agreement)
    edge.root, edge.agreement = root, agreement
    return Relationships(edge), root, agreement


def test_no_token_operation_per_message_or_per_pickup(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)  # establishment: what it needs of the token is not counted
        a_rels, a_root, a_agree = _counted(alex)
        b_rels, b_root, b_agree = _counted(blair)
        with a_rels, b_rels:
            sent = received = 0
            for turn in range(4):
                for n in range(3):
                    a_rels.send("blair", text=f"a{turn}.{n}")
                got = texts(b_rels.receive())
                assert got == [f"a{turn}.{n}" for n in range(3)]
                for n in range(2):
                    b_rels.send("alex", text=f"b{turn}.{n}")
                assert texts(a_rels.receive()) == [f"b{turn}.{n}" for n in range(2)]
                assert texts(a_rels.receive()) == []  # a pickup that finds nothing
                sent, received = sent + 3, received + 2
            assert (sent, received) == (12, 8)
            # Twenty messages, ten receives (each picking up from every address): the
            # only token operation is each vault's unlock.
            assert a_root.count() == (0, 0) and b_root.count() == (0, 0)
            assert a_agree.count() == (0, 1) and b_agree.count() == (0, 1)

            # A rotation makes one address: one root signature (its creation).  The old
            # address is then retired with its holder key, not the root.
            a_rels.rotate("blair", grace_seconds=0)
            a_rels.rotate("blair")
            assert a_root.count() == (1, 0)
            events: list[str] = []
            for turn in range(3):
                b_rels.send("alex", text=f"after{turn}")
                report = a_rels.receive()
                assert texts(report) == [f"after{turn}"]
                events += [e["event"] for e in report.events]
                b_rels.receive()
            assert "address_retired" in events
            assert a_root.count() == (1, 0) and b_root.count() == (0, 0)
            assert a_agree.count() == (0, 1) and b_agree.count() == (0, 1)
