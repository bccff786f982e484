"""The edge agent signs nothing for, and stores nothing under, a cloud agent's bad answer.

A real HTTP server on 127.0.0.1 plays a cloud agent that answers what it likes: the
grant id names a file on the edge and the key is what the owner's root would sign for.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.edge.agent import EdgeAgent
from agent.errors import BadCloudAnswerError, BadRequestError
from janus_hsm.algorithms import Algorithm
from policies.abilities import Ability
from tests.policies.keys import software_keys

PAYMENTS = Ability("janus:payments/eur", "sign/payment")


class FakeCloud:
    """Answers GET /v1/did, POST /v1/grants and PUT .../bundle; records the PUTs."""

    def __init__(self) -> None:
        self.did = ""
        self.answer: dict[str, Any] = {}
        self.installed: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send({"did": owner.did})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                self._send(owner.answer)

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                owner.installed.append(self.path)
                self._send({"status": "active"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def edge(softhsm_token: Any, tmp_path_factory: pytest.TempPathFactory) -> EdgeAgent:
    agent, _ = EdgeAgent.init(
        tmp_path_factory.mktemp("edge"), softhsm_token.uri(), name="untrusted-cloud"
    )
    return agent


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[FakeCloud]:
    keys = software_keys(tmp_path / "keys", {"agent": Algorithm.EdDSA})
    fake = FakeCloud()
    fake.did = keys["agent"].did
    yield fake
    fake.server.shutdown()


def fresh_key(tmp_path: Path, name: str) -> str:
    return software_keys(tmp_path / name, {name: Algorithm.EdDSA})[name].did


def test_a_good_answer_is_signed_for_and_recorded(
    edge: EdgeAgent, cloud: FakeCloud, tmp_path: Path
) -> None:
    cloud.answer = {"grant_id": "AbC-_123", "did": fresh_key(tmp_path, "k1")}
    granted = edge.grant(cloud.url, [PAYMENTS], ttl_seconds=60, uses=1)
    assert granted["grant_id"] == "AbC-_123" and cloud.installed == ["/v1/grants/AbC-_123/bundle"]
    assert edge.granted("AbC-_123")["key"] == cloud.answer["did"]
    # The same id again would overwrite that record (and orphan its capability).
    cloud.answer = {"grant_id": "AbC-_123", "did": fresh_key(tmp_path, "k2")}
    with pytest.raises(BadCloudAnswerError, match="reused the grant id"):
        edge.grant(cloud.url, [PAYMENTS], ttl_seconds=60, uses=1)
    # So would the same key: the owner would sign a second capability for it.
    cloud.answer = {"grant_id": "other", "did": granted["key"]}
    with pytest.raises(BadCloudAnswerError, match="not new"):
        edge.grant(cloud.url, [PAYMENTS], ttl_seconds=60, uses=1)
    assert cloud.installed == ["/v1/grants/AbC-_123/bundle"]


@pytest.mark.parametrize(
    "grant_id",
    ["../../outside", "/tmp/janus-outside", "a/b", "", "x" * 65, "ok\n", 7, None],
)
def test_a_grant_id_that_is_not_one_is_refused_before_signing(
    edge: EdgeAgent, cloud: FakeCloud, tmp_path: Path, grant_id: Any
) -> None:
    cloud.answer = {"grant_id": grant_id, "did": fresh_key(tmp_path, "k")}
    with pytest.raises(BadCloudAnswerError, match="bad grant id"):
        edge.grant(cloud.url, [PAYMENTS], ttl_seconds=60, uses=1)
    assert cloud.installed == []
    assert not Path("/tmp/janus-outside.json").exists()
    assert not (edge.config.state_dir.parent / "outside.json").exists()


def test_keys_that_are_not_a_new_grant_key_are_refused(edge: EdgeAgent, cloud: FakeCloud) -> None:
    for key, refusal in (
        (edge.did, "not new"),  # the owner's own root
        (cloud.did, "not new"),  # the agent's published identity
        ("did:key:zNotAKey", "bad key"),
        (None, "bad key"),
    ):
        cloud.answer = {"grant_id": "g1", "did": key}
        with pytest.raises(BadCloudAnswerError, match=refusal):
            edge.grant(cloud.url, [PAYMENTS], ttl_seconds=60, uses=1)
    assert cloud.installed == []


def test_grant_ids_from_the_command_line_name_no_other_file(edge: EdgeAgent) -> None:
    for grant_id in ("../edge", "/etc/passwd", ""):
        with pytest.raises(BadRequestError):
            edge.granted(grant_id)
        with pytest.raises(BadRequestError):
            edge.revoke(grant_id)
