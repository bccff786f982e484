"""The PostgreSQL event bus: an outbox table, durable cursors, NOTIFY as a wake-up only.

NOTIFY alone is not a bus: what is sent while a listener is disconnected is lost, and
a payload is limited to 8000 bytes.  So events live in a table (``janus_bus_events``),
each consumer keeps a durable cursor (``janus_bus_cursors``) and reads what lies past
it; a NOTIFY with an empty payload only says "look at the table now", and a poll every
second covers a wake-up lost while the listening connection was being re-established.

Publishes take a transaction-scoped advisory lock, so rows commit in the order of
their ``seq``: without it, a reader could see seq 6 committed while seq 5 is still in
flight, move its cursor to 6, and never see 5.  The lock makes publishes one at a time
(one commit each); events are rare (revocations, key destructions), and use events are
for monitoring, so this is the right trade for a cursor that can never skip a row.

Request/reply goes through ``janus_bus_requests``: the requester inserts a row and
notifies the subject's channel; a server claims it (``FOR UPDATE SKIP LOCKED``, so
exactly one server handles it), writes the answer and notifies the requester's own
channel with the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from agent.bus.base import (
    HEARTBEAT_INTERVAL,
    Delivery,
    EventBus,
    Handler,
    RequestHandler,
    cancel,
    check_consumer,
    check_subject,
    now_monotonic,
    redact_url,
    wait_for_wake,
)
from agent.bus.errors import BusConfigError, BusError, BusUnavailableError
from agent.bus.events import Event
from janus_hsm import b64url

log = logging.getLogger(__name__)

EVENTS_CHANNEL: Final = "janus_bus_events"
#: Serialises publishes (see the module docstring); any constant shared by all writers.
_PUBLISH_LOCK: Final = 0x4A414E5553425553  # "JANUSBUS"
_SCHEMA_LOCK: Final = _PUBLISH_LOCK + 1
_BATCH: Final = 500
_POLL: Final = 1.0
_CONNECT_TIMEOUT: Final = 5.0
_QUERY_TIMEOUT: Final = 5.0
_MAX_BACKOFF: Final = 2.0
_SERVE_CONCURRENCY: Final = 16

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS janus_bus_events (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    compact text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS janus_bus_cursors (
    consumer text PRIMARY KEY,
    seq bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS janus_bus_requests (
    id text PRIMARY KEY,
    subject text NOT NULL,
    payload bytea NOT NULL,
    reply_channel text NOT NULL,
    reply bytea,
    claimed boolean NOT NULL DEFAULT false,
    deadline timestamptz NOT NULL,
    created timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS janus_bus_requests_open
    ON janus_bus_requests (subject, created) WHERE NOT claimed;
"""

_T = TypeVar("_T")
_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError, OSError)


def subject_channel(subject: str) -> str:
    """The NOTIFY channel of a request subject: an identifier, whatever the subject."""
    return "janus_rpc_" + hashlib.sha256(subject.encode()).hexdigest()[:24]


