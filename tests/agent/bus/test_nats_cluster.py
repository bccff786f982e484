"""A 3-node NATS cluster, stream with 3 replicas: kill -9 the stream leader while
publishing; every acknowledged event is still there (publish retries through the
leader election instead of failing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from agent.bus import open_bus
from hardware.nats_server import NatsServer, cluster
from janus_hsm.provider import KeyHandle
from tests.agent.bus.helpers import Inbox, revocation_event

pytestmark = pytest.mark.slow


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[NatsServer]]:
    servers = cluster(tmp_path)
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


async def _leader(url: str) -> str:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("JANUS_EVENTS")
        assert info.cluster is not None and info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await nc.close()


def test_no_acknowledged_event_is_lost_when_the_leader_is_killed(
    nodes: list[NatsServer], instance_key: KeyHandle
) -> None:
    url = ",".join(server.url for server in nodes) + "?replicas=3"

    async def main() -> None:
        publisher = open_bus(url, publish_timeout=20.0)
        await publisher.start()  # waits for the cluster to elect its leaders
        acknowledged: list[str] = []
        slowest = 0.0
        try:
            leader = await _leader(nodes[0].url)
            victim = next(server for server in nodes if server.name == leader)
            for n in range(40):
                if n == 15:
                    await asyncio.to_thread(victim.stop, kill=True)
                event = revocation_event(instance_key, f"cap-{n}")
                started = time.monotonic()
                await publisher.publish(event)  # raises if not acknowledged in time
                slowest = max(slowest, time.monotonic() - started)
                acknowledged.append(event.id)
        finally:
            await publisher.close()
        assert slowest < 20.0
        survivor = next(server for server in nodes if server is not victim)
        reader = open_bus(survivor.url, publish_timeout=20.0)
        await reader.start()
        try:
            inbox = Inbox()
            await reader.subscribe(inbox, consumer="auditor")
            await reader.catch_up(timeout=20)
            assert set(acknowledged) <= set(inbox.ids)
            assert len(inbox.ids) == len(set(inbox.ids)) == 40
        finally:
            await reader.close()

    asyncio.run(main())
