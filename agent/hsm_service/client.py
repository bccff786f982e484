"""A client of the HSM service's HTTP API: every request signed by the client's own key.

The client holds its key (any Janus key: a soft: keystore, a token, a YubiKey) and the
capability an administrator granted it; each call makes a fresh invocation bound to
that exact request (:mod:`agent.hsm_service.auth`).  Failures are typed: the service's
refusals keep their ``code`` (and ``reason``); a service that cannot be reached is
:class:`HsmUnreachableError`.  A request that never reached the service (connection
refused while it restarts) is tried again for a few seconds; one that may have reached
it is never repeated behind the caller's back, so an operation runs at most once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import httpx

from agent.errors import AgentError
from agent.hsm_service import auth
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from policies.approvals import Approval
from policies.capability import Bundle

DEFAULT_TIMEOUT: Final = 30.0
#: How long a refused connection is retried (a service restarting is back within it).
CONNECT_RETRY: Final = 5.0


class HsmClientError(AgentError):
    """The service refused a request; ``code`` (and ``reason``) are the service's own."""

    code = "hsm_error"

    def __init__(self, message: str, *, code: str, status: int, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.reason = reason


class HsmUnreachableError(AgentError):
    """The service did not answer (down, restarting, wrong address) or answered garbage."""

    code = "hsm_unreachable"
    status = 502


def new_nonce() -> str:
    """A quorum nonce: binds approvals to one operation (24 random bytes)."""
    return b64url.encode(os.urandom(24))


class HsmClient:
    """One client identity talking to one service.  Thread-safe (httpx.Client is)."""

    def __init__(
        self,
        url: str,
        key: KeyHandle,
        bundle: Bundle,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_retry: float = CONNECT_RETRY,
    ) -> None:
        self.url = url.rstrip("/")
        self.identity = key
        self.bundle = bundle
        self._encoded = auth.encode_bundle(bundle)
        self._http = httpx.Client(timeout=timeout)
        self._connect_retry = connect_retry
        self._audience: str | None = None

    @property
    def audience(self) -> str:
        """The service's name, which every invocation must carry (asked once)."""
        if self._audience is None:
            info = self._send("GET", "/v1/service", None, None)
            service = info.get("service")
            if not isinstance(service, str) or not service:
                raise HsmUnreachableError(f"{self.url} did not name itself in /v1/service")
            self._audience = service
        return self._audience

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HsmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the API ----------------------------------------------------------------

    def list_keys(self) -> list[dict[str, Any]]:
        answer = self.call("GET", "/v1/keys", None, auth.SERVICE_RESOURCE, "hsm/list")
        keys = answer.get("keys")
        if not isinstance(keys, list):
            raise HsmUnreachableError("the service's key list is not a list")
        return keys

    def key(self, label: str) -> dict[str, Any]:
        return self.call("GET", _key_path(label), None, auth.key_resource(label), "hsm/read")

    def perform(
        self,
        label: str,
        operation: str,
        body: Mapping[str, Any],
        *,
        approvals: Sequence[Approval] = (),
        nonce: str = "",
        expires: int = 0,
    ) -> dict[str, Any]:
        full = dict(body)
        if approvals:
            full["approvals"] = [a.to_json() for a in approvals]
            full["expires"] = expires
        if nonce:
            full["nonce"] = nonce
        return self.call(
            "POST",
            f"{_key_path(label)}/{operation}",
            full,
            auth.key_resource(label),
            auth.action_for(operation),
        )

    def sign(self, label: str, data: bytes, **quorum: Any) -> bytes:
        """``quorum``: approvals, nonce and expires, for a key whose policy needs them."""
        answer = self.perform(label, "sign", {"payload": b64url.encode(data)}, **quorum)
        return _b64(answer, "signature")

    def ecdh(self, label: str, peer_der: bytes, **quorum: Any) -> bytes:
        answer = self.perform(label, "ecdh", {"peer": b64url.encode(peer_der)}, **quorum)
        return _b64(answer, "shared_secret")

    def approval_request(
        self,
        label: str,
        operation: str,
        body: Mapping[str, Any],
        *,
        nonce: str,
        lifetime: int,
    ) -> HsmApprovalRequest:
        """The claims approvers must sign for this operation, and who may sign them."""
        answer = self.call(
            "POST",
            f"{_key_path(label)}/approval-claims",
            {"operation": operation, **body, "nonce": nonce, "lifetime": lifetime},
            auth.key_resource(label),
            "hsm/approve",
        )
        return HsmApprovalRequest.from_json({"typ": REQUEST_TYP, **answer}, "the service")

    def policy_approval_request(
        self, change: Mapping[str, Any], *, nonce: str, lifetime: int
    ) -> HsmApprovalRequest:
        answer = self.call(
            "POST",
            "/v1/policy/approval-claims",
            {"change": dict(change), "nonce": nonce, "lifetime": lifetime},
            auth.SERVICE_RESOURCE,
            "hsm/policy",
        )
        return HsmApprovalRequest.from_json({"typ": REQUEST_TYP, **answer}, "the service")

    def change_policy(
        self,
        change: Mapping[str, Any],
        *,
        approvals: Sequence[Approval],
        nonce: str,
        expires: int,
    ) -> dict[str, Any]:
        body = {
            "change": dict(change),
            "approvals": [a.to_json() for a in approvals],
            "nonce": nonce,
            "expires": expires,
        }
        return self.call("POST", "/v1/policy", body, auth.SERVICE_RESOURCE, "hsm/policy")

    def audit_head(self) -> dict[str, Any]:
        return self.call("GET", "/v1/audit/head", None, auth.SERVICE_RESOURCE, "hsm/audit")

    # -- transport --------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        resource: str,
        action: str,
    ) -> dict[str, Any]:
        """One authenticated request; a fresh invocation for each attempt."""
        raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        audience = self.audience

        def headers() -> dict[str, str]:
            signed = auth.authorization_headers(
                self.identity,
                self.bundle,
                audience=audience,
                method=method,
                target=path,
                body=raw,
                resource=resource,
                action=action,
                encoded_bundle=self._encoded,
            )
            if raw:
                signed["content-type"] = "application/json"
            return signed

        return self._send(method, path, raw, headers)

    def _send(
        self,
        method: str,
        path: str,
        raw: bytes | None,
        headers: Callable[[], dict[str, str]] | None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + self._connect_retry
        while True:
            try:
                response = self._http.request(
                    method,
                    self.url + path,
                    content=raw or None,
                    headers=headers() if headers is not None else None,
                )
                break
            except httpx.ConnectError as exc:
                # Nothing reached the service: safe to try again while it restarts.
                if time.monotonic() >= deadline:
                    raise HsmUnreachableError(
                        f"cannot reach the HSM service at {self.url}: {exc}"
                    ) from None
                time.sleep(0.2)
            except httpx.TimeoutException:
                raise HsmUnreachableError(
                    f"the HSM service at {self.url} did not answer in time; the operation "
                    "may or may not have run (see the service's audit log)"
                ) from None
            except httpx.HTTPError as exc:
                raise HsmUnreachableError(
                    f"the connection to the HSM service at {self.url} failed ({exc}); the "
                    "operation may or may not have run (see the service's audit log)"
                ) from None
        return _answer(response)


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise HsmUnreachableError(
            f"the HSM service answered {response.status_code} without a JSON object"
        )
    if response.status_code >= 400:
        error = data.get("error")
        if not isinstance(error, dict):
            raise HsmUnreachableError(f"the HSM service answered {response.status_code}")
        code = str(error.get("code", "hsm_error"))[:64]
        reason = error.get("reason")
        message = " ".join(str(error.get("message", "")).split())[:500]
        shown = f"{message} ({code}{'/' + str(reason) if reason else ''})"
        raise HsmClientError(
            f"the HSM service refused: {shown}",
            code=code,
            status=response.status_code,
            reason=str(reason) if reason is not None else None,
        )
    return data


def _b64(answer: Mapping[str, Any], name: str) -> bytes:
    return b64url.decode(
        answer.get(name), f"the service's {name}", error=lambda m: HsmUnreachableError(m)
    )


def _key_path(label: str) -> str:
    return f"/v1/keys/{quote(label, safe='')}"


# -- approval requests: what a requester hands its approvers ----------------------

#: The file ``janus hsm request`` writes and ``janus hsm approve`` reads.
REQUEST_TYP: Final = "janus-hsm-approval-request/1"
_REQUEST_KEYS: Final = frozenset({"typ", "claims", "rp_id", "origin", "required", "approvers"})
MAX_REQUEST_FILE: Final = 64 * 1024


@dataclass(frozen=True)
class HsmApprovalRequest:
    """The claims approvers sign for one operation, and who may approve it where.

    Nothing in it is trusted by the service: it recomputes the claims and verifies every
    approval against its own approver registry.  Approvers read it to see what they
    approve; the requester's client reads it to find the nonce it must send.
    """

    claims: dict[str, Any]
    rp_id: str
    origin: str
    required: int
    approvers: tuple[tuple[str, bytes], ...]

    @property
    def challenge(self) -> bytes:
        from policies.approvals import approval_challenge

        return approval_challenge(self.claims)

    @property
    def nonce(self) -> str:
        return str(self.claims.get("nonce", ""))

    @property
    def expires(self) -> int:
        value = self.claims.get("expires", 0)
        return value if type(value) is int else 0

    def to_bytes(self) -> bytes:
        from policies.jws import canonical_json

        doc = {
            "typ": REQUEST_TYP,
            "claims": self.claims,
            "rp_id": self.rp_id,
            "origin": self.origin,
            "required": self.required,
            "approvers": [{"id": i, "credential_id": b64url.encode(c)} for i, c in self.approvers],
        }
        return canonical_json(doc) + b"\n"

    @classmethod
    def from_json(cls, obj: Any, source: str) -> HsmApprovalRequest:
        from policies.errors import FormatError

        def bad(message: str) -> FormatError:
            return FormatError(f"{source}: {message}")

        if not isinstance(obj, dict) or set(obj) - {"typ"} != _REQUEST_KEYS - {"typ"}:
            raise bad(f"not an HSM approval request ({', '.join(sorted(_REQUEST_KEYS))})")
        if obj.get("typ", REQUEST_TYP) != REQUEST_TYP:
            raise bad(f"not an HSM approval request ({REQUEST_TYP})")
        claims = obj["claims"]
        if not isinstance(claims, dict):
            raise bad("claims must be an object")
        for name in ("operation", "nonce", "requester"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise bad(f"claims.{name} must be a non-empty string")
        for name in ("rp_id", "origin"):
            if not isinstance(obj[name], str) or not 0 < len(obj[name]) <= 253:
                raise bad(f"{name} must be a non-empty string")
        required = obj["required"]
        if type(required) is not int or not 1 <= required <= 100:
            raise bad("required must be an integer from 1 to 100")
        entries = obj["approvers"]
        if not isinstance(entries, list) or len(entries) > 100:
            raise bad("approvers must be an array of at most 100")
        approvers = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != {"id", "credential_id"}:
                raise bad(f"approver #{n} must have exactly id, credential_id")
            if not isinstance(entry["id"], str) or not entry["id"]:
                raise bad(f"approver #{n}: id must be a non-empty string")
            credential = b64url.decode(
                entry["credential_id"], f"{source}: approver #{n}: credential_id", error=bad
            )
            approvers.append((entry["id"], credential))
        return cls(claims, obj["rp_id"], obj["origin"], required, tuple(approvers))

    @classmethod
    def loads(cls, data: bytes, source: str) -> HsmApprovalRequest:
        from policies.errors import FormatError
        from policies.jws import strict_json

        if len(data) > MAX_REQUEST_FILE:
            raise FormatError(f"{source} is too large to be an approval request")
        return cls.from_json(strict_json(data, source), source)
