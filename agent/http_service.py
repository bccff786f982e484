"""What every HTTP service of the agent shares: errors, metrics, bounded bodies.

The cloud agent (with its receiving and sending services) and the directory answer in
one format, ``{"error": {"code", "message"}}`` with a status that says whose fault it
is, and read bodies the same way: size-limited before parsing, within a time limit.
Written once here so that each service's own module holds only its routes, and so that
no service imports another's server module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from agent.errors import AgentError, BadRequestError, RequestTimeoutError
from janus_hsm.errors import JanusHSMError
from policies.errors import (
    FormatError,
    LedgerError,
    LimitExceededError,
    PolicyError,
    PolicyViolationError,
    ReplayError,
    VerificationError,
)
from policies.jws import strict_json

log = logging.getLogger(__name__)

# uvicorn bounds the wait between requests (keep-alive) but not the wait for a body:
# a client that announces more than it sends would hold its connection for ever.
BODY_TIMEOUT = 10.0  # seconds to receive a whole request body

Handler = Callable[[Request], Any]
Endpoint = Callable[[str, Handler], Handler]


def _status(exc: Exception) -> int:
    if isinstance(exc, AgentError):
        return exc.status
    if isinstance(exc, FormatError):
        return 400
    if isinstance(exc, ReplayError):
        return 409
    if isinstance(exc, LimitExceededError):
        return 429
    if isinstance(exc, LedgerError):
        return 503  # the ledger's store is down or full: the client may try again later
    if isinstance(exc, VerificationError | PolicyViolationError):
        return 403
    return 500


# Starlette's own refusals (no such route, wrong method), in the API's error format.
_HTTP_CODES = {404: "no_route", 405: "method_not_allowed"}


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's exception handler for ``HTTPException``."""
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": exc.detail}},
        status_code=exc.status_code,
        headers=exc.headers,
    )


def error_response(exc: Exception) -> JSONResponse:
    status = _status(exc)
    message = str(exc)
    if isinstance(exc, JanusHSMError):
        # A key error names URIs and paths of this server's keystore: the log has them,
        # the client gets the stable code only.
        log.warning("key operation failed: %s: %s", type(exc).__name__, exc)
        message = "a key operation failed on this agent"
    body: dict[str, Any] = {"code": getattr(exc, "code", "error"), "message": message}
    link = getattr(exc, "link", None)
    if link is not None:
        body["link"] = link
    # After a body that did not arrive, the connection's state is unknown: close it.
    headers = {"connection": "close"} if isinstance(exc, RequestTimeoutError) else None
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class ServiceMetrics:
    """The metrics every service keeps, named ``janus_<prefix>_…``; services add theirs."""

    def __init__(self, prefix: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"janus_{prefix}_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            f"janus_{prefix}_request_seconds", "request latency", ["route"], registry=self.registry
        )
        self.refusals = Counter(
            f"janus_{prefix}_refusals", "refused requests", ["code"], registry=self.registry
        )


def endpoint_factory(metrics: ServiceMetrics, logger: logging.Logger) -> Endpoint:
    """``endpoint(name, handler)``: the handler with its errors answered and measured.

    A handler returns a ``Response`` or something JSON; a refusal of the agent's error
    hierarchy becomes its status and code; anything else is a fixed 500 that says
    nothing of the fault (the log has it).
    """

    def endpoint(name: str, handler: Handler) -> Handler:
        # Labelled metrics looked up once, not per request (labels() takes a lock).
        latency = metrics.latency.labels(name)
        counted: dict[int, Any] = {}

        async def run(request: Request) -> Response:
            started = time.perf_counter()
            try:
                result = await handler(request)
                response = result if isinstance(result, Response) else JSONResponse(result)
            except (AgentError, PolicyError, JanusHSMError) as exc:
                metrics.refusals.labels(getattr(exc, "code", "error")).inc()
                response = error_response(exc)
                if response.status_code >= 500:
                    logger.error("%s failed: %s: %s", name, type(exc).__name__, exc)
            except Exception:
                logger.exception("internal error in %s", name)
                response = JSONResponse(
                    {"error": {"code": "internal", "message": "internal error"}}, status_code=500
                )
            status = response.status_code
            counter = counted.get(status)
            if counter is None:
                counter = counted[status] = metrics.requests.labels(name, str(status))
            counter.inc()
            latency.observe(time.perf_counter() - started)
            return response

        return run

    return endpoint


async def threaded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn`` in a worker thread: what blocks (fsync, files, a database) stays off the loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def read_limited(request: Request, limit: int, too_large: Callable[[], Exception]) -> bytes:
    """The request body, refused with ``too_large()`` as soon as it passes ``limit`` bytes.

    The whole body must arrive within the app's ``state.body_timeout`` seconds
    (``BODY_TIMEOUT`` when unset), or the request is answered 408.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large()
    timeout: float = getattr(request.app.state, "body_timeout", BODY_TIMEOUT)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large()
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body did not arrive within {timeout:g} seconds"
        ) from None
    except ClientDisconnect:  # nobody to answer; not an internal error either
        raise BadRequestError("the client left before sending the whole body") from None
    return b"".join(chunks)


async def read_object(
    request: Request, limit: int, too_large: Callable[[], Exception]
) -> dict[str, Any]:
    """The body as a JSON object; an empty body is refused."""
    data = await read_limited(request, limit, too_large)
    if not data:
        raise BadRequestError("the request needs a JSON object body")
    return strict_json(data, "request body")
