"""The NATS JetStream event bus: one stream, a durable consumer per instance.

Events go to the stream ``JANUS_EVENTS`` (subjects ``janus.events.<kind>``, file
storage, replicas as configured), published with ``Nats-Msg-Id`` set to the event id,
so a publish retried after a lost acknowledgement is stored once (within the stream's
duplicate window, two minutes).  Each instance reads through a durable pull consumer
named after it: the server keeps its position, so a restarted instance resumes where
it stopped.  Request/reply uses core NATS subjects ``janus.rpc.<subject>`` with a
queue group, so one server answers each request.

A stream leader election (a node of a cluster lost) makes publishes fail for a couple
of seconds; ``publish`` retries them until ``publish_timeout`` (nats.go#1781 is the
same advice for Go clients).

URL: ``nats://[user:password@]host:port[,nats://host2:port…][?replicas=3&stream=NAME]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ExternalStream,
    StorageType,
    StreamConfig,
    StreamSource,
)

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
    raise_if_cancelled,
    wait_for_wake,
)
from agent.bus.errors import BusConfigError, BusError, BusUnavailableError
from agent.bus.events import MAX_COMPACT, Event

log = logging.getLogger(__name__)

STREAM: Final = "JANUS_EVENTS"
SUBJECTS: Final = "janus.events.>"
RPC_PREFIX: Final = "janus.rpc."
_RPC_QUEUE: Final = "janus-rpc"
_DUPLICATE_WINDOW: Final = 120.0
_ATTEMPT: Final = 1.0  # one publish attempt; retried until publish_timeout
_FETCH_WAIT: Final = 1.0
_BATCH: Final = 256
_ACK_WAIT: Final = 30.0
_MAX_BACKOFF: Final = 2.0
_SERVE_CONCURRENCY: Final = 16
_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_OPTIONS: Final = frozenset({"replicas", "stream"})
_USERINFO = re.compile(r"(?<=://)[^@/?#,]*@")


def redact_nats_url(url: str) -> str:
    """The URL with any credentials (user:password or a token) replaced by ``***``."""
    return _USERINFO.sub("***@", url)


def durable_name(consumer: str) -> str:
    """The JetStream consumer name for a consumer: itself if it is a plain short name,
    else a digest of it (a did:key is too long, and ``.`` is not allowed)."""
    if _NAME.fullmatch(consumer):
        return consumer
    return "c-" + hashlib.sha256(consumer.encode()).hexdigest()[:30]


class NatsBus(EventBus):
    """The bus on a NATS server or cluster with JetStream enabled."""

    def __init__(self, url: str, *, publish_timeout: float) -> None:
        self.url_redacted = redact_nats_url(url)
        self.publish_timeout = publish_timeout
        self.servers, options = _parse_url(url, self.url_redacted)
        self.stream = options.get("stream", STREAM)
        self.replicas = int(options.get("replicas", "1"))
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._last_contact = 0.0
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: set[asyncio.Task[None]] = set()
        self._delivery: Delivery | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._position = 0
        self._progress = asyncio.Event()

    @property
    def last_contact(self) -> float:
        return self._last_contact

    def _touch(self) -> None:
        self._last_contact = now_monotonic()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusConfigError("the event bus is not started")
        return self._js

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise BusConfigError("the event bus is not started")
        return self._nc

    # -- life cycle ---------------------------------------------------------------

    async def start(self) -> None:
        try:
            self._nc = await asyncio.wait_for(
                nats.connect(
                    servers=self.servers,
                    connect_timeout=min(2.0, self.publish_timeout),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    error_cb=_log_error,
                    disconnected_cb=self._on_disconnect,
                    reconnected_cb=self._on_reconnect,
                ),
                self.publish_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            raise BusUnavailableError(
                f"event bus {self.url_redacted}: cannot connect ({type(exc).__name__})"
            ) from None
        self._js = self._nc.jetstream()
        deadline = now_monotonic() + self.publish_timeout
        while True:
            try:
                await self._ensure_stream()
                break
            except (TimeoutError, nats.errors.Error) as exc:
                # JetStream answers a moment after the server does (a cluster electing).
                if now_monotonic() >= deadline:
                    await self.close()
                    raise BusUnavailableError(
                        f"event bus {self.url_redacted}: JetStream not available ({exc})"
                    ) from None
                await asyncio.sleep(0.2)
        self._touch()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="bus-heartbeat"))

    async def _ensure_stream(self) -> None:
        try:
            await self.js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        config = StreamConfig(
            name=self.stream,
            subjects=[SUBJECTS],
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=_DUPLICATE_WINDOW,
            discard=DiscardPolicy.OLD,
            max_msg_size=MAX_COMPACT,
        )
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self.js.stream_info(self.stream)  # created meanwhile by another instance

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in [*self._tasks, *self._serving]:
            await cancel(task)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), 2.0)

    async def _on_disconnect(self) -> None:
        if not self._closed:
            log.warning("event bus %s: disconnected, reconnecting", self.url_redacted)

    async def _on_reconnect(self) -> None:
        log.info("event bus %s: reconnected", self.url_redacted)

    async def _heartbeat_loop(self) -> None:
        """Ask the stream's leader for its state every second: contact with the bus is
        contact with JetStream, not only with some server."""
        while not self._closed:  # (nats-py may turn a cancellation into a timeout)
            try:
                await self.js.stream_info(self.stream)
                self._touch()
            except (TimeoutError, nats.errors.Error) as exc:
                log.debug("event bus heartbeat failed: %s", type(exc).__name__)
            if self._closed:  # a cancellation nats-py swallowed during the request
                break
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    # -- events -------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        deadline = now_monotonic() + self.publish_timeout
        backoff = 0.05
        problem = "no answer"
        while True:
            remaining = deadline - now_monotonic()
            if remaining <= 0:
                raise BusUnavailableError(
                    f"event bus {self.url_redacted}: could not publish event {event.id} "
                    f"within {self.publish_timeout:g} s ({problem})"
                )
            if not self.nc.is_connected:
                # Not sent while reconnecting: the client would buffer it and send it after
                # this call had already reported failure (a ghost publish).
                problem = "disconnected"
                await asyncio.sleep(min(backoff, remaining))
                backoff = min(backoff * 2, 0.5)
                continue
            try:
                await self.js.publish(
                    event.subject,
                    event.compact.encode("ascii"),
                    timeout=min(remaining, _ATTEMPT),
                    stream=self.stream,
                    headers={"Nats-Msg-Id": event.id},
                )
                self._touch()
                return
            except (TimeoutError, nats.errors.Error) as exc:
                raise_if_cancelled()
                problem = type(exc).__name__
                await asyncio.sleep(min(backoff, max(deadline - now_monotonic(), 0)))
                backoff = min(backoff * 2, 0.5)

    async def subscribe(self, handler: Handler, *, consumer: str) -> None:
        if self._delivery is not None:
            raise BusConfigError("this bus object already has a subscription")
        check_consumer(consumer)
        durable = durable_name(consumer)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=_ACK_WAIT,
            max_deliver=-1,
            filter_subject=SUBJECTS,
        )
        deadline = now_monotonic() + self.publish_timeout
        while True:  # retried like a publish: a cluster may be electing a leader
            try:
                self._psub = await self.js.pull_subscribe(
                    SUBJECTS, durable=durable, stream=self.stream, config=config
                )
                info = await self._psub.consumer_info()
                break
            except (TimeoutError, nats.errors.Error) as exc:
                raise_if_cancelled()
                if now_monotonic() >= deadline:
                    raise BusUnavailableError(
                        f"event bus {self.url_redacted}: cannot create consumer {durable} ({exc})"
                    ) from None
                await asyncio.sleep(0.2)
        self._position = info.ack_floor.stream_seq if info.ack_floor else 0
        self._delivery = Delivery(handler, consumer)
        self._tasks.append(asyncio.create_task(self._deliver_loop(), name="bus-deliver"))

    async def _deliver_loop(self) -> None:
        """Long-poll one message at a time (lowest latency live); when the server says
        more are pending, fetch them in batches (fast catch-up)."""
        psub = self._psub
        assert psub is not None
        backoff = 0.1
        want = 1
        while not self._closed:
            try:
                msgs = await psub.fetch(want, timeout=_FETCH_WAIT)
            except (TimeoutError, nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError):
                want = 1
                continue
            except Exception as exc:  # disconnected, server gone: the client reconnects
                if self._closed:
                    break
                log.debug("event bus fetch: %s", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                want = 1
                continue
            backoff = 0.1
            self._touch()
            pending = 0
            for n, msg in enumerate(msgs, 1):
                pending = await self._handle(msg, confirm=n == len(msgs))
            want = min(max(pending, 1), _BATCH)

    async def _handle(self, msg: Msg, *, confirm: bool) -> int:
        """Deliver one message, retrying the handler until it succeeds (so the order
        holds), then acknowledge it; returns how many more the server has pending.

        The last acknowledgement of a batch waits for the server's confirmation: the
        server handles a connection's acknowledgements in order, so when it confirms
        the last one it has the whole batch, at one round trip per batch.
        """
        delivery = self._delivery
        assert delivery is not None
        meta = msg.metadata
        seq = meta.sequence.stream
        backoff = 0.1
        while True:
            try:
                await delivery.deliver(msg.data, f"stream seq {seq}")
                break
            except Exception:
                if self._closed:
                    return 0  # not acknowledged: delivered again to the next subscriber
                log.exception("event bus: the handler failed on stream seq %d; will retry", seq)
                with contextlib.suppress(Exception):
                    await msg.in_progress()  # keep the server from redelivering meanwhile
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        # If an acknowledgement is lost the event comes again and is dropped as a repeat.
        with contextlib.suppress(Exception):
            if confirm:
                await msg.ack_sync(timeout=_ATTEMPT)
            else:
                await msg.ack()
        self._position = max(self._position, seq)
        self._progress.set()
        return int(meta.num_pending or 0)

    async def catch_up(self, *, timeout: float) -> int:
        delivery = self._delivery
        psub = self._psub
        if delivery is None or psub is None:
            raise BusConfigError("catch_up needs a subscription first")
        try:
            async with asyncio.timeout(timeout):
                target = (await self.js.stream_info(self.stream)).state.last_seq
                while self._position < target:
                    raise_if_cancelled()
                    await wait_for_wake(self._progress, 0.5)
                    if self._position < target:
                        # Messages deleted from the stream (limits) are never delivered:
                        # then the consumer's own counts say whether anything is left.
                        info = await psub.consumer_info()
                        if not info.num_pending and not info.num_ack_pending:
                            break
        except (TimeoutError, nats.errors.Error):
            raise BusUnavailableError(
                f"event bus {self.url_redacted}: catch-up did not finish within {timeout:g} s"
            ) from None
        self._touch()
        return delivery.take_count()

    # -- request/reply ------------------------------------------------------------

    async def request(self, subject: str, payload: bytes, *, timeout: float) -> bytes:
        check_subject(subject)
        if not self.nc.is_connected:
            # Buffered until reconnection, it could be answered (a use spent) after this
            # call had given up: refuse now instead.
            raise BusUnavailableError(
                f"no answer on {subject!r}: event bus {self.url_redacted} is disconnected"
            )
        deadline = now_monotonic() + timeout
        reason = "timeout"
        while (remaining := deadline - now_monotonic()) > 0:
            try:
                msg = await self.nc.request(RPC_PREFIX + subject, payload, timeout=remaining)
            except nats.errors.NoRespondersError:
                # Nobody subscribed, as far as this server knows: a server that just
                # started serving (in a cluster its interest reaches the other nodes a
                # moment later) or is restarting.  Nothing was sent to anyone: ask again.
                raise_if_cancelled()
                reason = "no responder"
                await asyncio.sleep(min(0.05, max(deadline - now_monotonic(), 0)))
                continue
            except (TimeoutError, nats.errors.Error):
                raise_if_cancelled()
                reason = "timeout"
                break
            self._touch()
            return bytes(msg.data)
        raise BusUnavailableError(
            f"no answer on {subject!r} within {timeout:g} s ({reason}; "
            f"event bus {self.url_redacted})"
        )

    async def serve(self, subject: str, handler: RequestHandler) -> None:
        check_subject(subject)
        slots = asyncio.Semaphore(_SERVE_CONCURRENCY)

        async def answer(msg: Msg) -> None:
            try:
                reply = await handler(msg.data)
                await msg.respond(reply)
            except Exception:
                log.exception("event bus: the request handler failed; the request stays unanswered")
            finally:
                slots.release()

        async def receive(msg: Msg) -> None:
            await slots.acquire()
            task = asyncio.create_task(answer(msg))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

        try:
            await self.nc.subscribe(RPC_PREFIX + subject, queue=_RPC_QUEUE, cb=receive)
            await self.nc.flush(timeout=max(1, int(self.publish_timeout)))
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailableError(
                f"event bus {self.url_redacted}: cannot serve {subject!r} ({type(exc).__name__})"
            ) from None

    # -- for federation -----------------------------------------------------------

    async def domain(self) -> str | None:
        """The JetStream domain of the server this bus is connected to."""
        try:
            info = await self.js.account_info()
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusUnavailableError(
                f"event bus {self.url_redacted}: JetStream not available ({exc})"
            ) from None
        return info.domain

    async def set_source(self, domain: str, *, present: bool, filter_subject: str) -> bool:
        """Add (or remove) this stream's source: the stream of the same name in JetStream
        domain ``domain``, reached over a leaf-node link.  True if the config changed."""
        try:
            info = await self.js.stream_info(self.stream)
            config = info.config
            api = f"$JS.{domain}.API"
            sources = [s for s in (config.sources or []) if _source_api(s) != api]
            if present:
                sources.append(
                    StreamSource(
                        name=self.stream,
                        filter_subject=filter_subject,
                        external=ExternalStream(api=api),
                    )
                )
            if [_source_api(s) for s in sources] == [_source_api(s) for s in config.sources or []]:
                return False
            await self.js.update_stream(config.evolve(sources=sources or None))
        except (TimeoutError, nats.errors.Error) as exc:
            raise BusError(
                f"event bus {self.url_redacted}: cannot change the stream's sources ({exc})"
            ) from None
        return True


def _source_api(source: StreamSource) -> str | None:
    return source.external.api if source.external is not None else None


def _parse_url(url: str, shown: str) -> tuple[list[str], dict[str, str]]:
    """The server URLs and the options (``?replicas=…&stream=…``) of a bus URL."""
    base, _, query = url.partition("?")
    servers = [s.strip() for s in base.split(",")]
    for server in servers:
        try:
            parts = urlsplit(server)
            parts.port  # noqa: B018 - raises ValueError on a port that is not a number
        except ValueError:
            raise BusConfigError(f"event bus URL {shown}: a server's port is malformed") from None
        if parts.scheme.lower() not in ("nats", "tls") or not parts.hostname:
            raise BusConfigError(
                f"event bus URL {shown}: each server must be nats://host:port (or tls://)"
            )
        if parts.path not in ("", "/") or parts.fragment:
            raise BusConfigError(f"event bus URL {shown}: a server URL takes no path")
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise BusConfigError(f"event bus URL {shown}: malformed ?options") from None
    for name, value in pairs:
        if name not in _OPTIONS or name in options:
            raise BusConfigError(
                f"event bus URL {shown}: unknown or repeated option {name[:32]!r} "
                "(known: replicas, stream)"
            )
        options[name] = value
    if "replicas" in options and options["replicas"] not in {"1", "2", "3", "4", "5"}:
        raise BusConfigError(f"event bus URL {shown}: replicas must be 1 to 5")
    if "stream" in options and not _NAME.fullmatch(options["stream"]):
        raise BusConfigError(f"event bus URL {shown}: a stream name is letters, digits, _ and -")
    return servers, options


async def _log_error(exc: Exception) -> None:
    log.debug("event bus client: %s: %s", type(exc).__name__, exc)
