"""HTTP bodies posted to every route of a cloud agent (the real ASGI app, in-process).

The agent is the real one (software keystore, SQLite ledger and store in a temporary
directory) behind Starlette's TestClient, so each case costs one request and no socket.
Each case checks: the status is below 500, a refusal is a JSON error with a stable
code, a refusal changes nothing on disk (the ledger and store files are byte for byte
the same), and a body whose signed part was changed is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from starlette.exceptions import StarletteDeprecationWarning

from agent.cloud.http import build_app
from agent.cloud.service import CloudAgent, CloudConfig
from agent.didcomm import Message, pack_anoncrypt, wrap_forward
from agent.protocol import KEYREQ_TYP, PICKUP_TYP, sign_request
from policies import issue
from policies.abilities import Ability
from policies.capability import Bundle, Capability
from policies.invocation import invoke
from policies.revocation import sign_revocation
from tests.fuzz.mutate import mutated_bytes, tampered_compact
from tests.fuzz.seeds import OPEN_POLICY, PAYMENTS, REQUEST, Seeds
from tests.fuzz.targets import Target, dumps, json_values

with warnings.catch_warnings():
    # Starlette asks for httpx2 in its TestClient; httpx is what the project uses.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

MAILBOX = Ability("janus:mailbox", "msg/receive")
# Files whose bytes must not change on a refusal; SQLite's -shm holds only reader
# marks and the WAL index, which reads update.
STATE_FILES = ("cloud.db", "cloud.db-wal")


@dataclass(frozen=True)
class Post:
    method: str
    path: str
    body: bytes
    signed_part_changed: bool = False


class HttpHarness:
    """A cloud agent with a payments and a mailbox grant, and valid bodies for each route."""

    def __init__(self, seeds: Seeds, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.agent = CloudAgent(
            CloudConfig(
                state_dir=state_dir, passphrase_source=lambda: "fuzz pass", owner=seeds.owner.did
            )
        )
        self.client = TestClient(build_app(self.agent), raise_server_exceptions=False)
        self.client.__enter__()
        owner, now = seeds.owner, int(time.time())
        self.pay_grant = self._grant(seeds, [PAYMENTS], now)
        self.mail_grant = self._grant(seeds, [MAILBOX], now)
        self.spare_grant = self._grant(seeds, [PAYMENTS], now)
        pending = self.agent.create_grant(
            sign_request(owner, typ=KEYREQ_TYP, audience=self.agent.did, now=now)
        )
        pending_bundle = issue.grant(
            owner,
            audience=pending.did,
            abilities=[PAYMENTS],
            ttl_seconds=3600,
            uses=10,
            now=now,
            policy=OPEN_POLICY,
        )
        message = Message(
            id=str(uuid.uuid4()),
            type="https://janus.dev/messages/1.0/note",
            body={"text": "fuzz"},
            to=(owner.did,),
        )
        forward = wrap_forward(
            pack_anoncrypt(message, [owner.did]),
            to=owner.did,
            routing_keys=[self.agent.routing_key.did],
        )
        external, invocation = self._external(seeds, now)
        spare_root = self.agent.store.grant(self.spare_grant).bundle or ""
        spare_id = json.loads(spare_root)["chain"][0]
        self.seeds: list[tuple[str, str, dict[str, Any] | bytes, str | None]] = [
            # (method, path, body, the member holding a signed compact)
            (
                "POST",
                "/v1/grants",
                {"request": sign_request(owner, typ=KEYREQ_TYP, audience=self.agent.did, now=now)},
                "request",
            ),
            (
                "PUT",
                f"/v1/grants/{pending.grant_id}/bundle",
                pending_bundle.to_json().encode(),
                None,
            ),
            (
                "POST",
                f"/v1/grants/{self.pay_grant}/actions/sign/payment",
                {"resource": "janus:payments/eur", "request": dict(REQUEST)},
                None,
            ),
            (
                "POST",
                "/v1/invoke",
                {
                    "bundle": json.loads(external.to_json()),
                    "invocation": invocation,
                    "request": dict(REQUEST),
                },
                "invocation",
            ),
            ("POST", "/v1/didcomm", forward.encode(), None),
            (
                "POST",
                "/v1/pickup",
                {"request": sign_request(owner, typ=PICKUP_TYP, audience=self.agent.did, now=now)},
                "request",
            ),
            (
                "POST",
                "/v1/revocations",
                {
                    "record": sign_revocation(
                        owner, revoked_id=Capability.parse(spare_id).id, now=now
                    )
                },
                "record",
            ),
        ]

    def _grant(self, seeds: Seeds, abilities: list[Ability], now: int) -> str:
        owner = seeds.owner
        record = self.agent.create_grant(
            sign_request(owner, typ=KEYREQ_TYP, audience=self.agent.did, now=now)
        )
        bundle = issue.grant(
            owner,
            audience=record.did,
            abilities=abilities,
            ttl_seconds=3600,
            uses=1_000_000,
            depth=1,
            now=now,
            policy=OPEN_POLICY,
        )
        self.agent.install(record.grant_id, bundle.to_json())
        return record.grant_id

    def _external(self, seeds: Seeds, now: int) -> tuple[Bundle, str]:
        """A capability the payments grant's key redelegates to the seeds' worker key,
        and the worker's invocation of it (the body of ``POST /v1/invoke``)."""
        record = self.agent.store.grant(self.pay_grant)
        parent = Bundle.parse(record.bundle or "")
        worker = seeds.keys["worker"]
        child = issue.grant(
            self.agent.keys.find(record.key_uri),
            audience=worker.did,
            abilities=[PAYMENTS],
            ttl_seconds=3000,
            uses=1_000_000,
            proof=parent,
            now=now,
            policy=OPEN_POLICY,
        )
        invocation = invoke(
            worker,
            capability_id=child.leaf.id,
            action="sign/payment",
            resource="janus:payments/eur",
            request=REQUEST,
            now=now,
            lifetime=300,
            audience=self.agent.did,
        )
        return child, invocation

    def close(self) -> None:
        self.client.__exit__(None, None, None)
        self.agent.close()

    def fingerprint(self) -> dict[str, str]:
        out = {}
        for name in STATE_FILES:
            path = self.state_dir / name
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""
        return out

    def inputs(self) -> st.SearchStrategy[Post]:
        def mutated(seed: tuple[str, str, dict[str, Any] | bytes, str | None]) -> Any:
            method, path, body, _ = seed
            raw = body if isinstance(body, bytes) else dumps(body)
            return mutated_bytes(raw).map(lambda b: Post(method, path, b))

        @st.composite
        def tampered(draw: st.DrawFn) -> Post:
            signed = [s for s in self.seeds if s[3] is not None]
            method, path, body, member = draw(st.sampled_from(signed))
            assert isinstance(body, dict) and member is not None
            changed = dict(body, **{member: draw(tampered_compact(body[member]))})
            return Post(method, path, dumps(changed), signed_part_changed=True)

        routes = st.sampled_from([(s[0], s[1]) for s in self.seeds])
        anything = st.tuples(routes, json_values(6).map(dumps) | st.binary(max_size=64)).map(
            lambda r: Post(r[0][0], r[0][1], r[1])
        )
        return st.sampled_from(self.seeds).flatmap(mutated) | tampered() | anything

    def check(self, post: Post) -> None:
        before = self.fingerprint()
        response = self.client.request(
            post.method,
            post.path,
            content=post.body,
            headers={"content-type": "application/json"},
        )
        status = response.status_code
        assert status < 500, f"{post.method} {post.path}: {status} {response.text[:300]}"
        if status < 400:
            assert not post.signed_part_changed, (
                f"{post.path}: a changed signed part was accepted ({status})"
            )
            return
        error = response.json().get("error", {})
        assert isinstance(error.get("code"), str), f"{post.path}: error without code"
        after = self.fingerprint()
        assert before == after, f"{post.path}: refused ({status}) but the state changed"


def harness(seeds: Seeds) -> HttpHarness:
    """The seeds' agent, started on first use and kept with them (closed by close_http)."""
    found = seeds.cache.get("http")
    if not isinstance(found, HttpHarness):
        found = seeds.cache["http"] = HttpHarness(seeds, seeds.directory / "cloud")
    return found


def close_http(seeds: Seeds) -> None:
    found = seeds.cache.pop("http", None)
    if isinstance(found, HttpHarness):
        found.close()


HTTP_TARGET = Target(
    "http",
    lambda seeds: harness(seeds).inputs(),
    lambda seeds, post: harness(seeds).check(post),
    10,
)
