"""NATS: a stopped server makes publishes fail in time and freezes last_contact; after a
restart on the same store, durable consumers resume where they were."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.bus import BusUnavailableError, open_bus
from hardware.nats_server import NatsServer
from janus_hsm.provider import KeyHandle
from tests.agent.bus.helpers import Inbox, use_event


def test_outage_then_restart(nats_server: NatsServer, instance_key: KeyHandle) -> None:
    async def main() -> None:
        publisher = open_bus(nats_server.url, publish_timeout=1.5)
        live, away = open_bus(nats_server.url), open_bus(nats_server.url)
        for bus in (publisher, live, away):
            await bus.start()
        live_inbox, away_inbox = Inbox(), Inbox()
        try:
            await live.subscribe(live_inbox, consumer="live")
            await away.subscribe(away_inbox, consumer="away")
            before = use_event(instance_key, 1)
            await publisher.publish(before)
            await live_inbox.wait_for(1)
            await away_inbox.wait_for(1)
            await away.catch_up(timeout=5)  # its position is on the server now
            await away.close()  # this instance is down during the outage and after it

            await asyncio.to_thread(nats_server.stop)
            stopped_at = time.monotonic()
            with pytest.raises(BusUnavailableError) as caught:
                await publisher.publish(use_event(instance_key, 2))
            assert caught.value.code == "event_bus_unavailable"
            assert time.monotonic() - stopped_at < 1.5 + 2.0  # the deadline, with slack
            with pytest.raises(BusUnavailableError):
                await live.request("ledger.home", b"spend", timeout=1)
            await asyncio.sleep(1.5)
            # No heartbeat got through since the stop: the caller can see it is stale.
            assert live.last_contact < stopped_at + 0.5
            assert time.monotonic() - live.last_contact > 1.5

            await asyncio.to_thread(nats_server.start)
            restarted_at = time.monotonic()
            publisher.publish_timeout = 10.0  # until the client has reconnected
            after = use_event(instance_key, 3)
            await publisher.publish(after)
            await live_inbox.wait_for(len(live_inbox.events) + 1, timeout=10)
            assert after.id in live_inbox.ids
            assert live_inbox.ids.count(before.id) == 1
            await live.catch_up(timeout=10)
            assert live.last_contact > restarted_at

            # The instance that was away resumes from its durable consumer on the server.
            back = open_bus(nats_server.url)
            await back.start()
            back_inbox = Inbox()
            try:
                await back.subscribe(back_inbox, consumer="away")
                assert await back.catch_up(timeout=10) >= 1
                assert after.id in back_inbox.ids
                assert before.id not in back_inbox.ids
            finally:
                await back.close()
        finally:
            for bus in (publisher, live, away):
                await bus.close()

    asyncio.run(main())
