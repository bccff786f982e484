"""Two owners with their own cloud agents (receiving + sending), for the relationship tests."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from agent.relationships.invitation import Invitation
from agent.relationships.manager import ReceiveReport, Relationships
from hardware.softhsm import SoftHSMToken

SERVICE_ARGS = ["--receiving", "--sending", "--sending-allow-host", "127.0.0.1"]


@dataclass
class Owner:
    name: str
    state: Path
    cloud: CloudProcess
    did: str

    def rels(self) -> Relationships:
        return Relationships.open(self.state)


def unique(tmp_path: Path, name: str) -> str:
    """A key label unique to this test directory, so tests sharing a token never collide."""
    return f"{name}-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]}"


@contextlib.contextmanager
def owner(
    token: SoftHSMToken, tmp_path: Path, name: str, *, sending: bool = True
) -> Iterator[Owner]:
    state = tmp_path / name
    edge, _ = EdgeAgent.init(state, token.uri(), name=unique(tmp_path, name))
    args = SERVICE_ARGS if sending else ["--receiving"]
    cloud = CloudProcess(tmp_path / f"{name}-cloud", owner=edge.did, extra_args=args)
    who = Owner(name, state, cloud, edge.did)
    try:
        with who.rels() as rels:
            rels.add_service(cloud.url, "receiving")
            if sending:
                rels.add_service(cloud.url, "sending")
        yield who
    finally:
        cloud.stop()
        if who.cloud is not cloud:  # a test restarted it
            who.cloud.stop()


def connect(alex: Owner, blair: Owner) -> None:
    """Alex invites Blair (as a file would carry it), Blair accepts, both exchange hellos."""
    with alex.rels() as rels:
        invitation = rels.invite("blair")
    text = invitation.to_file()
    with blair.rels() as rels:
        rels.accept(Invitation.parse(text), "alex")
    with alex.rels() as rels:
        report = rels.receive()
        assert [e["event"] for e in report.events] == ["established"], report.to_dict()
    with blair.rels() as rels:
        rels.receive()  # Alex's reply: his address, the confirmation of hers
    with alex.rels() as rels:
        rels.receive()  # Blair's confirmation of his address


def texts(report: ReceiveReport) -> list[str]:
    return [m["message"]["body"]["text"] for m in report.messages]
