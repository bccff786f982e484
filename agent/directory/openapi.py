"""The directory's OpenAPI document (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "refused: {'error': {'code', 'message'}}",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_OK = {"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}}
_SIGNED = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["request"],
                "properties": {"request": {"type": "string", "description": "compact JWS"}},
            }
        }
    },
}


def _query(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": n, "in": "query", "required": True, "schema": {"type": "integer", "minimum": 0}}
        for n in names
    ]


def _get(summary: str, parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": _OK, "400": _ERROR}}
    if parameters:
        op["parameters"] = parameters
    return {"get": op}


def _post(summary: str, body: dict[str, Any], ok: str = "200") -> dict[str, Any]:
    responses = {ok: _OK, "400": _ERROR, "403": _ERROR, "404": _ERROR, "409": _ERROR, "429": _ERROR}
    return {"post": {"summary": summary, "requestBody": body, "responses": responses}}


_PUBLISH = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["request", "package", "prekeys"],
                "properties": {
                    "request": {"type": "string"},
                    "package": {"type": "string"},
                    "prekeys": {"type": "array", "items": {"type": "object"}, "maxItems": 200},
                    "grant": {"type": "object"},
                },
            }
        }
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Janus directory", "version": "1"},
    "paths": {
        "/healthz": _get("liveness"),
        "/metrics": _get("Prometheus metrics"),
        "/v1/dir": _get("the directory's did, namespace, enrolment mode and tree head"),
        "/v1/dir/publish": _post("publish or refill a KeyPackage", _PUBLISH, "201"),
        "/v1/dir/withdraw": _post("withdraw a name (owner-signed)", _SIGNED),
        "/v1/dir/status": _post("one-time prekeys left (owner-signed)", _SIGNED),
        "/v1/dir/claim": _post("claim a package and a contact capability", _SIGNED),
        "/v1/dir/attest/{name}": {
            "get": {
                "summary": "a signed attestation of a name's binding",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _OK, "400": _ERROR, "404": _ERROR},
            }
        },
        "/v1/dir/tree-head": _get("the signed tree head"),
        "/v1/dir/log/consistency": _get("RFC 9162 consistency proof", _query("first", "second")),
        "/v1/dir/log/inclusion": _get("RFC 9162 audit path", _query("index", "size")),
        "/v1/dir/log/entries": _get("log entries", _query("start", "end")),
    },
    "components": {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    }
                },
            }
        }
    },
}
