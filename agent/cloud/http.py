"""The cloud agent's HTTP API (Starlette on uvicorn).

Handlers are coroutines; what blocks (the ledger's fsync, key files, the store) runs in
threads.  Actions on the agent's own grants (``CloudAgent.act_async``) do their CPU
work on the loop and hand only the ledger write to one writer thread, which commits
concurrent uses together.  Every error is JSON with
a stable ``code``; bodies are size-limited before parsing and must arrive within a
time limit.  See docs/cloud-agent.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.cloud.service import CloudAgent

if TYPE_CHECKING:
    from agent.cloud.bus_link import BusLink
    from agent.cloud.receiving import ReceivingService
    from agent.cloud.sending import SendingService
from agent.cloud.bus_errors import OverloadedError
from agent.errors import BadRequestError, UnauthorizedError
from agent.http_service import (
    BODY_TIMEOUT,
    ServiceMetrics,
    endpoint_factory,
    http_error,
    read_limited,
    threaded,
)
from agent.protocol import sign_routing_key
from policies.jws import strict_json
from policies.ledger.aio import AsyncSpender

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
SWEEP_INTERVAL = 5.0


def _too_large() -> Exception:
    return BadRequestError(f"request body larger than {MAX_BODY} bytes")


class Metrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("cloud")
        self.uses = Counter(
            "janus_cloud_capability_uses",
            "actions performed",
            ["action"],
            registry=self.registry,
        )
        self.relay = Counter(
            "janus_cloud_relay_events",
            "receiving and sending services: delivered, submitted, forwarded, retried, failed",
            ["event"],
            registry=self.registry,
        )


class _Shedder:
    """Load shedding: past ``depth`` uses in progress, a new one is answered 429 at once
    (before any check or spend), rather than queueing without bound or skipping a check."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.waiting = 0

    def __enter__(self) -> None:
        if self.waiting >= self.depth:
            raise OverloadedError(
                f"more than {self.depth} uses are in progress here; try again shortly"
            )
        self.waiting += 1

    def __exit__(self, *exc: object) -> None:
        self.waiting -= 1


def _check_bearer(request: Request, token: str | None) -> None:
    if token is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), token.encode()):
        raise UnauthorizedError("this agent requires 'Authorization: Bearer <api token>'")


async def _text(request: Request) -> str:
    data = await read_limited(request, MAX_BODY, _too_large)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError("request body is not UTF-8 text") from None


async def _json(request: Request) -> dict[str, Any]:
    data = await read_limited(request, MAX_BODY, _too_large)
    if not data:
        return {}
    return strict_json(data, "request body")


