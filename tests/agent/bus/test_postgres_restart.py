"""PostgreSQL crashes and comes back: every connection of the bus reconnects on its own,
the listener listens again, and nothing published meanwhile is missed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from agent.bus import open_bus
from hardware.postgres import PostgresCluster, PostgresUnavailable, start_cluster
from janus_hsm.provider import KeyHandle
from tests.agent.bus.helpers import Inbox, use_event

pytestmark = pytest.mark.slow


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: it is crashed, which the shared one must not be."""
    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        pytest.fail(f"cannot start PostgreSQL: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_the_bus_survives_a_server_crash(
    own_cluster: PostgresCluster, instance_key: KeyHandle
) -> None:
    url = own_cluster.dsn()

    async def main() -> None:
        publisher = open_bus(url, publish_timeout=15.0)
        reader = open_bus(url)
        await publisher.start()
        await reader.start()
        try:
            inbox = Inbox()
            await reader.subscribe(inbox, consumer="reader")

            async def spend(payload: bytes) -> bytes:
                return payload.upper()

            await reader.serve("ledger.home", spend)
            first = use_event(instance_key, 1)
            await publisher.publish(first)
            await inbox.wait_for(1)

            await asyncio.to_thread(own_cluster.restart)  # pg_ctl stop -m immediate
            restarted = time.monotonic()
            second = use_event(instance_key, 2)
            await publisher.publish(second)  # retried until the server is back
            await inbox.wait_for(2, timeout=15)
            assert inbox.ids == [first.id, second.id]
            assert await reader.catch_up(timeout=10) >= 1
            assert reader.last_contact > restarted
            answer = await publisher.request("ledger.home", b"spend", timeout=10)
            assert answer == b"SPEND"
        finally:
            await publisher.close()
            await reader.close()

    asyncio.run(main())
