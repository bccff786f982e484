"""The HSM service's OpenAPI document (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "refused: {'error': {'code', 'message'}} (policy refusals add 'reason')",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_OK = {"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}}
_AUTH: list[dict[str, list[str]]] = [{"invocation": []}]
_REFUSALS = {
    "400": _ERROR,
    "401": _ERROR,
    "403": _ERROR,
    "404": _ERROR,
    "409": _ERROR,
    "413": _ERROR,
    "429": _ERROR,
    "503": _ERROR,
}
_LABEL = {"name": "label", "in": "path", "required": True, "schema": {"type": "string"}}
_APPROVALS = {
    "type": "array",
    "maxItems": 32,
    "items": {"$ref": "#/components/schemas/Approval"},
    "description": "FIDO2 approvals of the claims from approval-claims (quorum keys)",
}
_NONCE = {
    "type": "string",
    "pattern": "^[A-Za-z0-9_-]{16,128}$",
    "description": "the nonce the approval claims were asked for (quorum keys)",
}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }
    return {"required": bool(required), "content": {"application/json": {"schema": schema}}}


def _op(
    method: str,
    summary: str,
    *,
    body: dict[str, Any] | None = None,
    label: bool = False,
    authenticated: bool = True,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": _OK, **_REFUSALS}}
    if authenticated:
        op["security"] = _AUTH
    if body is not None:
        op["requestBody"] = body
    if label:
        op["parameters"] = [_LABEL]
    return {method: op}


_B64 = {"type": "string", "description": "base64url"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Janus HSM service", "version": "1"},
    "paths": {
        "/healthz": _op("get", "liveness and the service's audience", authenticated=False),
        "/metrics": _op("get", "Prometheus metrics", authenticated=False),
        "/v1/service": _op("get", "audience, administrators", authenticated=False),
        "/v1/keys": _op("get", "the keys this client may use (hsm:service, hsm/list)"),
        "/v1/keys/{label}": _op("get", "one key: public key, state, policy", label=True),
        "/v1/keys/{label}/sign": _op(
            "post",
            "sign data (JOSE form: ES256 raw r||s, EdDSA)",
            body=_body({"payload": _B64, "approvals": _APPROVALS, "nonce": _NONCE}, ["payload"]),
            label=True,
        ),
        "/v1/keys/{label}/ecdh": _op(
            "post",
            "raw ECDH shared secret with a peer public key (SubjectPublicKeyInfo DER)",
            body=_body({"peer": _B64, "approvals": _APPROVALS, "nonce": _NONCE}, ["peer"]),
            label=True,
        ),
        "/v1/keys/{label}/generate": _op(
            "post",
            "generate the key the config names under this label",
            body=_body(
                {"algorithm": {"type": "string"}, "approvals": _APPROVALS, "nonce": _NONCE}, []
            ),
            label=True,
        ),
        "/v1/keys/{label}/destroy": _op(
            "post",
            "destroy the key",
            body=_body({"approvals": _APPROVALS, "nonce": _NONCE}, []),
            label=True,
        ),
        "/v1/keys/{label}/approval-claims": _op(
            "post",
            "the claims approvers see and sign for an operation (hsm/approve)",
            body=_body(
                {
                    "operation": {"enum": ["sign", "ecdh", "generate", "destroy"]},
                    "payload": _B64,
                    "peer": _B64,
                    "algorithm": {"type": "string"},
                    "nonce": _NONCE,
                    "lifetime": {"type": "integer", "minimum": 1, "maximum": 86400},
                },
                ["operation", "nonce"],
            ),
            label=True,
        ),
        "/v1/policy": _op(
            "post",
            "change a key's policy or the clients (needs the policy-change quorum)",
            body=_body(
                {"change": {"type": "object"}, "approvals": _APPROVALS, "nonce": _NONCE},
                ["change", "nonce"],
            ),
        ),
        "/v1/audit/head": _op("get", "a freshly signed head of the audit log (hsm/audit)"),
        "/v1/revocations": _op(
            "post",
            "record a signed revocation (janus-rev+jws) of a link of a client's chain",
            body=_body({"revocation": {"type": "string"}, "bundle": {"type": "object"}}, []),
            authenticated=False,
        ),
    },
    "components": {
        "securitySchemes": {
            "invocation": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": (
                    "'Janus-Invocation <compact JWS>' with the capability bundle in the "
                    "Janus-Capability header (base64url JSON); the invocation's digest "
                    "covers {method, target, body: sha256, service}"
                ),
            }
        },
        "schemas": {
            "Approval": {
                "type": "object",
                "required": [
                    "approver_id",
                    "credential_id",
                    "authenticator_data",
                    "client_data_json",
                    "signature",
                ],
                "properties": {
                    "approver_id": {"type": "string"},
                    "credential_id": _B64,
                    "authenticator_data": _B64,
                    "client_data_json": _B64,
                    "signature": _B64,
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "reason": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    }
                },
            },
        },
    },
}