class PostgresBus(EventBus):
    """The bus in one PostgreSQL database (the tables are created on start)."""

    def __init__(self, url: str, *, publish_timeout: float, read_only: bool = False) -> None:
        self.url_redacted = redact_url(url)
        try:
            conninfo_to_dict(url)
        except psycopg.Error:
            # libpq's complaint is not shown: it may quote the part holding a password.
            raise BusConfigError(
                "the postgresql:// event bus URL is malformed (see libpq's connection URIs)"
            ) from None
        self._url = url
        self.publish_timeout = publish_timeout
        # Read-only: another deployment's outbox, read by a federation link with SELECT
        # rights only; nothing is created there.
        self.read_only = read_only
        self._conns: dict[str, AsyncConnection[Any]] = {}
        self._conn_locks: dict[str, asyncio.Lock] = {}
        self._busy: dict[str, asyncio.Lock] = {}
        self._last_contact = 0.0
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._reply_channel = "janus_reply_" + b64url.random_id(12).replace("-", "_").lower()
        self._channels: set[str] = set()
        self._listening: set[str] = set()
        self._wakes: dict[str, asyncio.Event] = {}
        self._replies: dict[str, asyncio.Future[None]] = {}
        self._delivery: Delivery | None = None
        self._cursor = 0
        self._deliver_lock = asyncio.Lock()
        self._serving: set[asyncio.Task[None]] = set()

    # -- connections --------------------------------------------------------------

    async def _connection(self, name: str) -> AsyncConnection[Any]:
        """The named connection, (re)opened if needed; each background job has its own
        so that a slow catch-up never holds up a publish or the heartbeat."""
        conn = self._conns.get(name)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        lock = self._conn_locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self._conns.get(name)
            if old is not None and not old.closed and not old.broken:
                return old
            if old is not None:
                await _close_quietly(old)
            if self._closed:
                raise BusUnavailableError(f"event bus {self.url_redacted} is closed")
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                fresh: AsyncConnection[Any] = await AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=3
                )
            if name == "deliver":
                # A cursor lost in a server crash only means redelivery (de-duplicated),
                # so its commits need not wait for the disk; the events' commits do.
                await fresh.execute("SET synchronous_commit = off")
            self._conns[name] = fresh
            self._touch()
            return fresh

    async def _drop(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is not None:
            await _close_quietly(conn)

    async def _with(
        self, name: str, job: Callable[[AsyncConnection[Any]], Awaitable[_T]], timeout: float
    ) -> _T:
        """Run ``job`` on a named connection; a transient failure drops the connection
        (the next call reconnects) and is raised as BusUnavailableError."""
        # One job at a time per connection: a transaction is the connection's state, so
        # two tasks' transactions must not interleave on it.
        busy = self._busy.setdefault(name, asyncio.Lock())
        try:
            async with asyncio.timeout(timeout), busy:
                conn = await self._connection(name)
                result = await job(conn)
        except _TRANSIENT as exc:
            await self._drop(name)
            raise BusUnavailableError(
                f"event bus {self.url_redacted}: {_first_line(exc)}"
            ) from None
        except psycopg.Error as exc:  # not the network: a missing right, a bad schema
            raise BusError(f"event bus {self.url_redacted}: {_first_line(exc)}") from None
        except asyncio.CancelledError:
            # Cancelled mid-query (a caller's timeout): the connection's state is unknown.
            await self._drop(name)
            raise
        self._touch()
        return result

    def _touch(self) -> None:
        self._last_contact = now_monotonic()

    @property
    def last_contact(self) -> float:
        return self._last_contact

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        deadline = now_monotonic() + self.publish_timeout
        while True:
            try:
                await self._with(
                    "main", _head if self.read_only else _create_schema, _QUERY_TIMEOUT
                )
                break
            except BusUnavailableError:
                if now_monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.2)
            except BusError as exc:  # e.g. no right to create the tables
                raise BusConfigError(str(exc)) from None
        self._channels.add(self._reply_channel)
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="bus-listen"))
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="bus-heartbeat"))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in [*self._tasks, *self._serving]:
            await cancel(task)
        self._tasks.clear()
        for name in list(self._conns):
            await self._drop(name)

    async def _heartbeat_loop(self) -> None:
        """A cheap query every second: ``last_contact`` says the bus answered lately.
        Now and then it also removes requests nobody will read any more."""
        beats = 0
        while not self._closed:
            try:
                if beats % 60 == 0 and not self.read_only:
                    await self._with("main", _purge_requests, _QUERY_TIMEOUT)
                else:
                    await self._with("main", _ping, HEARTBEAT_INTERVAL * 2)
            except BusError as exc:
                log.debug("event bus heartbeat failed: %s", exc)
            beats += 1
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _listen_loop(self) -> None:
        """Receive NOTIFYs on one connection; (re)LISTEN after every reconnection and then
        wake everyone, since what was notified meanwhile is lost."""
        backoff = 0.1
        while not self._closed:
            try:
                conn = await self._connection("listen")
                if self._listening != self._channels:
                    for channel in sorted(self._channels - self._listening):
                        await conn.execute(f'LISTEN "{channel}"')
                        self._listening.add(channel)
                    self._wake_all()
                async for note in conn.notifies(timeout=0.2):
                    self._touch()
                    self._on_notify(note.channel, note.payload)
                backoff = 0.1
            except _TRANSIENT as exc:
                log.debug("event bus listener lost its connection: %s", _first_line(exc))
                self._listening.clear()
                await self._drop("listen")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            except BusError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == self._reply_channel:
            future = self._replies.get(payload)
            if future is not None and not future.done():
                future.set_result(None)
            return
        wake = self._wakes.get(channel)
        if wake is not None:
            wake.set()

    def _wake_all(self) -> None:
        for wake in self._wakes.values():
            wake.set()
        for future in self._replies.values():  # a reply may have been missed: look
            if not future.done():
                future.set_result(None)

    async def _listen(self, channel: str) -> asyncio.Event:
        """Add a channel to the listener; returns once it is listened to."""
        wake = self._wakes.setdefault(channel, asyncio.Event())
        self._channels.add(channel)
        for _ in range(100):
            if channel in self._listening:
                break
            await asyncio.sleep(0.05)
        return wake

    # -- events -------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        deadline = now_monotonic() + self.publish_timeout
        backoff = 0.05
        while True:
            remaining = deadline - now_monotonic()
            try:
                await self._with(
                    "publish",
                    lambda conn: _insert_event(conn, event.id, event.compact),
                    max(remaining, 0.01),
                )
                return
            except BusUnavailableError:
                if now_monotonic() + backoff >= deadline:
                    raise BusUnavailableError(
                        f"event bus {self.url_redacted}: could not publish event {event.id} "
                        f"within {self.publish_timeout:g} s"
                    ) from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)

    async def subscribe(self, handler: Handler, *, consumer: str) -> None:
        if self._delivery is not None:
            raise BusConfigError("this bus object already has a subscription")
        check_consumer(consumer)
        self._delivery = Delivery(handler, consumer)
        self._cursor = await self._with(
            "deliver", lambda conn: load_cursor(conn, consumer), _QUERY_TIMEOUT
        )
        wake = await self._listen(EVENTS_CHANNEL)
        self._tasks.append(asyncio.create_task(self._deliver_loop(wake), name="bus-deliver"))

    async def _deliver_loop(self, wake: asyncio.Event) -> None:
        backoff = 0.1
        while not self._closed:
            await wait_for_wake(wake, _POLL)
            try:
                if await self._pass():
                    backoff = 0.1
                    continue
            except BusError as exc:
                log.debug("event bus delivery: %s", exc)
            await asyncio.sleep(backoff)  # a handler failed, or the bus is away
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _pass(self) -> bool:
        """Deliver what lies past the cursor, then move the cursor; False if a handler
        failed (the cursor then stops just before the event it failed on)."""
        delivery = self._delivery
        assert delivery is not None
        async with self._deliver_lock:
            while True:
                rows = await self._with(
                    "deliver", lambda conn: _events_after(conn, self._cursor), _QUERY_TIMEOUT
                )
                done = self._cursor
                ok = True
                for seq, compact in rows:
                    try:
                        await delivery.deliver(compact, f"seq {seq}")
                    except Exception:
                        log.exception("event bus: the handler failed on seq %d; will retry", seq)
                        ok = False
                        break
                    done = seq
                if done > self._cursor:
                    await self._save_delivered(delivery.consumer, done)
                    self._cursor = done
                if not ok:
                    return False
                if len(rows) < _BATCH:
                    return True

    async def _save_delivered(self, consumer: str, seq: int) -> None:
        await self._with("deliver", lambda conn: save_cursor(conn, consumer, seq), _QUERY_TIMEOUT)

    async def catch_up(self, *, timeout: float) -> int:
        delivery = self._delivery
        if delivery is None:
            raise BusConfigError("catch_up needs a subscription first")
        try:
            async with asyncio.timeout(timeout):
                target = await self._with("deliver", _head, timeout)
                while self._cursor < target:
                    if not await self._pass():
                        await asyncio.sleep(0.05)
        except (TimeoutError, BusUnavailableError):
            raise BusUnavailableError(
                f"event bus {self.url_redacted}: catch-up did not finish within {timeout:g} s"
            ) from None
        return delivery.take_count()

    # -- request/reply ------------------------------------------------------------

    async def request(self, subject: str, payload: bytes, *, timeout: float) -> bytes:
        check_subject(subject)
        request_id = b64url.random_id(16)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self._with(
                    "request",
                    lambda conn: _insert_request(
                        conn, request_id, subject, payload, self._reply_channel, timeout
                    ),
                    timeout,
                )
                while True:
                    await future
                    reply = await self._with(
                        "request", lambda conn: _take_reply(conn, request_id), timeout
                    )
                    if reply is not None:
                        return reply
                    future = asyncio.get_running_loop().create_future()
                    self._replies[request_id] = future
        except TimeoutError:
            raise BusUnavailableError(
                f"no answer on {subject!r} within {timeout:g} s (event bus {self.url_redacted})"
            ) from None
        finally:
            self._replies.pop(request_id, None)
            if not self._closed:
                # Unanswered: nobody may answer it later (and count a use twice).
                with contextlib.suppress(BusError):
                    await self._with("request", lambda conn: _delete_request(conn, request_id), 1.0)

    async def serve(self, subject: str, handler: RequestHandler) -> None:
        check_subject(subject)
        wake = await self._listen(subject_channel(subject))
        task = asyncio.create_task(self._serve_loop(subject, handler, wake), name="bus-serve")
        self._tasks.append(task)

    async def _serve_loop(self, subject: str, handler: RequestHandler, wake: asyncio.Event) -> None:
        slots = asyncio.Semaphore(_SERVE_CONCURRENCY)
        while not self._closed:
            await wait_for_wake(wake, _POLL)
            while True:
                await slots.acquire()
                try:
                    claimed = await self._with(
                        "serve", lambda conn: _claim_request(conn, subject), _QUERY_TIMEOUT
                    )
                except BusError as exc:
                    slots.release()
                    log.debug("event bus serve %s: %s", subject, exc)
                    await asyncio.sleep(0.2)
                    break
                if claimed is None:
                    slots.release()
                    break
                task = asyncio.create_task(self._answer(claimed, handler, slots))
                self._serving.add(task)
                task.add_done_callback(self._serving.discard)

    async def _answer(
        self,
        claimed: tuple[str, bytes, str],
        handler: RequestHandler,
        slots: asyncio.Semaphore,
    ) -> None:
        request_id, payload, reply_channel = claimed
        try:
            reply = await handler(payload)
            await self._with(
                "serve",
                lambda conn: _store_reply(conn, request_id, reply, reply_channel),
                _QUERY_TIMEOUT,
            )
        except Exception:
            log.exception("event bus: the request handler failed; the request stays unanswered")
        finally:
            slots.release()

    # -- for federation -----------------------------------------------------------

    async def events_after(self, seq: int) -> list[tuple[int, str]]:
        """Up to a batch of (seq, compact) rows of the outbox after ``seq``, in order."""
        return await self._with("deliver", lambda conn: _events_after(conn, seq), _QUERY_TIMEOUT)

    async def events_wake(self) -> asyncio.Event:
        """An event set whenever something is published (or may have been, after the
        listener reconnected); the waiter clears it."""
        return await self._listen(EVENTS_CHANNEL)

    async def load_cursor(self, consumer: str) -> int:
        """The durable cursor of ``consumer`` in this database (0 if it has none)."""
        return await self._with("main", lambda conn: load_cursor(conn, consumer), _QUERY_TIMEOUT)

    async def save_cursor(self, consumer: str, seq: int) -> None:
        await self._with("main", lambda conn: save_cursor(conn, consumer, seq), _QUERY_TIMEOUT)

    async def delete_cursor(self, consumer: str) -> bool:
        """Forget ``consumer``'s cursor; True if it had one."""
        return await self._with("main", lambda conn: _delete_cursor(conn, consumer), _QUERY_TIMEOUT)


