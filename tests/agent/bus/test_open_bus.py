"""Choosing a backend from a URL: fail fast, and never show a password."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.bus import BusConfigError, BusUnavailableError, open_bus
from hardware.postgres import free_port

SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(
    "url",
    [
        "",
        f"redis://user:{SECRET}@127.0.0.1:6379",
        f"amqp://{SECRET}@host",
        f"postgresql:user:{SECRET}@host/db",
        f"postgresql://user:{SECRET}%zz@host/db",
        f"postgresql://user:{SECRET}@host/db?no_such_option=1",
        f"nats://user:{SECRET}@host:notaport",
        f"nats://user:{SECRET}@host:4222?replicas=9",
        f"nats://user:{SECRET}@host:4222?unknown=1",
        f"nats://user:{SECRET}@host:4222,http://other",
        f"nats://{SECRET}@host:4222/path",
        f"{SECRET}",
    ],
)
def test_a_bad_url_is_refused_without_echoing_the_password(url: str) -> None:
    with pytest.raises(BusConfigError) as caught:
        open_bus(url)
    assert caught.value.code == "bad_event_bus_url"
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("scheme", ["postgresql", "nats"])
def test_an_unreachable_bus_fails_start_in_time(scheme: str) -> None:
    bus = open_bus(
        f"{scheme}://janus:{SECRET}@127.0.0.1:{free_port()}/janus"
        if scheme == "postgresql"
        else f"nats://janus:{SECRET}@127.0.0.1:{free_port()}",
        publish_timeout=1.0,
    )
    assert SECRET not in bus.url_redacted

    async def main() -> None:
        started = time.monotonic()
        try:
            with pytest.raises(BusUnavailableError) as caught:
                await bus.start()
            assert time.monotonic() - started < 5
            assert caught.value.code == "event_bus_unavailable"
            assert SECRET not in str(caught.value)
        finally:
            await bus.close()

    asyncio.run(main())
