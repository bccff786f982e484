"""The event bus interface: one contract, two backends (PostgreSQL outbox, NATS JetStream).

The bus is an untrusted carrier of signed events (``agent.bus.events``) plus a
request/reply channel.  What a caller may rely on, whichever backend:

- ``publish`` returns only once the event is durable (a committed row, a JetStream
  acknowledgement), and a retried publish of the same event is stored once (its id is
  the de-duplication key);
- ``subscribe`` delivers, at least once and in publish order, every event after the
  consumer's durable cursor, then live ones; the cursor moves only after the handler
  returned, so a crash between the two means a redelivery, never a loss;
- ``catch_up`` waits until everything published before the call was delivered;
- ``last_contact`` tells how fresh that knowledge is (a heartbeat keeps it moving while
  the bus answers), so callers can fail closed when it grows old.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final

from agent.bus.errors import BusConfigError, EventFormatError
from agent.bus.events import Event
from janus_hsm.database_url import redact_dsn

log = logging.getLogger(__name__)

Handler = Callable[[Event], Awaitable[None]]
RequestHandler = Callable[[bytes], Awaitable[bytes]]

#: How long a publish keeps retrying transient failures (a leader election) by default.
PUBLISH_TIMEOUT: Final = 5.0
#: How often the heartbeat exchanges with the bus, in seconds.
HEARTBEAT_INTERVAL: Final = 1.0
#: How many recently delivered ids each consumer remembers, to drop redeliveries.
_RECENT_IDS: Final = 4096
_CONSUMER = re.compile(r"[\x21-\x7e]{1,200}")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_SCHEMES: Final = ("postgresql", "postgres", "nats", "tls")


class EventBus(abc.ABC):
    """A connection to one bus; see the module docstring for what each method promises.

    Usable as ``async with open_bus(url) as bus:`` (``start`` then ``close``).
    """

    #: The URL without credentials, for logs and metrics.
    url_redacted: str
    #: How long ``publish`` retries transient failures before BusUnavailableError.
    publish_timeout: float
    _delivery: Delivery | None = None

    @property
    def events_delivered(self) -> int:
        """Events handed to the handler (and returned from it) since ``subscribe``."""
        return 0 if self._delivery is None else self._delivery.delivered

    @property
    def events_refused(self) -> int:
        """Events from the bus that did not parse or verify, logged and skipped."""
        return 0 if self._delivery is None else self._delivery.refused

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect (and create the stream or tables if missing); BusUnavailableError if
        the bus cannot be reached in ``publish_timeout``."""

    @abc.abstractmethod
    async def publish(self, event: Event) -> None:
        """Store ``event`` durably; BusUnavailableError if that did not happen in time."""

    @abc.abstractmethod
    async def subscribe(self, handler: Handler, *, consumer: str) -> None:
        """Deliver events to ``handler`` from ``consumer``'s durable cursor on, then live.

        Returns once delivery has started (in the background).  An event that does not
        parse or verify is logged and skipped; a handler exception is logged and the
        event is delivered again later (the cursor has not moved past it).  One
        subscription per bus object.
        """

    @abc.abstractmethod
    async def catch_up(self, *, timeout: float) -> int:
        """Wait until every event published before this call went through the handler.

        Returns how many events were delivered since ``subscribe`` or the previous
        ``catch_up`` (the background delivery may have handed some over already);
        BusUnavailableError if that did not finish within ``timeout`` seconds.  Needs
        ``subscribe`` first.
        """

    @property
    @abc.abstractmethod
    def last_contact(self) -> float:
        """``time.monotonic()`` of the last successful exchange with the bus."""

    @abc.abstractmethod
    async def request(self, subject: str, payload: bytes, *, timeout: float) -> bytes:
        """Send ``payload`` to whoever serves ``subject`` and return the answer;
        BusUnavailableError when no answer came within ``timeout`` seconds."""

    @abc.abstractmethod
    async def serve(self, subject: str, handler: RequestHandler) -> None:
        """Answer requests on ``subject`` with ``handler`` (in the background) until close.

        A handler exception leaves the request unanswered (the requester times out).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop delivering and serving, and disconnect.  Safe to call twice."""

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def open_bus(url: str, *, publish_timeout: float = PUBLISH_TIMEOUT) -> EventBus:
    """The bus a URL names, not yet started: ``postgresql://…`` (or ``postgres://``) or
    ``nats://…`` (``tls://`` too; several servers separated by commas).

    BusConfigError for anything else; its message never shows a password.
    """
    if not isinstance(url, str) or not url.strip():
        raise BusConfigError("empty event bus URL: use postgresql://… or nats://host:port")
    if not publish_timeout > 0:
        raise BusConfigError("the publish timeout must be a positive number of seconds")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in _SCHEMES or not url[len(scheme) + 1 :].startswith("//"):
        # Only the scheme is shown: the rest may hold a password the redaction misses.
        shown = repr(scheme) if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,20}", scheme) else "?"
        raise BusConfigError(
            f"unknown event bus URL scheme {shown}: use postgresql://user@host/db or "
            "nats://host:port"
        )
    if scheme in ("postgresql", "postgres"):
        from agent.bus.postgres import PostgresBus

        return PostgresBus(url, publish_timeout=publish_timeout)
    from agent.bus.nats import NatsBus

    return NatsBus(url, publish_timeout=publish_timeout)


