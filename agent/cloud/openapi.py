"""OpenAPI 3.1 description of the cloud agent's HTTP API (served at /openapi.json).

Written out by hand because the service uses plain Starlette routes; the test suite
checks that every route in the app is described here and vice versa.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "link": {"type": "integer"},
                        },
                    }
                },
            }
        }
    },
}
_SIGNED = {
    "type": "object",
    "required": ["request"],
    "properties": {
        "request": {
            "type": "string",
            "description": "signed request (JWS): the owner's, or the address's holder key's",
        }
    },
}
_OBJECT = {"content": {"application/json": {"schema": {"type": "object"}}}}


def _op(
    summary: str,
    *,
    body: dict[str, Any] | None = None,
    ok: str = "200",
    params: list[str] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {ok: {"description": "success", **_OBJECT}, "4XX": _ERROR, "5XX": _ERROR},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in params
        ]
    return op


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Janus cloud agent", "version": "1"},
    "paths": {
        "/healthz": {
            "get": _op(
                "liveness, and the agent's DID; on an event bus also 'bus': {url, consumer, "
                "caught_up, staleness, catch_up_seconds}"
            )
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/openapi.json": {"get": _op("this description")},
        "/v1/did": {
            "get": _op(
                "the agent's did:key, its configured owner, its routing key and the "
                "agent's signed statement naming that key (routing_proof, a JWS)"
            )
        },
        "/v1/grants": {
            "post": _op(
                "create a fresh key for one grant; returns its did:key",
                body={
                    "type": "object",
                    "properties": {
                        "request": {
                            "type": "string",
                            "description": "owner-signed key request (JWS)",
                        }
                    },
                },
                ok="201",
            )
        },
        "/v1/grants/{grant_id}": {"get": _op("a grant's status", params=["grant_id"])},
        "/v1/grants/{grant_id}/bundle": {
            "put": _op(
                "install the capability bundle granted to the grant's key",
                body={"type": "object", "description": "a janus-bundle/1 document"},
                params=["grant_id"],
            )
        },
        "/v1/grants/{grant_id}/actions/{action}": {
            "post": _op(
                "perform an action under the grant (sign/<purpose>, msg/send, cap/delegate)",
                body={
                    "type": "object",
                    "required": ["resource"],
                    "properties": {"resource": {"type": "string"}, "request": {"type": "object"}},
                },
                params=["grant_id", "action"],
            )
        },
        "/v1/invoke": {
            "post": _op(
                "a holder of a delegated capability invokes it",
                body={
                    "type": "object",
                    "required": ["bundle", "invocation"],
                    "properties": {
                        "bundle": {"type": "object"},
                        "invocation": {"type": "string"},
                        "request": {"type": "object"},
                    },
                },
            )
        },
        "/v1/didcomm": {
            "post": _op(
                "receive a DIDComm forward message for an owner (held until picked up)",
                body={"type": "object"},
                ok="202",
            )
        },
        "/v1/pickup": {
            "post": _op(
                "the owner collects held messages and acknowledges earlier ones",
                body={
                    "type": "object",
                    "required": ["request"],
                    "properties": {"request": {"type": "string"}, "limit": {"type": "integer"}},
                },
            )
        },
        # Routes of the receiving service (``--receiving``); docs/services.md.
        "/v1/receiving/key": {
            "get": _op("the receiving service's HPKE keys, signed by the agent (JWS)")
        },
        "/v1/receiving/addresses": {
            "post": _op(
                "create an address for the owner (owner-signed request, op 'create'; registers "
                "the address's holder key, claim 'holder')",
                body=_SIGNED,
                ok="201",
            )
        },
        "/v1/receiving/retire": {
            "post": _op(
                "retire an address: later deliveries are 410 (op 'retire'; signed by its "
                "holder key or the owner)",
                body=_SIGNED,
            )
        },
        "/v1/receiving/pickup": {
            "post": _op(
                "collect an address's held messages (op 'pickup'; signed by its holder key "
                "or the owner)",
                body=_SIGNED,
            )
        },
        "/v1/receiving/ack": {
            "post": _op(
                "acknowledge (delete) picked-up messages (op 'ack'; signed by the address's "
                "holder key or the owner)",
                body=_SIGNED,
            )
        },
        "/v1/receiving/deliveries": {
            "post": _op(
                "deliver a ciphertext to the address sealed (HPKE) to this service",
                body={
                    "type": "object",
                    "required": ["sealed", "ciphertext"],
                    "properties": {
                        "sealed": {"type": "string", "description": "base64url, 105 bytes"},
                        "ciphertext": {"type": "string", "description": "base64url"},
                    },
                },
                ok="202",
            )
        },
        # Routes of the sending service (``--sending``).
        "/v1/sending": {"get": _op("the sending service's limits and the grant it needs")},
        "/v1/sending/submissions": {
            "post": _op(
                "submit a sealed message for store-and-forward under a msg/submit grant",
                body={
                    "type": "object",
                    "required": ["grant_id", "request"],
                    "properties": {
                        "grant_id": {"type": "string"},
                        "request": {
                            "type": "object",
                            "required": ["receiving", "sealed", "ciphertext"],
                            "properties": {
                                "receiving": {"type": "string", "description": "service URL"},
                                "sealed": {"type": "string"},
                                "ciphertext": {"type": "string"},
                                "delay": {"type": "integer", "minimum": 0},
                            },
                        },
                    },
                },
                ok="202",
            )
        },
        "/v1/sending/submissions/{submission_id}": {
            "get": _op(
                "a submission's state: queued, delivered or failed", params=["submission_id"]
            )
        },
        "/v1/revocations": {
            "post": _op(
                "store a signed revocation; keys it disables are destroyed at once; on an "
                "event bus it is also published to every instance ('published': true once "
                "the bus holds it)",
                body={
                    "type": "object",
                    "required": ["record"],
                    "properties": {"record": {"type": "string"}},
                },
            )
        },
    },
}
