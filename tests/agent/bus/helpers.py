"""What the bus tests share: an inbox handler, event factories, raw injection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import psycopg

from agent.bus import Event, sign_event
from janus_hsm.provider import KeyHandle
from policies.revocation import sign_revocation


class Inbox:
    """A handler that keeps what it was given, and lets a test wait for it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.events]

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()


def use_event(key: KeyHandle, n: int = 1) -> Event:
    return sign_event(
        key, "use", {"cap": f"cap-{n}", "uses": {f"cap-{n}": n}, "action": "sign"}, now=now()
    )


def destroyed_event(key: KeyHandle, grant: str = "g1") -> Event:
    return sign_event(
        key, "key-destroyed", {"grant": grant, "leaf": "leaf-1", "reason": "expired"}, now=now()
    )


def now() -> int:
    return int(time.time())


async def inject(url: str, data: bytes, *, event_id: str) -> None:
    """Put raw bytes on the bus as an event, bypassing ``publish`` (an attacker's write)."""
    if url.startswith("postgresql"):
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO janus_bus_events (id, compact) VALUES (%s, %s)",
                (event_id, data.decode("latin-1")),
            )
            await conn.execute("NOTIFY janus_bus_events")
        return
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.publish("janus.events.revocation", data, headers={"Nats-Msg-Id": event_id})
    finally:
        await nc.close()


async def stored_count(url: str) -> int:
    """How many events the bus holds."""
    if url.startswith("postgresql"):
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            row: Any = await (
                await conn.execute("SELECT count(*) FROM janus_bus_events")
            ).fetchone()
            return int(row[0])
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("JANUS_EVENTS")
        return int(info.state.messages)
    finally:
        await nc.close()


def revocation_event(key: KeyHandle, revoked: str = "cap-1") -> Event:
    """A revocation event (its record signed by ``key``; the bundle is not checked here:
    verifying it against the chain is the applier's job)."""
    record = sign_revocation(key, revoked_id=revoked, now=now(), reason="compromised")
    return sign_event(key, "revocation", {"record": record, "bundle": {"chain": []}}, now=now())