def redact_url(url: str) -> str:
    """``url`` with any password (or token) replaced by ``***``."""
    return redact_dsn(url)


def check_consumer(consumer: object) -> str:
    """A consumer name: 1-200 printable ASCII characters without spaces (a DID fits)."""
    if not isinstance(consumer, str) or not _CONSUMER.fullmatch(consumer):
        raise BusConfigError("a consumer name is 1-200 printable ASCII characters, no spaces")
    return consumer


def check_subject(subject: object) -> str:
    """A request/reply subject: dot-separated words of letters, digits, ``_`` and ``-``."""
    if not isinstance(subject, str) or len(subject) > 200 or not _SUBJECT.fullmatch(subject):
        raise BusConfigError("a request subject is dot-separated words of letters, digits, _ and -")
    return subject


class Delivery:
    """What both backends do with one event from the bus: parse, drop repeats, hand over.

    Parsing here (not in the handler) means a forged or garbled event is logged and
    skipped by the consumer itself, and the handler only ever sees signed events.
    """

    def __init__(self, handler: Handler, consumer: str) -> None:
        self.handler = handler
        self.consumer = consumer
        self.delivered = 0
        self._counted = 0
        self.refused = 0
        self._recent: OrderedDict[str, None] = OrderedDict()

    def take_count(self) -> int:
        """Events delivered since the subscription or the previous call (catch_up's
        answer: whether the background delivery or catch_up itself handed them over)."""
        count, self._counted = self.delivered - self._counted, self.delivered
        return count

    async def deliver(self, data: str | bytes, where: str) -> bool:
        """Give the event to the handler; False if it was refused or seen before.

        A handler exception propagates: the caller must not move its cursor.
        """
        try:
            event = Event.parse(data)
        except EventFormatError as exc:
            self.refused += 1
            log.warning("event bus: skipped a bad event at %s (%s): %s", where, exc.code, exc)
            return False
        if event.id in self._recent:
            self._recent.move_to_end(event.id)
            return False
        await self.handler(event)
        self._recent[event.id] = None
        if len(self._recent) > _RECENT_IDS:
            self._recent.popitem(last=False)
        self.delivered += 1
        return True


async def wait_for_wake(wake: asyncio.Event, timeout: float) -> None:
    """Wait until ``wake`` is set or ``timeout`` passed, then clear it: a poll that a
    wake-up cuts short."""
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation
    # that arrives as the awaited thing completes, and a loop would then run on.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await wake.wait()
    wake.clear()


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed (nats-py awaits its replies with
    ``asyncio.wait_for``, which on Python 3.11 can return the reply and drop a
    cancellation that came at the same moment): a retry loop must stop when cancelled.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def now_monotonic() -> float:
    return time.monotonic()


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for it, whatever it was doing."""
    if task is None or task.done():
        return
    task.cancel()
    # wait() rather than await: the task's own exception is not ours to raise, while a
    # cancellation of the caller still propagates.
    await asyncio.wait({task})
