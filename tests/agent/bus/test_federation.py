"""Federation: deployment B carries deployment A's revocations on its own bus."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bus import Event, open_bus
from agent.bus.link import link, unlink
from hardware.nats_server import NatsServer, leaf_linked_pair
from janus_hsm.provider import KeyHandle
from tests.agent.bus.conftest import drop_schema, new_schema, with_schema
from tests.agent.bus.helpers import Inbox, revocation_event, stored_count, use_event


@pytest.fixture
def nats_pair(tmp_path: Path) -> Iterator[tuple[NatsServer, NatsServer]]:
    """A's server (domain A, accepting leaf links) and B's (domain B, leaf-linked to A)."""
    with leaf_linked_pair(tmp_path) as pair:
        yield pair


async def _consume(url: str, consumer: str) -> tuple[Inbox, object]:
    bus = open_bus(url)
    await bus.start()
    inbox = Inbox()
    await bus.subscribe(inbox, consumer=consumer)
    return inbox, bus


def test_nats_link_carries_a_revocations_to_b(
    nats_pair: tuple[NatsServer, NatsServer], instance_key: KeyHandle, other_key: KeyHandle
) -> None:
    a, b = nats_pair

    async def main() -> None:
        result = await link(a.url, b.url, name="a")
        assert result.changed and result.detail == "sourcing domain A"
        assert not (await link(a.url, b.url, name="a")).changed  # idempotent
        async with open_bus(a.url) as bus_a, open_bus(b.url) as bus_b:
            inbox = Inbox()
            await bus_b.subscribe(inbox, consumer="b-instance")
            revoked = revocation_event(instance_key)
            await bus_a.publish(revoked)
            await bus_a.publish(use_event(instance_key))  # uses stay in A
            await bus_b.publish(use_event(other_key))  # and B's own events stay in B
            await inbox.wait_for(2, timeout=10)
            by_kind = {e.kind: e for e in inbox.events}
            assert by_kind["revocation"].compact == revoked.compact  # signature intact
            assert Event.parse(by_kind["revocation"].compact).issuer == instance_key.did
            assert by_kind["use"].issuer == other_key.did
            await asyncio.sleep(0.5)
            assert len(inbox.events) == 2
            assert await stored_count(a.url) == 2  # A's two; nothing of B's

        await asyncio.to_thread(a.stop)
        # With A down, B still holds A's revocation: a late instance of B gets it.
        async with open_bus(b.url) as late:
            late_inbox = Inbox()
            await late.subscribe(late_inbox, consumer="b-late")
            await late.catch_up(timeout=5)
            assert revoked.id in late_inbox.ids

        await asyncio.to_thread(a.start)
        result = await unlink(a.url, b.url, name="a")
        assert result.changed
        async with open_bus(a.url) as bus_a, open_bus(b.url) as bus_b:
            before = await stored_count(b.url)
            await bus_a.publish(revocation_event(instance_key, "cap-2"))
            await asyncio.sleep(1.0)
            assert await stored_count(b.url) == before

    asyncio.run(main())


@pytest.fixture
def pg_pair(postgres_dsn: str) -> Iterator[tuple[str, str, str]]:
    """Two buses (A's and B's) and A's schema, to take A away."""
    schema_a, schema_b = new_schema(postgres_dsn), new_schema(postgres_dsn)
    try:
        yield with_schema(postgres_dsn, schema_a), with_schema(postgres_dsn, schema_b), schema_a
    finally:
        drop_schema(postgres_dsn, schema_b)
        drop_schema(postgres_dsn, schema_a)


def test_postgres_mirror_carries_a_revocations_to_b(
    pg_pair: tuple[str, str, str], postgres_dsn: str, instance_key: KeyHandle
) -> None:
    url_a, url_b, schema_a = pg_pair

    async def main() -> None:
        async with open_bus(url_a) as bus_a, open_bus(url_b) as bus_b:
            before_link = revocation_event(instance_key, "cap-0")
            await bus_a.publish(before_link)  # published before the link: copied too
            stop = asyncio.Event()
            mirror = asyncio.create_task(link(url_a, url_b, name="from-a", stop=stop))
            inbox = Inbox()
            await bus_b.subscribe(inbox, consumer="b-instance")
            revoked = revocation_event(instance_key, "cap-1")
            await bus_a.publish(revoked)
            await bus_a.publish(use_event(instance_key))  # uses stay in A
            await inbox.wait_for(2, timeout=10)
            assert inbox.ids == [before_link.id, revoked.id]
            assert inbox.events[1].compact == revoked.compact  # signature intact
            await bus_b.publish(revoked)  # a copy arriving twice is stored once
            stop.set()
            assert (await mirror).copied == 2
            assert await stored_count(url_b) == 2

        drop_schema(postgres_dsn, schema_a)  # A is gone; B keeps what it copied
        async with open_bus(url_b) as late:
            late_inbox = Inbox()
            await late.subscribe(late_inbox, consumer="b-late")
            assert await late.catch_up(timeout=5) == 2
            assert revoked.id in late_inbox.ids
        # Unlinking needs only B (the cursor lives there), so it works with A gone.
        assert (await unlink(url_a, url_b, name="from-a")).changed
        assert not (await unlink(url_a, url_b, name="from-a")).changed

    asyncio.run(main())
