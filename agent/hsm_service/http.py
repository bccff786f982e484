"""The HSM service's HTTP API (Starlette on uvicorn), in the directory's manner.

Every route but ``/healthz``, ``/metrics``, ``/openapi.json`` and the revocation drop
is authenticated by :mod:`agent.hsm_service.auth` (a signed invocation of an
administrator-granted capability, one use counted per request) before the engine sees
it.  Bodies are size-limited before parsing and must arrive within a time limit; every
refusal is ``{"error": {"code", "message"}}`` (plus ``reason`` for a policy refusal)
with a 4xx status; a 5xx means the service cannot do its job (token or audit log
unavailable), never a fault of the input.  Engine and ledger work runs in threads.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.errors import AgentError, BadRequestError
from agent.hsm_service import auth
from agent.hsm_service.config import Quorum, ServiceConfig
from agent.hsm_service.engine import HsmEngine, KeyView, OperationRequest, policy_change_request
from agent.hsm_service.errors import HsmServiceError
from agent.http_service import (
    BODY_TIMEOUT,
    ServiceMetrics,
    endpoint_factory,
    http_error,
    read_limited,
    threaded,
)
from janus_hsm import b64url
from janus_hsm.public_keys import to_did_key
from policies.approvals import Approval
from policies.authorize import authorize
from policies.errors import FormatError
from policies.invocation import Invocation
from policies.jws import strict_json
from policies.ledger.sqlite import SqliteLedger
from policies.revocation import Revocation
from policies.verify import Verifier

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Data to sign is a JWS signing input or a small document (base64url in JSON); the
#: bound keeps what one request can make the service hold and hash small.
OPERATION_BODY = 256 * 1024
SMALL_BODY = 64 * 1024
MAX_APPROVALS = 32
OPERATIONS = ("sign", "ecdh", "generate", "destroy")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")
#: How long the claims handed to approvers stay good, when the client does not say.
DEFAULT_APPROVAL_LIFETIME = 600
MAX_APPROVAL_LIFETIME = 24 * 3600


class BodyTooLargeError(AgentError):
    code = "body_too_large"
    status = 413


class Metrics(ServiceMetrics):
    def __init__(self) -> None:
        super().__init__("hsm")
        self.operations = Counter(
            "janus_hsm_operations",
            "operations performed, by operation",
            ["operation"],
            registry=self.registry,
        )


class ClientGate:
    """Admits a request when it carries a valid invocation of an administrator's grant.

    The ledger (SQLite, in the service's state directory) counts every use of every
    link, remembers nonces (replay) and holds revocations; the verifier caches chains.
    """

    def __init__(self, administrators: Collection[str], audience: str, ledger_path: Path) -> None:
        self.administrators = frozenset(administrators)
        self.audience = audience
        self.ledger = SqliteLedger(ledger_path)
        self.verifier = Verifier(revocations=self.ledger)

    def admit(
        self,
        headers: Mapping[str, str],
        *,
        method: str,
        target: str,
        body: bytes,
        resource: str,
        action: str,
    ) -> str:
        """The did:key of the client, once its invocation verified and was counted."""
        shown = auth.presented(headers)
        auth.check_root(shown.bundle, self.administrators)
        invocation = Invocation.parse(shown.invocation)
        if invocation.resource != resource or invocation.action != action:
            # Checked before anything is counted: the chain may allow what the
            # invocation names, but this route is something else.
            raise auth.AuthError(
                f"the invocation is for {invocation.action:.64} on {invocation.resource:.128}, "
                f"this route is {action} on {resource}"
            )
        grant = authorize(
            self.verifier,
            self.ledger,
            shown.bundle,
            invocation,
            auth.bound_request(method, target, body, self.audience),
            now=time.time(),
            audience=self.audience,
        )
        return grant.authorization.invocation.holder

    def revoke(self, compact: str, bundle_obj: Any) -> dict[str, Any]:
        """Record a signed revocation of a link of an administrator-rooted chain."""
        from policies.capability import Bundle

        revocation = Revocation.parse(compact)
        bundle = Bundle.from_dict(bundle_obj)
        auth.check_root(bundle, self.administrators)
        index = revocation.verify(bundle)
        fresh = self.ledger.revoke(
            revocation.revoked_id,
            record=revocation.compact,
            data={"issuer": revocation.issuer, "reason": revocation.reason, "link": index},
        )
        return {"revoked": revocation.revoked_id, "new": fresh}

    def close(self) -> None:
        self.ledger.close()


def key_view_json(view: KeyView) -> dict[str, Any]:
    """What a client sees of a key: its public half, state and policy, never a secret.

    A key still to be generated has no public key yet: ``alg``, ``public_key``, ``jwk``
    and ``did`` are then null.
    """
    did = None
    if view.public_key_der:
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        did = to_did_key(load_der_public_key(view.public_key_der))  # type: ignore[arg-type]
    return {
        "label": view.label,
        "alg": view.algorithm.value if view.algorithm is not None else None,
        "public_key": b64url.encode(view.public_key_der) if view.public_key_der else None,
        "jwk": view.jwk or None,
        "did": did,
        "state": view.state,
        "operations": sorted(view.operations),
        "quorum": view.quorum,
        "activation_date": view.activation_date,
        "deactivation_date": view.deactivation_date,
        "uri": view.uri,
    }


def _fields(body: dict[str, Any], allowed: Collection[str], required: Collection[str]) -> None:
    unknown = set(body) - set(allowed)
    if unknown:
        raise BadRequestError(f"unknown member(s): {', '.join(sorted(unknown))[:200]}")
    missing = set(required) - set(body)
    if missing:
        raise BadRequestError(f"the body needs {', '.join(sorted(missing))}")


def _bytes(body: dict[str, Any], name: str) -> bytes:
    return b64url.decode(body.get(name), f"'{name}'", error=BadRequestError)


def _expires(body: dict[str, Any]) -> int:
    value = body.get("expires", 0)
    if type(value) is not int or not 0 <= value < 2**53:
        raise BadRequestError("'expires' must be the approvals' expiry in unix seconds")
    return value


def _nonce(body: dict[str, Any]) -> str:
    value = body.get("nonce", "")
    if value == "":
        return ""
    if not isinstance(value, str) or not _NONCE.fullmatch(value):
        raise BadRequestError("'nonce' must be 16 to 128 base64url characters")
    return value


def _approvals(body: dict[str, Any]) -> list[Approval]:
    items = body.get("approvals", [])
    if not isinstance(items, list) or len(items) > MAX_APPROVALS:
        raise BadRequestError(f"'approvals' must be an array of at most {MAX_APPROVALS}")
    try:
        return [Approval.from_json(item, what=f"approvals[{n}]") for n, item in enumerate(items)]
    except FormatError as exc:
        raise BadRequestError(str(exc)) from None


def _label(request: Request) -> str:
    label = str(request.path_params["label"])
    if not _LABEL.fullmatch(label):
        raise BadRequestError("a key label is 1 to 128 of A-Z a-z 0-9 . _ - (no leading . _ -)")
    return label


@dataclass(frozen=True)
class _Call:
    """One authenticated request: who made it, and its parsed JSON body."""

    client: str
    body: dict[str, Any]


def _approvers_for(config: ServiceConfig, view: KeyView, operation: str) -> dict[str, Any]:
    """Who may approve ``operation`` on a key, and where (RP ID, origin): what an
    approver's client needs besides the claims (public values only).

    M is the key's policy now (``view``: policy changes included); the approvers are
    its quorum's in the configuration, or every registered approver for a quorum added
    by a policy change since (the engine checks the exact set either way).
    """
    configured = config.keys.get(view.label)
    quorum = configured.quorum if configured is not None else None
    if view.quorum < 1 or (quorum is not None and not quorum.applies_to(operation)):
        raise BadRequestError(f"{operation} with key {view.label!r} needs no approvals")
    if quorum is None or quorum.m != view.quorum:
        quorum = Quorum(m=view.quorum, approvers=tuple(a.id for a in config.approvers))
    return _approvers_of(config, quorum)


def _approvers_of(config: ServiceConfig, quorum: Quorum) -> dict[str, Any]:
    return {
        "rp_id": config.service.approval_rp_id,
        "origin": config.service.approval_origin,
        "required": quorum.m,
        "approvers": [
            {"id": a.id, "credential_id": b64url.encode(a.credential_id)}
            for a in config.approvers
            if a.id in quorum.approvers
        ],
    }


def build_app(
    engine: HsmEngine,
    gate: ClientGate,
    config: ServiceConfig,
    *,
    body_timeout: float = BODY_TIMEOUT,
) -> Starlette:
    metrics = Metrics()
    endpoint = endpoint_factory(metrics, log)

    def current_config() -> ServiceConfig:
        # Policy changes replace the engine's configuration; the start-up one otherwise.
        live = getattr(engine, "config", None)
        return live if isinstance(live, ServiceConfig) else config

    def refusals(handler: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Any]:
        """The engine's policy refusals with their reason, at the status it calls for."""

        async def run(request: Request) -> Any:
            try:
                return await handler(request)
            except HsmServiceError as exc:
                reason = getattr(exc, "reason", None)
                if reason is None:
                    raise
                metrics.refusals.labels(f"{exc.code}:{reason}").inc()
                status = exc.status  # errors.Refused: per reason
                error = {"code": exc.code, "reason": reason, "message": str(exc)}
                return JSONResponse({"error": error}, status_code=status)

        return run

    async def admitted(
        request: Request,
        resource: str,
        action: str,
        then: Callable[[_Call], T],
        *,
        limit: int,
        body_required: bool,
    ) -> T:
        """Read the body (bounded), then in one worker thread authenticate the request
        over it, parse the JSON and run ``then`` (the engine's part).

        Authentication comes before parsing: a stranger's malformed body costs no more
        than a signature check, and a refusal of the body still counts a use.  One hop
        to a thread, not one per blocking step: each costs a wake-up on a busy machine.
        """

        def too_large() -> Exception:
            return BodyTooLargeError(f"request body larger than {limit} bytes")

        raw = await read_limited(request, limit, too_large)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers, method = request.headers, request.method

        def work() -> T:
            # Verification failures keep their own codes (expired, revoked, wrong_root…).
            client = gate.admit(
                headers, method=method, target=target, body=raw, resource=resource, action=action
            )
            body: dict[str, Any] = {}
            if raw or body_required:
                if not raw:
                    raise BadRequestError("the request needs a JSON object body")
                try:
                    body = strict_json(raw, "request body")
                except FormatError as exc:
                    raise BadRequestError(str(exc)) from None
            return then(_Call(client, body))

        result: T = await threaded(work)
        return result

    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "service": gate.audience}

    async def service_info(request: Request) -> dict[str, Any]:
        return {
            "service": gate.audience,
            "administrators": sorted(gate.administrators),
            "operations": list(OPERATIONS),
        }

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> dict[str, Any]:
        from agent.hsm_service.openapi import OPENAPI

        return OPENAPI

    async def list_keys(request: Request) -> dict[str, Any]:
        def run(call: _Call) -> dict[str, Any]:
            _fields(call.body, (), ())
            return {"keys": [key_view_json(v) for v in engine.keys(call.client)]}

        return await admitted(
            request, auth.SERVICE_RESOURCE, "hsm/list", run, limit=SMALL_BODY, body_required=False
        )

    async def show_key(request: Request) -> dict[str, Any]:
        label = _label(request)

        def run(call: _Call) -> dict[str, Any]:
            _fields(call.body, (), ())
            return key_view_json(engine.key(call.client, label))

        return await admitted(
            request,
            auth.key_resource(label),
            "hsm/read",
            run,
            limit=SMALL_BODY,
            body_required=False,
        )

    def operation_request(
        client: str, operation: str, label: str, body: dict[str, Any]
    ) -> OperationRequest:
        quorum = ("approvals", "nonce", "expires")
        if operation == "sign":
            _fields(body, ("payload", *quorum), ("payload",))
            payload = _bytes(body, "payload")
        elif operation == "ecdh":
            _fields(body, ("peer", *quorum), ("peer",))
            payload = _bytes(body, "peer")
        else:
            _fields(body, (*quorum, "algorithm"), ())
            payload = b""
            algorithm = body.get("algorithm")
            if algorithm is not None and (
                operation != "generate" or not isinstance(algorithm, str)
            ):
                raise BadRequestError("'algorithm' is a string, and only generate takes it")
        return OperationRequest(
            client=client,
            operation=operation,
            key=label,
            payload=payload,
            approvals=tuple(_approvals(body)),
            nonce=_nonce(body),
            expires=_expires(body),
        )

    def operate(operation: str) -> Callable[[Request], Awaitable[dict[str, Any]]]:
        async def handler(request: Request) -> dict[str, Any]:
            label = _label(request)

            def run(call: _Call) -> dict[str, Any]:
                op = operation_request(call.client, operation, label, call.body)
                wanted = call.body.get("algorithm")
                if wanted is not None:
                    # The config names what the key is; a client expecting another gets
                    # a clear refusal instead of a key of the wrong kind.
                    before = engine.key(call.client, label).algorithm
                    configured = before.value if before is not None else None
                    if configured != wanted:
                        raise BadRequestError(f"key {label!r} is configured as {configured}")
                result = engine.perform(op)
                metrics.operations.labels(operation).inc()
                if operation == "sign":
                    return {"label": label, "signature": b64url.encode(result)}
                if operation == "ecdh":
                    return {"label": label, "shared_secret": b64url.encode(result)}
                if operation == "generate":  # the new public key (result) is in the view
                    return key_view_json(engine.key(call.client, label))
                return {"label": label, "destroyed": True}

            return await admitted(
                request,
                auth.key_resource(label),
                auth.action_for(operation),
                run,
                limit=OPERATION_BODY if operation in ("sign", "ecdh") else SMALL_BODY,
                body_required=operation in ("sign", "ecdh"),
            )

        return handler

    def lifetime_of(body: dict[str, Any]) -> int:
        lifetime = body.pop("lifetime", DEFAULT_APPROVAL_LIFETIME)
        if type(lifetime) is not int or not 0 < lifetime <= MAX_APPROVAL_LIFETIME:
            raise BadRequestError(f"'lifetime' must be 1 to {MAX_APPROVAL_LIFETIME} seconds")
        return lifetime

    async def approval_claims(request: Request) -> dict[str, Any]:
        label = _label(request)

        def run(call: _Call) -> dict[str, Any]:
            body = dict(call.body)
            operation = body.pop("operation", None)
            if operation not in OPERATIONS:
                raise BadRequestError(f"'operation' must be one of {', '.join(OPERATIONS)}")
            lifetime = lifetime_of(body)
            if "approvals" in body or "expires" in body:
                raise BadRequestError("approval claims are asked for without approvals or expiry")
            op = operation_request(call.client, str(operation), label, body)
            if not op.nonce:
                raise BadRequestError("approval claims need the 'nonce' the operation will carry")
            claims = engine.approval_claims(op, expires=int(time.time()) + lifetime)
            view = engine.key(call.client, label)
            return {"claims": claims, **_approvers_for(current_config(), view, op.operation)}

        return await admitted(
            request,
            auth.key_resource(label),
            "hsm/approve",
            run,
            limit=OPERATION_BODY,
            body_required=True,
        )

    def policy_change(body: dict[str, Any]) -> Mapping[str, Any]:
        change = body["change"]
        if not isinstance(change, dict):
            raise BadRequestError("'change' must be a JSON object")
        return change

    async def policy_claims(request: Request) -> dict[str, Any]:
        def run(call: _Call) -> dict[str, Any]:
            body = dict(call.body)
            _fields(body, ("change", "nonce", "lifetime"), ("change", "nonce"))
            expires = int(time.time()) + lifetime_of(body)
            quorum = current_config().policy_quorum
            if quorum is None:
                raise BadRequestError("no [policy-changes] quorum is configured on this service")
            op = policy_change_request(
                policy_change(body), requester=call.client, nonce=_nonce(body), expires=expires
            )
            claims = engine.approval_claims(op, expires=expires)
            return {"claims": claims, **_approvers_of(current_config(), quorum)}

        return await admitted(
            request,
            auth.SERVICE_RESOURCE,
            "hsm/policy",
            run,
            limit=SMALL_BODY,
            body_required=True,
        )

    async def change_policy(request: Request) -> dict[str, Any]:
        def run(call: _Call) -> dict[str, Any]:
            body = call.body
            _fields(body, ("change", "approvals", "nonce", "expires"), ("change", "nonce"))
            nonce = _nonce(body)
            if not nonce:
                raise BadRequestError("a policy change needs a 'nonce'")
            engine.change_policy(
                policy_change(body),
                _approvals(body),
                requester=call.client,
                nonce=nonce,
                expires=_expires(body),
            )
            return {"changed": True}

        return await admitted(
            request,
            auth.SERVICE_RESOURCE,
            "hsm/policy",
            run,
            limit=SMALL_BODY,
            body_required=True,
        )

    async def audit_head(request: Request) -> dict[str, Any]:
        def run(call: _Call) -> dict[str, Any]:
            _fields(call.body, (), ())
            head: dict[str, Any] = engine.sign_audit_head()
            return head

        return await admitted(
            request,
            auth.SERVICE_RESOURCE,
            "hsm/audit",
            run,
            limit=SMALL_BODY,
            body_required=False,
        )

    async def revoke(request: Request) -> JSONResponse:
        raw = await read_limited(
            request, SMALL_BODY, lambda: BodyTooLargeError("request body too large")
        )
        if not raw:
            raise BadRequestError("the request needs a JSON object body")
        try:
            body = strict_json(raw, "request body")
        except FormatError as exc:
            raise BadRequestError(str(exc)) from None
        _fields(body, ("revocation", "bundle"), ("revocation", "bundle"))
        if not isinstance(body["revocation"], str):
            raise BadRequestError("'revocation' must be a compact JWS string")
        result = await threaded(gate.revoke, body["revocation"], body["bundle"])
        return JSONResponse(result, status_code=201 if result["new"] else 200)

    def route(path: str, name: str, handler: Any, method: str) -> Route:
        return Route(path, endpoint(name, refusals(handler)), methods=[method])

    routes = [
        route("/healthz", "healthz", healthz, "GET"),
        route("/metrics", "metrics", metrics_endpoint, "GET"),
        route("/openapi.json", "openapi", openapi, "GET"),
        route("/v1/service", "service", service_info, "GET"),
        route("/v1/keys", "keys", list_keys, "GET"),
        route("/v1/keys/{label}", "key", show_key, "GET"),
        *(route(f"/v1/keys/{{label}}/{op}", op, operate(op), "POST") for op in OPERATIONS),
        route("/v1/keys/{label}/approval-claims", "approval_claims", approval_claims, "POST"),
        route("/v1/policy", "policy", change_policy, "POST"),
        route("/v1/policy/approval-claims", "policy_claims", policy_claims, "POST"),
        route("/v1/audit/head", "audit_head", audit_head, "GET"),
        route("/v1/revocations", "revoke", revoke, "POST"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.body_timeout = body_timeout
    return app
