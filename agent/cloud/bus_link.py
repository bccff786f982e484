"""A cloud agent on an event bus: revocations that reach every instance, home ledgers.

Several instances, each with its own keys and ledger, share one bus (``--event-bus``).
What one instance learns that the others must enforce travels as a signed event:

- a revocation posted here is published with the bundle it was verified against, and
  every instance applies it after verifying it again (the bus is an untrusted carrier:
  an instance's signature on an event proves who relayed it, the revocation's own
  signature and chain prove the authority);
- a destroyed grant key and each counted use are published for monitoring (a use's
  event never delays or fails the use: it is dropped when the queue is full).

Failing closed: until the events missed while away are read (start-up, reconnection)
no use is served (``catching_up``), and when the bus has not been heard from for longer
than the staleness bound, uses of capabilities whose limits must be exact are refused
(``revocation_state_stale``).  A capability that names a *home* instance (``lim.home``)
is counted only there: other instances forward the spend by request/reply and refuse
when the home does not answer in time (``home_ledger_unreachable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent.bus.base import EventBus, check_consumer, open_bus
from agent.bus.errors import BusError
from agent.bus.events import Event, sign_event
from agent.cloud.bus_errors import (
    CatchingUpError,
    HomeLedgerRefusedError,
    HomeLedgerUnreachableError,
    OverloadedError,
    StaleRevocationStateError,
)
from agent.errors import AgentError, BadRequestError
from agent.http_service import error_response
from janus_hsm.errors import JanusHSMError
from policies.capability import Bundle
from policies.errors import FormatError, PolicyError
from policies.jws import strict_json
from policies.ledger.base import SpendReceipt
from policies.verify import Authorization

if TYPE_CHECKING:
    from agent.cloud.service import CloudAgent

log = logging.getLogger(__name__)

#: ``--bus-staleness`` default: seconds without contact before exact uses are refused.
DEFAULT_STALENESS: Final = 30.0
#: ``--max-queue-depth`` default on a bus: uses waiting before new ones get 429.
DEFAULT_QUEUE_DEPTH: Final = 1000
#: No contact for this long counts as a disconnection: catch up again once back.
RECONNECT_GAP: Final = 3.0
#: How long a forwarded spend waits for its home ledger's answer.
HOME_TIMEOUT: Final = 2.0
#: Catch-up attempts wait this long each, retrying until they succeed.
CATCH_UP_TIMEOUT: Final = 10.0
#: Events waiting to be published; past it, use events are dropped (monitoring only).
_OUTBOX: Final = 10_000
_MONITOR_INTERVAL: Final = 0.2


@dataclass(frozen=True)
class BusSettings:
    """What ``janus cloud serve`` was told about the bus (checked by the CLI)."""

    url: str
    staleness: float = DEFAULT_STALENESS
    instance_name: str | None = None  # the durable consumer; default the agent's DID
    home_timeout: float = HOME_TIMEOUT


def home_subject(did: str) -> str:
    """The request/reply subject an instance serves its home ledger on."""
    return "home." + did.removeprefix("did:key:")


class _Metrics:
    def __init__(self, registry: CollectorRegistry, link: BusLink) -> None:
        self.events = Counter(
            "janus_cloud_bus_events",
            "events published, applied, refused (failed verification) or dropped",
            ["outcome", "kind"],
            registry=registry,
        )
        self.forwarded = Counter(
            "janus_cloud_bus_forwarded_spends",
            "spends forwarded to a home ledger, by outcome",
            ["outcome"],
            registry=registry,
        )
        staleness = Gauge(
            "janus_cloud_bus_staleness_seconds",
            "seconds since the last successful exchange with the bus",
            registry=registry,
        )
        staleness.set_function(link.staleness)
        self.catch_up = Gauge(
            "janus_cloud_bus_catch_up_seconds",
            "how long the last catch-up took (start-up or reconnection)",
            registry=registry,
        )
        caught_up = Gauge(
            "janus_cloud_bus_caught_up", "1 once missed events are read", registry=registry
        )
        caught_up.set_function(lambda: float(link.ready()))


class BusLink:
    """The agent's side of the bus; created before serving, started on the server's loop."""

    def __init__(self, agent: CloudAgent, settings: BusSettings) -> None:
        self.agent = agent
        self.settings = settings
        self.consumer = check_consumer(settings.instance_name or agent.did)
        self.bus: EventBus = open_bus(settings.url)
        self.caught_up = False
        self.catch_up_seconds: float | None = None
        self._lost = False  # no contact for RECONNECT_GAP: a catch-up is due once back
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]]] | None = None
        # Events kept in the store until the bus acknowledges them (revocations).
        self._durable: asyncio.Queue[Event] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics: _Metrics | None = None
        self._catching: asyncio.Task[None] | None = None

    # --- life cycle ---------------------------------------------------------------------

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        self._metrics = _Metrics(registry, self)

    async def start(self) -> None:
        """Connect, subscribe, serve this instance's home ledger, then catch up in the
        background (uses wait for it: ``catching_up``)."""
        connecting = time.monotonic()  # catch-up time counts from here
        self._loop = asyncio.get_running_loop()
        self._outbox = asyncio.Queue(_OUTBOX)
        self._durable = asyncio.Queue()
        await self.bus.start()
        # Before any use is served: what this instance accepted but may not have
        # published before it stopped is applied here again, and published now.
        for event in await asyncio.to_thread(self._unpublished):
            self._durable.put_nowait(event)
        await self.bus.subscribe(self._on_event, consumer=self.consumer)
        await self.bus.serve(home_subject(self.agent.did), self._serve_home)
        self.agent.use_gate = self.gate
        self.agent.home_spend = self.forward_spend
        self.agent.home_spend_sync = self.forward_spend_sync
        self.agent.event_sink = self.emit
        self._tasks = [
            asyncio.create_task(self._publisher()),
            asyncio.create_task(self._durable_publisher()),
            asyncio.create_task(self._monitor()),
        ]
        self._catching = asyncio.create_task(self._catch_up(connecting))

    async def close(self) -> None:
        self.agent.event_sink = None
        tasks = [*self._tasks, *([self._catching] if self._catching else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.bus.close()

    async def _catch_up(self, started: float | None = None) -> None:
        """Read every event published before now; uses are refused until it is done.

        ``started``: when the wait began (at start-up: before connecting, as the
        subscription starts delivering what was missed at once)."""
        self.caught_up = False
        started = time.monotonic() if started is None else started
        while True:
            try:
                count = await self.bus.catch_up(timeout=CATCH_UP_TIMEOUT)
                break
            except BusError as exc:
                log.warning("event bus: catch-up not finished, retrying: %s", exc)
                await asyncio.sleep(0.5)
        self.catch_up_seconds = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.catch_up.set(self.catch_up_seconds)
        self.caught_up = True
        log.info("event bus: caught up (%d events) in %.3f s", count, self.catch_up_seconds)

    async def _monitor(self) -> None:
        """Notice a lost and regained contact with the bus: catch up again when back."""
        while True:
            await asyncio.sleep(_MONITOR_INTERVAL)
            if self.staleness() > RECONNECT_GAP:
                if not self._lost:
                    log.warning("event bus: no contact for %.1f s", self.staleness())
                self._lost = True
            elif self._lost:
                log.info("event bus: contact again; catching up")
                if self._catching is not None and not self._catching.done():
                    self._catching.cancel()
                self.caught_up = False
                self._lost = False
                self._catching = asyncio.create_task(self._catch_up())

    # --- the state uses are gated on ----------------------------------------------------

    def staleness(self) -> float:
        return max(0.0, time.monotonic() - self.bus.last_contact)

    def ready(self) -> bool:
        """Caught up, and not back from a lost contact without having caught up since
        (between the contact's return and the monitor's next look, events missed while
        away may be unread)."""
        return self.caught_up and not (self._lost and self.staleness() <= RECONNECT_GAP)

    def gate(self, limited: bool) -> None:
        """Refuse a use the agent cannot vouch for now (see the module docstring)."""
        if not self.ready():
            raise CatchingUpError(
                "this agent is reading the revocations it missed; try again in a moment"
            )
        if limited and self.staleness() > self.settings.staleness:
            raise StaleRevocationStateError(
                f"no contact with the event bus for {self.staleness():.0f} s (bound "
                f"{self.settings.staleness:g} s): uses with limits are refused until it is back"
            )

    def status(self) -> dict[str, Any]:
        return {
            "url": self.bus.url_redacted,
            "consumer": self.consumer,
            "caught_up": self.ready(),
            "staleness": round(self.staleness(), 3),
            "catch_up_seconds": self.catch_up_seconds,
        }

    # --- publishing ---------------------------------------------------------------------

    def emit(self, kind: str, body: dict[str, Any]) -> None:
        """Queue an event for publishing; from any thread, never blocking."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _on_loop(loop):
            self._enqueue(kind, body)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._enqueue, kind, body)

    def _enqueue(self, kind: str, body: dict[str, Any]) -> None:
        assert self._outbox is not None
        try:
            self._outbox.put_nowait((kind, body))
        except asyncio.QueueFull:
            self._count("dropped", kind)
            log.warning("event bus: outbox full, dropped a %s event", kind)

    def note_use(self, grant_id: str, action: str, uses: Mapping[str, int]) -> None:
        """A counted use, for monitoring (on the loop; never delays the answer)."""
        leaf = self.agent.leaf_of(grant_id)
        if leaf is not None:
            self.emit("use", {"cap": leaf, "uses": dict(uses), "action": action[:256]})

    async def publish(self, kind: str, body: dict[str, Any]) -> None:
        """Sign and publish now; BusUnavailableError if the bus did not take it."""
        event = sign_event(self.agent.identity, kind, body, now=int(time.time()))
        await self.bus.publish(event)
        self._count("published", kind)

    async def _publisher(self) -> None:
        """Publish queued events in order; keep retrying those that matter."""
        assert self._outbox is not None
        while True:
            kind, body = await self._outbox.get()
            while True:
                try:
                    await self.publish(kind, body)
                    break
                except BusError as exc:
                    if kind == "use":  # monitoring: not worth holding the others back
                        self._count("dropped", kind)
                        break
                    log.warning("event bus: publishing a %s event failed, retrying: %s", kind, exc)
                    await asyncio.sleep(1.0)
                except Exception:
                    log.exception("event bus: could not publish a %s event", kind)
                    self._count("dropped", kind)
                    break

    async def revoke(self, record: str) -> dict[str, Any]:
        """POST /v1/revocations on a bus: verify, keep the event, publish and apply it.

        The signed event is stored (``cloud_bus_outbox``) before the revocation is
        applied here, so a revocation this instance accepted is never known to it alone:
        if the bus does not take it now, it is retried while the instance runs and again
        at its next start.  Publishing does not wait for this instance's own durable
        writes (the other instances verify the event themselves), so the revocation
        reaches them sooner; the answer waits for both.
        """
        checked = await asyncio.to_thread(self.agent.check_revocation, record)
        body = {"record": checked.record.compact, "bundle": checked.bundle.to_dict()}
        event = sign_event(self.agent.identity, "revocation", body, now=int(time.time()))
        await asyncio.to_thread(self.agent.store.add_unpublished, event.id, event.compact)
        publishing = asyncio.create_task(self._publish_kept(event))
        try:
            result = await asyncio.to_thread(self.agent.apply_checked_revocation, checked)
        finally:
            published = await asyncio.gather(publishing, return_exceptions=True)
        failure = published[0]
        if isinstance(failure, BusError):
            # Applied here and kept: the durable publisher keeps trying.
            log.warning("event bus: revocation not published yet, will retry: %s", failure)
            assert self._durable is not None
            self._durable.put_nowait(event)
        elif isinstance(failure, BaseException):
            raise failure
        result["published"] = failure is None
        return result

    async def _publish_kept(self, event: Event) -> None:
        """Publish a stored event (same id on every attempt: the bus stores it once),
        then mark it published; BusError if the bus did not take it."""
        await self.bus.publish(event)
        self._count("published", event.kind)
        try:
            await asyncio.to_thread(self.agent.store.mark_published, event.id)
        except AgentError as exc:  # published all the same; only sent again at start-up
            log.warning("event bus: could not mark event %s published: %s", event.id, exc)

    async def _durable_publisher(self) -> None:
        """Retry stored events until the bus takes each (revocations are rare)."""
        assert self._durable is not None
        while True:
            event = await self._durable.get()
            while True:
                try:
                    await self._publish_kept(event)
                    break
                except BusError as exc:
                    log.warning(
                        "event bus: publishing event %s failed, retrying: %s", event.id, exc
                    )
                    await asyncio.sleep(1.0)
                except Exception:  # kept in the store all the same: sent at next start
                    log.exception("event bus: could not publish event %s", event.id)
                    break

    def _unpublished(self) -> list[Event]:
        """The stored events the bus never acknowledged, each applied here again
        (idempotent: the instance may have stopped between storing and applying)."""
        events = []
        for compact in self.agent.store.unpublished():
            try:
                event = Event.parse(compact)
            except BusError as exc:  # stored by this agent: only a damaged store
                log.warning("event bus: a kept event does not parse, skipped: %s", exc)
                continue
            if event.kind == "revocation":
                try:
                    self.agent.apply_revocation(event.body["record"], event.body["bundle"])
                except (PolicyError, FormatError, AgentError, JanusHSMError) as exc:
                    # Verified when it was accepted: still offered to the others, who
                    # verify it themselves.
                    log.warning("event bus: kept revocation not applied again: %s", exc)
            events.append(event)
        if events:
            log.info("event bus: %d event(s) accepted before a stop not yet published", len(events))
        return events

    # --- applying -------------------------------------------------------------------------

    async def _on_event(self, event: Event) -> None:
        """One event from the bus (signature already checked by the bus)."""
        if event.issuer == self.agent.did:
            return  # this instance's own: applied before it was published
        if event.kind != "revocation":
            self._count("received", event.kind)
            return
        try:
            result = await asyncio.to_thread(
                self.agent.apply_revocation, event.body["record"], event.body["bundle"]
            )
        except (PolicyError, FormatError, AgentError, JanusHSMError) as exc:
            # A forged, out-of-chain or garbled revocation: skipped, never fatal.  Other
            # exceptions (the ledger's store failing) propagate: the bus redelivers.
            self._count("refused", event.kind)
            log.warning(
                "event bus: refused revocation event %s from %s: %s: %s",
                event.id,
                event.issuer,
                getattr(exc, "code", type(exc).__name__),
                exc,
            )
            return
        self._count("applied", event.kind)
        log.info(
            "event bus: applied revocation of %s from %s (destroyed %s)",
            result["revoked"],
            event.issuer,
            result["destroyed"],
        )

    def _count(self, outcome: str, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.events.labels(outcome, kind).inc()

    # --- home ledgers ---------------------------------------------------------------------

    async def forward_spend(
        self, home: str, authorization: Authorization, now: float
    ) -> SpendReceipt:
        """Have ``home`` count a use verified here; its refusal is raised as its own."""
        payload = json.dumps(
            {
                "bundle": authorization.chain.bundle.to_dict(),
                "invocation": authorization.invocation.compact,
                "request": dict(authorization.request),
            },
            separators=(",", ":"),
        ).encode()
        try:
            answer = await self.bus.request(
                home_subject(home), payload, timeout=self.settings.home_timeout
            )
        except BusError:
            self._forwarded("unreachable")
            raise HomeLedgerUnreachableError(
                f"the home ledger {home} of this capability did not answer within "
                f"{self.settings.home_timeout:g} s"
            ) from None
        try:
            reply = strict_json(answer, "home ledger answer")
            if "error" in reply:
                error = reply["error"]
                self._forwarded("refused")
                raise HomeLedgerRefusedError(
                    f"home ledger {home}: {str(error['message'])[:500]}",
                    code=str(error["code"])[:64],
                    status=int(reply["status"]),
                    link=error.get("link") if isinstance(error.get("link"), int) else None,
                )
            uses = reply["uses"]
            if not isinstance(uses, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in uses.items()
            ):
                raise TypeError("uses")
            receipt = SpendReceipt(uses, int(reply.get("audit_seq", 0)))
        except (FormatError, KeyError, TypeError, ValueError):
            self._forwarded("bad_answer")
            raise HomeLedgerUnreachableError(
                f"the home ledger {home} answered something that is no spend receipt"
            ) from None
        self._forwarded("spent")
        return receipt

    def forward_spend_sync(
        self, home: str, authorization: Authorization, now: float
    ) -> SpendReceipt:
        """``forward_spend`` from a worker thread (the agent's blocking actions)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(
            self.forward_spend(home, authorization, now), self._loop
        )
        return future.result(self.settings.home_timeout + 5.0)

    def _forwarded(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.forwarded.labels(outcome).inc()

    async def _serve_home(self, payload: bytes) -> bytes:
        """Count a use another instance forwarded: verify it all again, then spend."""
        try:
            if not self.ready():
                raise CatchingUpError("the home ledger is reading the revocations it missed")
            request = strict_json(payload, "forwarded spend")
            bundle, invocation, body = (
                request.get("bundle"),
                request.get("invocation"),
                request.get("request"),
            )
            if not isinstance(invocation, str) or not isinstance(body, dict):
                raise BadRequestError("a forwarded spend is {bundle, invocation, request}")
            parsed = Bundle.from_dict(bundle)
            receipt = await asyncio.to_thread(
                self.agent.spend_as_home, parsed, invocation, body, now=time.time()
            )
        except (AgentError, PolicyError, JanusHSMError) as exc:
            response = error_response(exc)
            error = json.loads(bytes(response.body))["error"]
            return json.dumps({"status": response.status_code, "error": error}).encode()
        return json.dumps({"uses": receipt.uses, "audit_seq": receipt.audit_seq}).encode()


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def probe(url: str) -> None:
    """Connect once and leave: a bad or unreachable bus is said before serving."""
    bus = open_bus(url)
    try:
        await bus.start()
    finally:
        await bus.close()


__all__ = [
    "DEFAULT_QUEUE_DEPTH",
    "DEFAULT_STALENESS",
    "BusLink",
    "BusSettings",
    "OverloadedError",
    "probe",
]
