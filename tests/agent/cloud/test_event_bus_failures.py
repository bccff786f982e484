"""A cloud agent on an event bus when things go wrong: the bus goes away, events are
forged, too many uses arrive, the bus URL is bad.  Real processes and real buses."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.bus.base import open_bus
from agent.bus.events import Event, sign_event
from agent.cloud.process import CloudProcess
from hardware.nats_server import NatsServer
from hardware.postgres import PostgresCluster, free_port, start_cluster
from janus_hsm.algorithms import Algorithm
from tests.agent.bus.conftest import drop_schema, new_schema, with_schema
from tests.agent.cloud.bus_helpers import Owner, code, pay, start_instance, until, wait_caught_up


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[Owner]:
    owner = Owner(tmp_path / "owner")
    yield owner
    owner.close()


@dataclass
class StoppableBus:
    """A bus server the test may stop and start again (same address, same data)."""

    url: str
    stop: Callable[[], None]
    start: Callable[[], None]


@pytest.fixture(params=["postgresql", "nats"])
def stoppable_bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoppableBus]:
    if request.param == "nats":
        server = NatsServer(store=tmp_path / "nats")
        server.start()
        try:
            yield StoppableBus(server.url, server.stop, server.start)
        finally:
            server.stop()
        return
    cluster: PostgresCluster = start_cluster()

    def stop() -> None:  # a crash, as clients see it; the data stays
        cluster._run("pg_ctl", "stop", "-D", str(cluster.data_dir), "-m", "immediate", "-w")
        assert cluster.process is not None
        cluster.process.wait(timeout=30)

    def start() -> None:
        for _ in range(30):
            try:
                cluster._start_server()
                return
            except Exception:
                time.sleep(0.5)
        cluster._start_server()

    try:
        yield StoppableBus(cluster.dsn(), stop, start)
    finally:
        cluster.stop()


def test_without_contact_uses_with_limits_are_refused_until_caught_up_again(
    stoppable_bus: StoppableBus, owner: Owner, tmp_path: Path
) -> None:
    instance = start_instance(
        tmp_path / "cloud", owner, stoppable_bus.url, ["--bus-staleness", "5"]
    )
    try:
        wait_caught_up(instance)
        limited = owner.install(instance, owner.shared(uses=100))
        unlimited = owner.install(instance, owner.shared(uses=None))
        # No limit, but marked as needing fresh revocation state (lim.fresh).
        fresh = owner.install(instance, owner.shared(uses=None, fresh=True))
        assert pay(instance, limited).status_code == 200
        assert pay(instance, unlimited).status_code == 200
        assert pay(instance, fresh).status_code == 200

        stoppable_bus.stop()
        until(
            lambda: code(pay(instance, limited)) == "revocation_state_stale",
            timeout=15,
            what="uses with limits to be refused",
        )
        refused = pay(instance, limited)
        assert refused.status_code == 503
        assert code(pay(instance, fresh)) == "revocation_state_stale"
        # A capability without limits is still served: nothing about it must be exact.
        assert pay(instance, unlimited).status_code == 200

        stoppable_bus.start()
        until(
            lambda: pay(instance, limited).status_code == 200,
            timeout=30,
            what="uses with limits to be served again",
        )
        assert httpx.get(f"{instance.url}/healthz").json()["bus"]["caught_up"] is True
    finally:
        instance.stop()


@pytest.fixture
def pg_bus(postgres_dsn: str) -> Iterator[str]:
    schema = new_schema(postgres_dsn)
    try:
        yield with_schema(postgres_dsn, schema)
    finally:
        drop_schema(postgres_dsn, schema)


async def _publish(url: str, events: list[Event]) -> None:
    async with open_bus(url) as bus:
        for event in events:
            await bus.publish(event)


def test_forged_replayed_and_out_of_chain_revocations_are_refused_and_logged(
    pg_bus: str, owner: Owner, tmp_path: Path
) -> None:
    instance = start_instance(tmp_path / "cloud", owner, pg_bus, ["--instance-name", "cloud-x"])
    try:
        assert wait_caught_up(instance)["consumer"] == "cloud-x"
        shared = owner.shared()
        grant_id = owner.install(instance, shared)
        relay = owner.keys.generate(owner.keys.key_uri("relay"), Algorithm.EdDSA)
        now = int(time.time())
        bundle = shared.to_dict()
        # The operator holds P but issued nothing above it: it may not revoke P.
        out_of_chain = sign_event(
            relay,
            "revocation",
            {"record": owner.revocation(shared, signer=owner.operator), "bundle": bundle},
            now=now,
        )
        # A good record with a chain that does not hold its revoked link.
        other = owner.shared()
        wrong_bundle = sign_event(
            relay,
            "revocation",
            {"record": owner.revocation(shared), "bundle": other.to_dict()},
            now=now,
        )
        # A relay signature that does not verify: the bus itself drops it.
        head, payload, signature = out_of_chain.compact.split(".")
        tampered = Event(
            out_of_chain.id[:-2] + ("AA" if out_of_chain.id[-2:] != "AA" else "BA"),
            "revocation",
            relay.did,
            now,
            {},
            f"{head}.{payload}.{signature[::-1]}",
        )
        # Last, a good revocation of another capability, and the same event replayed:
        # once it is applied, everything before it was handled.
        sentinel = owner.shared()
        sentinel_grant = owner.install(instance, sentinel)
        good = sign_event(
            relay,
            "revocation",
            {"record": owner.revocation(sentinel), "bundle": sentinel.to_dict()},
            now=now,
        )
        replayed = sign_event(relay, "revocation", dict(good.body), now=now)
        asyncio.run(_publish(pg_bus, [out_of_chain, wrong_bundle, tampered, good, good]))
        until(
            lambda: pay(instance, sentinel_grant).status_code != 200,
            what="the good revocation to be applied",
        )
        # The same record again under another event id: applied again, changing nothing.
        asyncio.run(_publish(pg_bus, [replayed]))

        assert pay(instance, grant_id).status_code == 200  # P was not revoked
        metrics = httpx.get(f"{instance.url}/metrics").text
        refused = re.search(
            r'janus_cloud_bus_events_total\{kind="revocation",outcome="refused"\} (\S+)', metrics
        )
        assert refused is not None and float(refused.group(1)) == 2.0, metrics
        until(
            lambda: "refused revocation event" in instance.output(),
            what="refusals to be logged",
        )
        log = instance.output()
        assert out_of_chain.id in log and wrong_bundle.id in log
        assert "skipped a bad event" in log  # the tampered one, by the bus
        assert "Traceback" not in log
    finally:
        instance.stop()


def test_past_the_queue_depth_uses_are_answered_429_and_never_skip_a_check(
    pg_bus: str, owner: Owner, tmp_path: Path
) -> None:
    instance = start_instance(tmp_path / "cloud", owner, pg_bus, ["--max-queue-depth", "1"])
    try:
        wait_caught_up(instance)
        shared = owner.shared(uses=1000)
        grant_id = owner.install(instance, shared)
        answers: list[httpx.Response] = []
        with ThreadPoolExecutor(max_workers=16) as pool:
            for _ in range(5):  # until the burst overlapped (it nearly always does)
                answers += pool.map(lambda n: pay(instance, grant_id, n), range(32))
                if any(r.status_code == 429 for r in answers):
                    break
        served = [r for r in answers if r.status_code == 200]
        shed = [r for r in answers if r.status_code != 200]
        assert shed and {(r.status_code, code(r)) for r in shed} == {(429, "overloaded")}
        # Every served use was counted, and only those.
        last = max(r.json()["uses"][shared.leaf.id] for r in served)
        assert last == len(served)
    finally:
        instance.stop()


def test_a_home_elsewhere_without_a_bus_is_refused_and_a_home_here_is_counted_here(
    owner: Owner, tmp_path: Path
) -> None:
    instance = CloudProcess(tmp_path / "cloud", owner=owner.did)
    try:
        own = httpx.get(f"{instance.url}/v1/did").json()["did"]
        elsewhere = owner.keys.generate(owner.keys.key_uri("elsewhere"), Algorithm.EdDSA).did
        away = owner.install(instance, owner.shared(uses=3, home=elsewhere))
        refused = pay(instance, away)
        assert (refused.status_code, code(refused)) == (503, "home_ledger_unreachable")
        here = owner.install(instance, owner.shared(uses=3, home=own))
        # Counted here: the fourth use finds the grant used up (and its key destroyed).
        assert [pay(instance, here).status_code for _ in range(4)] == [200, 200, 200, 410]
    finally:
        instance.stop()


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    passphrase = state / "passphrase"
    passphrase.write_text("pass\n")
    passphrase.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "JANUS_PIN"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "cloud",
            "serve",
            "--state-dir",
            str(state),
            "--passphrase-file",
            str(state / "passphrase"),
            "--port",
            "0",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--event-bus", "ftp://bus.example"], "unknown event bus URL scheme"),
        (["--event-bus", "postgresql://janus:s3cret-pw@127.0.0.1:{port}/x"], "event bus"),
        (["--event-bus", "nats://127.0.0.1:{port}"], "event bus"),
        (["--bus-staleness", "5"], "--bus-staleness needs --event-bus"),
        (["--event-bus", "nats://127.0.0.1:4222", "--bus-staleness", "0"], "--bus-staleness"),
        (["--home-timeout", "5"], "--home-timeout needs --event-bus"),
        (["--event-bus", "nats://127.0.0.1:4222", "--home-timeout", "61"], "--home-timeout"),
        (["--max-queue-depth", "0"], "--max-queue-depth"),
    ],
)
def test_a_bad_or_unreachable_bus_fails_at_start_up(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    port = free_port()
    started = time.monotonic()
    result = _serve(tmp_path, *[a.format(port=port) for a in args])
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("janus: error: "), result.stderr
    assert expected in lines[0]
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
