"""The directory's HTTP API (Starlette on uvicorn), in the cloud agent's manner.

Bodies are size-limited before parsing and must arrive within a time limit; every
refusal is ``{"error": {"code", "message"}}`` with a 4xx status; a 5xx means a fault of
the server (its database down), never of the input.  Store work runs in threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.directory.errors import DirectoryError
from agent.directory.service import DirectoryService
from agent.directory.treehead import TreeHead
from agent.errors import BadRequestError
from agent.http_service import (
    BODY_TIMEOUT,
    ServiceMetrics,
    endpoint_factory,
    http_error,
    read_object,
    threaded,
)

log = logging.getLogger(__name__)

PUBLISH_BODY = 1024 * 1024  # 200 prekey pairs in base64url, and room
SMALL_BODY = 64 * 1024


class Metrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("directory")
        self.claims = Counter(
            "janus_directory_claims",
            "claims answered, by kind (one_time, last_resort)",
            ["kind"],
            registry=self.registry,
        )


def _int_param(request: Request, name: str, default: int | None = None) -> int:
    text = request.query_params.get(name)
    if text is None:
        if default is None:
            raise BadRequestError(f"the query needs '{name}' (a non-negative integer)")
        return default
    if not text.isdigit() or len(text) > 19:
        raise BadRequestError(f"'{name}' must be a non-negative integer")
    return int(text)


def build_app(service: DirectoryService, *, body_timeout: float = BODY_TIMEOUT) -> Starlette:
    metrics = Metrics()

    endpoint = endpoint_factory(metrics, log)

    def too_large(limit: int) -> Callable[[], Exception]:
        return lambda: DirectoryError(f"request body larger than {limit} bytes")

    def post(fn: Callable[[dict[str, Any]], dict[str, Any]], limit: int, status: int = 200) -> Any:
        async def handler(request: Request) -> JSONResponse:
            body = await read_object(request, limit, too_large(limit))
            return JSONResponse(await threaded(fn, body), status_code=status)

        return handler

    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "did": service.did}

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> dict[str, Any]:
        from agent.directory.openapi import OPENAPI

        return OPENAPI

    async def info(request: Request) -> dict[str, Any]:
        head = await threaded(service.tree_head)
        return {
            "did": service.did,
            "namespace": service.namespace,
            "enrolment": service.rules.mode,
            "tree_head": head.to_dict(),
        }

    async def claim(request: Request) -> JSONResponse:
        body = await read_object(request, SMALL_BODY, too_large(SMALL_BODY))
        result = await threaded(service.claim, body)
        metrics.claims.labels("last_resort" if result["last_resort"] else "one_time").inc()
        return JSONResponse(result)

    async def attest(request: Request) -> dict[str, Any]:
        result: dict[str, Any] = await threaded(service.attest, request.path_params["name"])
        return result

    async def tree_head(request: Request) -> dict[str, Any]:
        head: TreeHead = await threaded(service.tree_head)
        return head.to_dict()

    async def consistency(request: Request) -> dict[str, Any]:
        first, second = _int_param(request, "first"), _int_param(request, "second")
        result: dict[str, Any] = await threaded(service.consistency, first, second)
        return result

    async def inclusion(request: Request) -> dict[str, Any]:
        index, size = _int_param(request, "index"), _int_param(request, "size")
        result: dict[str, Any] = await threaded(service.inclusion, index, size)
        return result

    async def entries(request: Request) -> dict[str, Any]:
        start = _int_param(request, "start", 0)
        end = _int_param(request, "end", start + 100)
        result: dict[str, Any] = await threaded(service.entries, start, end)
        return result

    routes = [
        Route("/healthz", endpoint("healthz", healthz), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics_endpoint), methods=["GET"]),
        Route("/openapi.json", endpoint("openapi", openapi), methods=["GET"]),
        Route("/v1/dir", endpoint("info", info), methods=["GET"]),
        Route(
            "/v1/dir/publish",
            endpoint("publish", post(service.publish, PUBLISH_BODY, 201)),
            methods=["POST"],
        ),
        Route(
            "/v1/dir/withdraw",
            endpoint("withdraw", post(service.withdraw, SMALL_BODY)),
            methods=["POST"],
        ),
        Route(
            "/v1/dir/status",
            endpoint("status", post(service.status, SMALL_BODY)),
            methods=["POST"],
        ),
        Route("/v1/dir/claim", endpoint("claim", claim), methods=["POST"]),
        Route("/v1/dir/attest/{name}", endpoint("attest", attest), methods=["GET"]),
        Route("/v1/dir/tree-head", endpoint("tree_head", tree_head), methods=["GET"]),
        Route("/v1/dir/log/consistency", endpoint("consistency", consistency), methods=["GET"]),
        Route("/v1/dir/log/inclusion", endpoint("inclusion", inclusion), methods=["GET"]),
        Route("/v1/dir/log/entries", endpoint("log", entries), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.body_timeout = body_timeout
    return app
