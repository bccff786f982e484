"""Federation: deployment B carries deployment A's revocations on its own bus.

Two deployments with different owners keep their own buses.  B links to A so that B's
instances enforce A's revocations of capabilities that A's owners delegated to B's
agents, without sharing A's database:

- NATS: B's server is joined to A's by a leaf-node link (each its own JetStream
  domain; the link is server configuration, docs/event-bus.md), and B's stream
  *sources* A's stream, filtered to ``janus.events.revocation``.  The servers do the
  copying; ``link`` and ``unlink`` only change B's stream's sources.
- PostgreSQL: a mirror reads A's outbox (SELECT rights on ``janus_bus_events`` and
  LISTEN are all it needs there) from a cursor kept in B's database, and publishes each
  revocation into B's bus.  ``link`` runs it (a long-running process, or ``once``).

Either way the events keep their ids and signatures: B's de-duplication holds, and B's
instances verify each revocation against A's roots as they would any other.  B keeps
what it copied when A is down.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Final

from agent.bus.base import PUBLISH_TIMEOUT, open_bus, wait_for_wake
from agent.bus.errors import BusConfigError, BusError, EventFormatError
from agent.bus.events import KINDS, Event
from agent.bus.nats import NatsBus
from agent.bus.postgres import PostgresBus

log = logging.getLogger(__name__)

#: What a link carries unless told otherwise: revocations only (uses stay local).
DEFAULT_KINDS: Final = ("revocation",)
_LINK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_POLL: Final = 1.0
_MAX_BACKOFF: Final = 5.0


@dataclass(frozen=True)
class LinkResult:
    """What ``link`` or ``unlink`` did, for the command's output."""

    backend: str
    name: str
    changed: bool
    copied: int = 0
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "name": self.name,
            "changed": self.changed,
            "copied": self.copied,
            "detail": self.detail,
        }


def check_link_name(name: str) -> str:
    if not _LINK_NAME.fullmatch(name):
        raise BusConfigError("a link name is 1-64 letters, digits, _ and -")
    return name


def _backends(source_url: str, target_url: str) -> tuple[str, str]:
    kinds = tuple(
        "nats" if url.lower().startswith(("nats:", "tls:")) else "postgresql"
        for url in (source_url, target_url)
    )
    if kinds[0] != kinds[1]:
        raise BusConfigError(
            "a link joins two buses of the same kind (NATS to NATS, PostgreSQL to PostgreSQL)"
        )
    return kinds[0], kinds[1]


def cursor_name(name: str) -> str:
    """The cursor of a PostgreSQL link, in the target's ``janus_bus_cursors``."""
    return f"link:{name}"


async def link(
    source_url: str,
    target_url: str,
    *,
    name: str,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    once: bool = False,
    stop: asyncio.Event | None = None,
) -> LinkResult:
    """Make ``target_url``'s bus carry the source's events of ``kinds``.

    NATS: adds the source to the target's stream and returns.  PostgreSQL: mirrors
    until ``stop`` is set (or, with ``once``, until it has copied what is there now).
    """
    check_link_name(name)
    backend, _ = _backends(source_url, target_url)
    if not kinds or not set(kinds) <= KINDS:
        raise BusConfigError(f"a link carries events of kinds among {', '.join(sorted(KINDS))}")
    if backend == "nats":
        if tuple(kinds) != DEFAULT_KINDS:
            raise BusConfigError("a NATS link carries revocations only")
        domain = await _nats_domain(source_url)
        async with open_bus(target_url) as target:
            assert isinstance(target, NatsBus)
            changed = await target.set_source(
                domain, present=True, filter_subject="janus.events.revocation"
            )
        return LinkResult(backend, name, changed, detail=f"sourcing domain {domain}")
    mirror = PostgresMirror(source_url, target_url, name=name, kinds=kinds)
    copied = await mirror.run(once=once, stop=stop)
    return LinkResult(backend, name, True, copied=copied)


async def unlink(source_url: str, target_url: str, *, name: str) -> LinkResult:
    """Undo ``link``: the target stops carrying the source's events (what it already
    copied stays; revocations only grow).  PostgreSQL: forgets the link's cursor, so
    a later ``link`` of the same name starts again from the source's first event."""
    check_link_name(name)
    backend, _ = _backends(source_url, target_url)
    if backend == "nats":
        domain = await _nats_domain(source_url)
        async with open_bus(target_url) as target:
            assert isinstance(target, NatsBus)
            changed = await target.set_source(
                domain, present=False, filter_subject="janus.events.revocation"
            )
        return LinkResult(backend, name, changed, detail=f"no longer sourcing domain {domain}")
    async with open_bus(target_url) as target:
        assert isinstance(target, PostgresBus)
        changed = await target.delete_cursor(cursor_name(name))
    return LinkResult(backend, name, changed)


async def _nats_domain(url: str) -> str:
    async with open_bus(url) as source:
        assert isinstance(source, NatsBus)
        domain = await source.domain()
    if not domain:
        raise BusConfigError(
            f"the source server {source.url_redacted} has no JetStream domain: set "
            "jetstream { domain: NAME } in its configuration (docs/event-bus.md)"
        )
    return domain


class PostgresMirror:
    """Copies a source outbox's events of some kinds into a target PostgreSQL bus."""

    def __init__(
        self,
        source_url: str,
        target_url: str,
        *,
        name: str,
        kinds: tuple[str, ...] = DEFAULT_KINDS,
        publish_timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        self.name = check_link_name(name)
        self.kinds = frozenset(kinds)
        self.source = PostgresBus(source_url, publish_timeout=publish_timeout, read_only=True)
        target = open_bus(target_url, publish_timeout=publish_timeout)
        if not isinstance(target, PostgresBus):
            raise BusConfigError("a PostgreSQL link needs a postgresql:// target")
        self.target = target
        self.copied = 0
        self.refused = 0

    async def run(self, *, once: bool = False, stop: asyncio.Event | None = None) -> int:
        """Mirror until ``stop`` is set (``once``: until caught up); returns how many
        events were copied.  The source being away is logged and waited out."""
        await self.target.start()
        try:
            await self.source.start()
            wake = await self.source.events_wake()
            cursor = await self.target.load_cursor(cursor_name(self.name))
            backoff = 0.2
            while stop is None or not stop.is_set():
                try:
                    cursor, more = await self._copy_batch(cursor)
                    backoff = 0.2
                except BusError as exc:
                    if once:
                        raise
                    log.warning("federation link %s: %s; retrying", self.name, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
                if more:
                    continue
                if once:
                    break
                await _wait_either(wake, stop)
        finally:
            await self.source.close()
            await self.target.close()
        return self.copied

    async def _copy_batch(self, cursor: int) -> tuple[int, bool]:
        """Copy the next batch; the cursor is saved only after the copies are durable."""
        rows = await self.source.events_after(cursor)
        done = cursor
        for seq, compact in rows:
            try:
                event = Event.parse(compact)
            except EventFormatError as exc:
                self.refused += 1
                log.warning(
                    "federation link %s: skipped a bad event (seq %d): %s", self.name, seq, exc
                )
            else:
                if event.kind in self.kinds:
                    await self.target.publish(event)  # same id: stored once at the target
                    self.copied += 1
            done = seq
        if done > cursor:
            await self.target.save_cursor(cursor_name(self.name), done)
        return done, len(rows) > 0


async def _wait_either(wake: asyncio.Event, stop: asyncio.Event | None) -> None:
    if stop is None:
        await wait_for_wake(wake, _POLL)
        return
    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(waiters, timeout=_POLL, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    wake.clear()