# -- SQL ----------------------------------------------------------------------------


async def _create_schema(conn: AsyncConnection[Any]) -> None:
    async with conn.transaction():
        # Two instances starting at once would race on CREATE TABLE IF NOT EXISTS.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        await conn.execute(SCHEMA)


async def _ping(conn: AsyncConnection[Any]) -> None:
    await conn.execute("SELECT 1")


async def _purge_requests(conn: AsyncConnection[Any]) -> None:
    await conn.execute(
        "DELETE FROM janus_bus_requests WHERE deadline < now() - interval '1 minute'"
    )


async def _insert_event(conn: AsyncConnection[Any], event_id: str, compact: str) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PUBLISH_LOCK,))
        await conn.execute(
            "INSERT INTO janus_bus_events (id, compact) VALUES (%s, %s) "
            "ON CONFLICT (id) DO NOTHING",
            (event_id, compact),
        )
        await conn.execute("SELECT pg_notify(%s, '')", (EVENTS_CHANNEL,))


async def _events_after(conn: AsyncConnection[Any], cursor: int) -> list[tuple[int, str]]:
    cur = await conn.execute(
        "SELECT seq, compact FROM janus_bus_events WHERE seq > %s ORDER BY seq LIMIT %s",
        (cursor, _BATCH),
    )
    return [(int(seq), str(compact)) for seq, compact in await cur.fetchall()]


