"""Recovering from a stopped bus or instance without losing a revocation.

A revocation an instance accepted reaches the others even if the instance stopped
before the event bus took it (the signed event is kept in its store and published at
its next start); an instance whose contact with the bus comes back serves no use before
it read what it missed.  Real processes, a real nats-server, a real kill -9.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.cloud.bus_link import RECONNECT_GAP
from agent.cloud.process import CloudProcess
from hardware.nats_server import NatsServer, NatsUnavailable
from tests.agent.cloud.bus_helpers import (
    Owner,
    code,
    pay,
    start_instance,
    until,
    wait_caught_up,
)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store=tmp_path / "nats")
    try:
        server.start()
    except NatsUnavailable as exc:
        pytest.fail(f"cannot start nats-server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


def unpublished(instance: CloudProcess) -> list[str]:
    with sqlite3.connect(instance.state_dir / "cloud.db") as db:
        rows = db.execute(
            "SELECT event_id FROM cloud_bus_outbox WHERE published_at IS NULL"
        ).fetchall()
    return [str(row[0]) for row in rows]


def test_a_revocation_accepted_while_the_bus_was_down_survives_a_kill(
    nats: NatsServer, tmp_path: Path
) -> None:
    owner = Owner(tmp_path / "owner")
    instances: list[CloudProcess] = []
    try:
        for name in ("a", "b"):
            instances.append(start_instance(tmp_path / name, owner, nats.url))
        a, b = instances
        for instance in instances:
            wait_caught_up(instance)
        # Without use limits: b keeps serving it while the bus is away (no staleness
        # refusal), so only the revocation can stop it.
        shared = owner.shared(uses=None)
        grant_b = owner.install(b, shared)
        owner.install(a, shared)
        assert pay(b, grant_b).status_code == 200

        nats.stop()
        answer = httpx.post(
            f"{a.url}/v1/revocations", json={"record": owner.revocation(shared)}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["published"] is False
        assert len(unpublished(a)) == 1
        a.process.kill()  # SIGKILL: its retry loop dies with it
        a.process.wait()

        nats.start()
        wait_caught_up(b, timeout=30)
        assert pay(b, grant_b).status_code == 200  # nobody has published the revocation

        restarted = start_instance(a.state_dir, owner, nats.url)
        instances[0] = restarted
        wait_caught_up(restarted)
        until(
            lambda: code(pay(b, grant_b)) in ("grant_inactive", "revoked"),
            timeout=15,
            what="the kept revocation to reach the other instance",
        )
        status = httpx.get(f"{b.url}/v1/grants/{grant_b}").json()
        assert (status["status"], status["reason"]) == ("destroyed", "revoked")
        until(lambda: unpublished(restarted) == [], what="the event to be marked published")
    finally:
        for instance in instances:
            instance.stop()
        owner.close()


def test_back_from_a_lost_contact_an_instance_is_not_ready_before_it_caught_up(
    nats: NatsServer, tmp_path: Path
) -> None:
    owner = Owner(tmp_path / "owner")
    instance = start_instance(tmp_path / "a", owner, nats.url)
    try:
        before = wait_caught_up(instance)["catch_up_seconds"]
        nats.stop()
        until(
            lambda: (
                httpx.get(f"{instance.url}/healthz").json()["bus"]["staleness"]
                > RECONNECT_GAP + 0.5
            ),
            what="a lost contact",
        )
        nats.start()
        # Sampled often: from the moment contact is back (staleness small again), the
        # instance says it is caught up only once a new catch-up finished.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            bus = httpx.get(f"{instance.url}/healthz").json()["bus"]
            if bus["staleness"] < RECONNECT_GAP and bus["caught_up"]:
                assert bus["catch_up_seconds"] != before, bus
                break
            time.sleep(0.005)
        else:
            raise AssertionError("never caught up again")
    finally:
        instance.stop()
        owner.close()
