"""The main job runs end to end, narrates every step, and is idempotent."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.demo import DemoFailure, check_answer, describe
from agent.edge.agent import EdgeAgent
from agent.errors import AgentError
from hardware.softhsm import SoftHSMToken
from janus_hsm.backends.software import SoftwareProvider
from janus_hsm.pin import read_pin_file
from policies.abilities import Ability

# A valid did:key of nobody here (an Ed25519 key of the did:key test vectors).
OTHER_OWNER = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"


def run_demo(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.demo", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def active_grants(state: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(state / "cloud" / "cloud.db") as db:
        rows = db.execute(
            "SELECT grant_id, key_uri FROM cloud_grants WHERE status = 'active'"
        ).fetchall()
    return [(str(grant_id), str(key_uri)) for grant_id, key_uri in rows]


def age_grants(state: Path, seconds: float) -> None:
    """What the cloud agent sees when it restarts ``seconds`` later: its active grants'
    expiry has passed, and its sweep has not yet run (it runs every few seconds)."""
    with sqlite3.connect(state / "cloud" / "cloud.db") as db:
        db.execute(
            "UPDATE cloud_grants SET expires_at = ? WHERE status = 'active'",
            (time.time() - seconds,),
        )


# Four runs of about two minutes together on an idle machine, mostly CPU: the suite's
# 300 s default would be less than three times that, too tight on a busy one.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_succeeds_and_reruns_on_its_token_keys_and_ended_grants(tmp_path: Path) -> None:
    """One state directory, four runs: the first narrates every step; a rerun at once
    reuses the token and root key; a rerun at any interval copes with the earlier
    mailbox grants, still listed as active, having expired (a rerun ten minutes later)
    or lost their key; a valid one is used."""
    state = tmp_path / "demo"
    first = run_demo(state)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "generated root key pkcs11:token=janus;object=edge-root" in out
    assert "all 6 export routes refused" in out
    assert "payment 5 of 42.00 EUR signed" in out
    assert "a payment of 200.00 EUR is refused (caveat_failed" in out
    assert "a 6th payment is refused" in out
    assert "the next payment is refused immediately" in out
    assert "both see the same safety number to compare in person" in out
    assert "the conversation goes on at the new address" in out
    assert "no address id of Blair's, in text or bytes, is in it" in out
    assert "Alex's message has nowhere to go" in out
    assert "the limit holds across instances" in out
    assert "instance 3 refuses P (" in out
    assert "instance 2 refuses it (revocation_state_stale)" in out
    assert "caught up and serves it again" in out
    assert "FAILED" not in out
    did = next(
        line.split("identity:")[1].strip() for line in out.splitlines() if "identity:" in line
    )
    stale = active_grants(state)
    assert len(stale) == 1  # the mailbox grant: the payment grants were used up, revoked

    second = run_demo(state)  # at once: the earlier mailbox grant is still valid
    assert second.returncode == 0, second.stdout + second.stderr
    assert "found existing root key" in second.stdout
    assert f"identity: {did}" in second.stdout

    age_grants(state, 60)
    later = run_demo(state)
    assert later.returncode == 0, later.stdout + later.stderr
    assert "a sender's DIDComm message (encrypted to the owner's token key) is held" in (
        later.stdout
    )

    # A grant whose key is gone while the store still lists it (destroyed by another
    # instance sharing the store): the sweep never retires it, so it is always there.
    cloud = state / "cloud"
    keys = SoftwareProvider.open(
        f"soft:dir={cloud / 'keys'}",
        passphrase_source=lambda: read_pin_file(cloud / "passphrase"),
        allow_extractable=True,
    )
    for _, key_uri in active_grants(state):
        keys.delete(key_uri)
    again = run_demo(state)
    assert again.returncode == 0, again.stdout + again.stderr


def test_a_failed_step_names_the_http_status_and_body(
    tmp_path: Path, softhsm_token: SoftHSMToken
) -> None:
    """A failed step says what the cloud agent answered, not only that it failed."""
    edge, _ = EdgeAgent.init(tmp_path / "edge", softhsm_token.uri())
    cloud = CloudProcess(tmp_path / "cloud", owner=OTHER_OWNER)
    try:
        answer = httpx.get(f"{cloud.url}/v1/grants/no-such-grant")
        with pytest.raises(DemoFailure) as failed:
            check_answer(answer, 200, "the grant is shown")
        assert "the grant is shown: the cloud agent answered HTTP 404" in str(failed.value)
        assert '"code":"not_found"' in str(failed.value)

        with pytest.raises(AgentError) as refused:  # the agent serves another owner
            edge.grant(cloud.url, [Ability("janus:mailbox", "msg/receive")], ttl_seconds=60, uses=1)
        told = describe(refused.value)
        assert "the cloud agent answered HTTP 403" in told
        assert refused.value.code in told
    finally:
        cloud.stop()
