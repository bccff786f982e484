"""``kill -9`` of a real cloud agent under load: every answered use is in its ledger.

Eight clients pay through one grant of a ``janus cloud serve`` process, each payment
with a payload of its own; the process is killed with SIGKILL mid-stream and started
again on the same state directory.  Every payment answered 200 before the kill must be
a use in the ledger (matched by the request digest the audit entry records), no use may
be recorded twice, the audit chain must verify, and the restarted agent must serve the
same grant.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.cloud.service import CloudConfig
from agent.protocol import KEYREQ_TYP, sign_request
from janus_hsm.provider import KeyHandle
from policies import issue
from policies.invocation import request_digest
from policies.ledger import open_ledger
from tests.fuzz.seeds import OPEN_POLICY, PAYMENTS, software_keys

CLIENTS = 8
KILL_AFTER = 60  # answered payments before the kill


def _grant(cloud: CloudProcess, owner: KeyHandle) -> str:
    agent = httpx.get(f"{cloud.url}/v1/did", timeout=10).json()["did"]
    now = int(time.time())
    created = httpx.post(
        f"{cloud.url}/v1/grants",
        json={"request": sign_request(owner, typ=KEYREQ_TYP, audience=agent, now=now)},
        timeout=30,
    ).json()
    bundle = issue.grant(
        owner,
        audience=created["did"],
        abilities=[PAYMENTS],
        ttl_seconds=3600,
        uses=100_000,
        now=now,
        policy=OPEN_POLICY,
    )
    installed = httpx.put(
        f"{cloud.url}/v1/grants/{created['grant_id']}/bundle",
        content=bundle.to_json(),
        timeout=30,
    )
    assert installed.status_code == 200, installed.text
    return str(created["grant_id"])


def _pay(url: str, grant_id: str, to: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/grants/{grant_id}/actions/sign/payment",
        json={
            "resource": "janus:payments/eur",
            "request": {"amount": 1, "currency": "EUR", "to": to},
        },
        timeout=30,
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_answered_use_survives_kill_9(tmp_path: Path) -> None:
    owner = software_keys(tmp_path / "owner")["owner"]
    state = tmp_path / "cloud"
    cloud = CloudProcess(state, owner=owner.did)
    answered: list[dict[str, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        grant_id = _grant(cloud, owner)

        def client(number: int) -> None:
            with httpx.Client(timeout=30) as http:
                for n in range(100_000):
                    if stop.is_set():
                        return
                    request = {"amount": 1, "currency": "EUR", "to": f"c{number}-{n}"}
                    try:
                        response = http.post(
                            f"{cloud.url}/v1/grants/{grant_id}/actions/sign/payment",
                            json={"resource": "janus:payments/eur", "request": request},
                        )
                    except httpx.HTTPError:
                        return  # the server is gone: what was answered is what counts
                    if response.status_code == 200:
                        with lock:
                            answered.append(response.json()["evidence"]["payload"])
                    else:
                        with lock:
                            failures.append(f"{response.status_code} {response.text[:200]}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(answered) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(cloud.process.pid, signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=60)
        stop.set()
        assert cloud.process.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop.set()
        cloud.stop()
    assert not failures, failures[:5]
    assert len(answered) >= KILL_AFTER, "too few payments were answered before the kill"

    restarted = CloudProcess(state, owner=owner.did)
    try:
        after = _pay(restarted.url, grant_id, "after-restart")
        assert after.status_code == 200, after.text
    finally:
        restarted.stop()

    url = CloudConfig(state_dir=state, passphrase_source=lambda: "").database_url
    with open_ledger(url) as ledger:
        uses = [e for e in ledger.audit_entries() if e.kind == "use"]
        digests = [e.data["request"] for e in uses]
        assert len(digests) == len(set(digests)), "a payment was counted twice"
        missing = [p for p in answered if request_digest(p) not in set(digests)]
        assert not missing, f"{len(missing)} answered uses are not in the ledger: {missing[:3]}"
        assert ledger.verify_audit() >= len(answered) + 1
        leaf = {e.cap_id for e in uses}
        assert len(leaf) == 1
        assert ledger.uses(leaf.pop()) == len(uses)