async def _head(conn: AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT coalesce(max(seq), 0) FROM janus_bus_events")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def load_cursor(conn: AsyncConnection[Any], consumer: str) -> int:
    cur = await conn.execute("SELECT seq FROM janus_bus_cursors WHERE consumer = %s", (consumer,))
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def save_cursor(conn: AsyncConnection[Any], consumer: str, seq: int) -> None:
    await conn.execute(
        "INSERT INTO janus_bus_cursors (consumer, seq) VALUES (%s, %s) "
        "ON CONFLICT (consumer) DO UPDATE SET seq = greatest(janus_bus_cursors.seq, excluded.seq)",
        (consumer, seq),
    )


async def _delete_cursor(conn: AsyncConnection[Any], consumer: str) -> bool:
    cur = await conn.execute("DELETE FROM janus_bus_cursors WHERE consumer = %s", (consumer,))
    return cur.rowcount > 0


async def _insert_request(
    conn: AsyncConnection[Any],
    request_id: str,
    subject: str,
    payload: bytes,
    reply_channel: str,
    timeout: float,
) -> None:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO janus_bus_requests (id, subject, payload, reply_channel, deadline) "
            "VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))",
            (request_id, subject, payload, reply_channel, timeout),
        )
        await conn.execute("SELECT pg_notify(%s, '')", (subject_channel(subject),))


