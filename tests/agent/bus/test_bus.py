"""The event bus against real servers: the same contract on PostgreSQL and on NATS."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.bus import BusUnavailableError, Event, EventBus, open_bus, sign_event
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from tests.agent.bus.helpers import Inbox, destroyed_event, inject, stored_count, use_event


@pytest.fixture(params=["postgresql", "nats"])
def bus_url(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_bus_url")
        return url
    return str(request.getfixturevalue("nats_server").url)


async def started(url: str, **options: float) -> EventBus:
    bus = open_bus(url, **options)
    await bus.start()
    return bus


def test_published_events_reach_every_subscriber_in_order(
    bus_url: str, instance_key: KeyHandle
) -> None:
    async def main() -> None:
        publisher = await started(bus_url)
        readers = [await started(bus_url) for _ in range(3)]
        inboxes = [Inbox() for _ in readers]
        try:
            for n, (reader, inbox) in enumerate(zip(readers, inboxes, strict=True)):
                await reader.subscribe(inbox, consumer=f"reader-{n}")
            sent = [use_event(instance_key, n) for n in range(5)]
            for event in sent:
                await publisher.publish(event)
            for inbox in inboxes:
                await inbox.wait_for(5)
                assert inbox.ids == [e.id for e in sent]
                assert inbox.events[0].body == sent[0].body
            # The heartbeat keeps last_contact moving while the bus answers.
            before = readers[0].last_contact
            async with asyncio.timeout(5):  # a heartbeat a second, on a loaded machine
                while readers[0].last_contact <= before:
                    await asyncio.sleep(0.1)
            assert readers[0].events_delivered == 5
        finally:
            for bus in (publisher, *readers):
                await bus.close()

    asyncio.run(main())


def test_a_retried_publish_is_stored_and_delivered_once(
    bus_url: str, instance_key: KeyHandle
) -> None:
    async def main() -> None:
        first, second = await started(bus_url), await started(bus_url)
        try:
            event = destroyed_event(instance_key)
            await first.publish(event)
            await first.publish(event)  # as after a lost acknowledgement
            await second.publish(event)  # or from another instance (a federated copy)
            assert await stored_count(bus_url) == 1
            # A consumer that never saw it (no in-memory memory of ids) gets it once.
            reader = await started(bus_url)
            inbox = Inbox()
            await reader.subscribe(inbox, consumer="late")
            assert await reader.catch_up(timeout=5) == 1
            assert inbox.ids == [event.id]
            await reader.close()
        finally:
            await first.close()
            await second.close()

    asyncio.run(main())


def test_events_published_while_away_arrive_on_catch_up_and_the_cursor_survives(
    bus_url: str, instance_key: KeyHandle
) -> None:
    async def main() -> None:
        publisher = await started(bus_url)
        try:
            reader = await started(bus_url)
            inbox = Inbox()
            await reader.subscribe(inbox, consumer="did:key:z6MkInstance")
            seen = use_event(instance_key, 1)
            await publisher.publish(seen)
            await inbox.wait_for(1)
            # Handled is not yet recorded: catch_up returns once the cursor has moved
            # (closing before that would rightly mean a redelivery: at least once).
            await reader.catch_up(timeout=5)
            await reader.close()
            # Nobody listens now: a NOTIFY (or a core NATS message) sent now is lost.
            missed = [use_event(instance_key, n) for n in (2, 3)]
            for event in missed:
                await publisher.publish(event)
            again = await started(bus_url)
            inbox_again = Inbox()
            await again.subscribe(inbox_again, consumer="did:key:z6MkInstance")
            assert await again.catch_up(timeout=5) == 2
            # The durable cursor kept its place: the first event is not delivered again.
            assert inbox_again.ids == [e.id for e in missed]
            await again.close()
        finally:
            await publisher.close()

    asyncio.run(main())


def test_a_failing_handler_gets_the_event_again(bus_url: str, instance_key: KeyHandle) -> None:
    async def main() -> None:
        calls: list[str] = []

        async def flaky(event: Event) -> None:
            calls.append(event.id)
            if len(calls) == 1:
                raise RuntimeError("the ledger was busy")

        bus = await started(bus_url)
        try:
            await bus.subscribe(flaky, consumer="flaky")
            event = use_event(instance_key)
            await bus.publish(event)
            assert await bus.catch_up(timeout=5) == 1
            assert calls == [event.id, event.id]
        finally:
            await bus.close()

    asyncio.run(main())


def test_forged_and_garbled_events_are_skipped_without_stopping_the_consumer(
    bus_url: str, instance_key: KeyHandle, other_key: KeyHandle
) -> None:
    async def main() -> None:
        bus = await started(bus_url)
        try:
            inbox = Inbox()
            await bus.subscribe(inbox, consumer="victim")
            genuine = use_event(instance_key, 1)
            other = use_event(instance_key, 2)
            header, _, signature = genuine.compact.split(".")
            # Someone with write access to the bus swaps the payload under a signature.
            swapped = ".".join([header, other.compact.split(".")[1], signature])
            # Or signs with their own key but claims to be the instance.
            impostor = sign_event(other_key, "use", dict(genuine.body), now=genuine.issued_at)
            forged_parts = impostor.compact.split(".")
            payload = b64url.decode(forged_parts[1]).replace(
                other_key.did.encode(), instance_key.did.encode()
            )
            claimed = ".".join([forged_parts[0], b64url.encode(payload), forged_parts[2]])
            for data in (b"\xff not a jws", swapped.encode(), claimed.encode()):
                await inject(bus_url, data, event_id=b64url.random_id(16))
            await bus.publish(genuine)
            assert await bus.catch_up(timeout=5) == 1
            assert inbox.ids == [genuine.id]
            assert bus.events_refused == 3
            # The consumer is still alive: the next event arrives.
            later = use_event(instance_key, 3)
            await bus.publish(later)
            await inbox.wait_for(2)
            assert inbox.ids == [genuine.id, later.id]
        finally:
            await bus.close()

    asyncio.run(main())


def test_request_reply_and_timeouts(bus_url: str) -> None:
    async def main() -> None:
        home, remote = await started(bus_url), await started(bus_url)
        try:

            async def spend(payload: bytes) -> bytes:
                return b"spent:" + payload

            await home.serve("ledger.home-1", spend)
            assert await remote.request("ledger.home-1", b"cap-7", timeout=5) == b"spent:cap-7"
            answers = await asyncio.gather(
                *(remote.request("ledger.home-1", str(n).encode(), timeout=5) for n in range(8))
            )
            assert answers == [f"spent:{n}".encode() for n in range(8)]
            started_at = time.monotonic()
            with pytest.raises(BusUnavailableError) as caught:
                await remote.request("ledger.nobody", b"x", timeout=0.5)
            assert caught.value.code == "event_bus_unavailable"
            assert time.monotonic() - started_at < 3.0

            async def broken(payload: bytes) -> bytes:
                raise RuntimeError("home ledger failed")

            await home.serve("ledger.broken", broken)
            with pytest.raises(BusUnavailableError):
                await remote.request("ledger.broken", b"x", timeout=0.5)
        finally:
            await home.close()
            await remote.close()

    asyncio.run(main())