def build_app(
    agent: CloudAgent,
    *,
    body_timeout: float = BODY_TIMEOUT,
    receiving: ReceivingService | None = None,
    sending: SendingService | None = None,
    bus: BusLink | None = None,
    max_queue_depth: int | None = None,
) -> Starlette:
    """The API of ``agent``; a request body must arrive within ``body_timeout`` seconds.

    ``receiving`` and ``sending`` add those services' routes (``--receiving``, ``--sending``).
    ``bus`` puts the agent on an event bus (``--event-bus``, agent/cloud/bus_link.py);
    ``max_queue_depth`` answers 429 to uses past that many waiting.
    """
    metrics = Metrics()
    if bus is not None:
        bus.attach_metrics(metrics.registry)
    shed = _Shedder(max_queue_depth) if max_queue_depth is not None else None
    # Actions' ledger writes, gathered on the event loop into group commits.
    spender = AsyncSpender(agent.ledger)

    endpoint = endpoint_factory(metrics, log)

    async def healthz(request: Request) -> dict[str, Any]:
        if bus is not None:
            return {"status": "ok", "did": agent.did, "bus": bus.status()}
        return {"status": "ok", "did": agent.did}

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # Signed once: the routing key does not change while the agent runs.
    routing_proof = sign_routing_key(agent.identity, agent.routing_key.did, now=int(time.time()))

    async def did(request: Request) -> dict[str, Any]:
        return {
            "did": agent.did,
            "owner": agent.config.owner,
            "routing_key": agent.routing_key.did,
            "routing_proof": routing_proof,
        }

    async def openapi(request: Request) -> dict[str, Any]:
        from agent.cloud.openapi import OPENAPI

        return OPENAPI

    async def create_grant(request: Request) -> JSONResponse:
        body = await _json(request)
        record = await threaded(agent.create_grant, body.get("request"))
        return JSONResponse(
            {"grant_id": record.grant_id, "did": record.did, "status": record.status},
            status_code=201,
        )

    async def install(request: Request) -> dict[str, Any]:
        text = await _text(request)
        record = await threaded(agent.install, request.path_params["grant_id"], text)
        return {
            "grant_id": record.grant_id,
            "did": record.did,
            "status": record.status,
            "expires": record.expires_at,
        }

    async def show_grant(request: Request) -> dict[str, Any]:
        record = await threaded(agent.store.grant, request.path_params["grant_id"])
        return {
            "grant_id": record.grant_id,
            "did": record.did,
            "status": record.status,
            "reason": record.reason,
            "expires": record.expires_at,
        }

    uses: dict[str, Any] = {}  # action -> its labelled use counter

    async def act(request: Request) -> Response:
        _check_bearer(request, agent.config.api_token)
        body = await _json(request)
        resource, payload = body.get("resource"), body.get("request", {})
        if not isinstance(resource, str) or not isinstance(payload, dict):
            raise BadRequestError("body must be {'resource': str, 'request': object}")
        action = request.path_params["action"]
        if shed is None:
            result = await agent.act_async(
                spender, request.path_params["grant_id"], action, resource, payload
            )
        else:
            with shed:
                result = await agent.act_async(
                    spender, request.path_params["grant_id"], action, resource, payload
                )
        if bus is not None:
            bus.note_use(result.grant_id, result.action, result.result["uses"])
        counter = uses.get(result.action)
        if counter is None:  # labels() takes a lock and builds a tuple: once per action
            counter = uses[result.action] = metrics.uses.labels(result.action)
        counter.inc()
        return Response(result.to_json(), media_type="application/json")

    async def invoke_external(request: Request) -> dict[str, Any]:
        body = await _json(request)
        bundle, invocation, payload = (
            body.get("bundle"),
            body.get("invocation"),
            body.get("request", {}),
        )
        if (
            not isinstance(bundle, dict)
            or not isinstance(invocation, str)
            or not isinstance(payload, dict)
        ):
            raise BadRequestError(
                "body must be {'bundle': object, 'invocation': str, 'request': object}"
            )
        with shed if shed is not None else contextlib.nullcontext():
            result = await threaded(agent.invoke_external, bundle, invocation, payload)
        if bus is not None:
            bus.note_use(result.grant_id, result.action, result.result["uses"])
        metrics.uses.labels(result.action).inc()
        return {"action": result.action, "grant_id": result.grant_id, **result.result}

    async def didcomm_inbound(request: Request) -> JSONResponse:
        data = await read_limited(request, MAX_BODY, _too_large)
        from agent.cloud.inbound import receive_forward

        result = await threaded(receive_forward, agent, data)
        metrics.uses.labels("msg/receive").inc()
        return JSONResponse(result, status_code=202)

    async def pickup(request: Request) -> dict[str, Any]:
        body = await _json(request)
        signed = body.get("request")
        limit = body.get("limit", 100)
        if (
            not isinstance(signed, str)
            or not isinstance(limit, int)
            or isinstance(limit, bool)  # JSON true is no count
            or not 0 < limit <= 1000
        ):
            raise BadRequestError("body must be {'request': <owner-signed JWS>, 'limit': 1-1000}")
        result: dict[str, Any] = await threaded(agent.pickup, signed, limit=limit)
        return result

    async def revoke(request: Request) -> dict[str, Any]:
        body = await _json(request)
        record = body.get("record")
        if not isinstance(record, str):
            raise BadRequestError("body must be {'record': <revocation JWS>}")
        if bus is not None:
            return await bus.revoke(record)
        result: dict[str, Any] = await threaded(agent.revoke, record)
        return result

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def sweeper() -> None:
            while True:
                await asyncio.sleep(SWEEP_INTERVAL)
                try:
                    await threaded(agent.sweep)
                except Exception:
                    log.exception("sweep failed")

        # What exists now (modules, keys, the app) lives as long as the process: moved
        # out of the collector's generations, it is not walked again by every full
        # collection, which a use's short-lived objects trigger every few seconds.
        gc.freeze()
        if bus is not None:
            await bus.start()
        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            if bus is not None:
                await bus.close()
            spender.close()

    routes = [
        # First: the route of every use (Starlette tries the routes in order).
        Route(
            "/v1/grants/{grant_id}/actions/{action:path}", endpoint("act", act), methods=["POST"]
        ),
        Route("/healthz", endpoint("healthz", healthz), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics_endpoint), methods=["GET"]),
        Route("/openapi.json", endpoint("openapi", openapi), methods=["GET"]),
        Route("/v1/did", endpoint("did", did), methods=["GET"]),
        Route("/v1/grants", endpoint("create_grant", create_grant), methods=["POST"]),
        Route("/v1/grants/{grant_id}", endpoint("show_grant", show_grant), methods=["GET"]),
        Route("/v1/grants/{grant_id}/bundle", endpoint("install", install), methods=["PUT"]),
        Route("/v1/invoke", endpoint("invoke", invoke_external), methods=["POST"]),
        Route("/v1/didcomm", endpoint("didcomm", didcomm_inbound), methods=["POST"]),
        Route("/v1/pickup", endpoint("pickup", pickup), methods=["POST"]),
        Route("/v1/revocations", endpoint("revoke", revoke), methods=["POST"]),
    ]

    def relay_event(event: str) -> None:
        metrics.relay.labels(event).inc()

    if receiving is not None:
        from agent.cloud.receiving import receiving_routes

        routes += receiving_routes(receiving, endpoint, threaded, relay_event)
    if sending is not None:
        from agent.cloud.sending import sending_routes

        sending.on_event = relay_event
        routes += sending_routes(
            sending, endpoint, threaded, lambda r: _check_bearer(r, agent.config.api_token)
        )
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    app.state.body_timeout = body_timeout
    return app