async def _take_reply(conn: AsyncConnection[Any], request_id: str) -> bytes | None:
    cur = await conn.execute(
        "DELETE FROM janus_bus_requests WHERE id = %s AND reply IS NOT NULL RETURNING reply",
        (request_id,),
    )
    row = await cur.fetchone()
    return None if row is None else bytes(row[0])


async def _delete_request(conn: AsyncConnection[Any], request_id: str) -> None:
    await conn.execute("DELETE FROM janus_bus_requests WHERE id = %s", (request_id,))


async def _claim_request(conn: AsyncConnection[Any], subject: str) -> tuple[str, bytes, str] | None:
    cur = await conn.execute(
        "UPDATE janus_bus_requests SET claimed = true WHERE id = ("
        " SELECT id FROM janus_bus_requests"
        " WHERE subject = %s AND NOT claimed AND deadline > now()"
        " ORDER BY created FOR UPDATE SKIP LOCKED LIMIT 1"
        ") RETURNING id, payload, reply_channel",
        (subject,),
    )
    row = await cur.fetchone()
    return None if row is None else (str(row[0]), bytes(row[1]), str(row[2]))


async def _store_reply(
    conn: AsyncConnection[Any], request_id: str, reply: bytes, reply_channel: str
) -> None:
    async with conn.transaction():
        await conn.execute(
            "UPDATE janus_bus_requests SET reply = %s WHERE id = %s", (reply, request_id)
        )
        await conn.execute("SELECT pg_notify(%s, %s)", (reply_channel, request_id))


async def _close_quietly(conn: AsyncConnection[Any]) -> None:
    # Already broken, most likely: nothing is left to release but the socket.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(), 1.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
