"""The HSM service's engine: every front (HTTP, p11-kit RPC) asks it, and only it acts.

A request is decided in a fixed order — the key exists and the client may see it,
the client may use it, the operation is allowed, the key's state allows it, the
quorum (when the key's policy asks for one) is met by valid approvals of this very
request, then, in one ledger transaction, the approvals are unused and the use count
and rate window have room — and the decision, refused or allowed, is appended to the
audit log before the token is touched.  If the log cannot be written nothing happens
(:class:`AuditUnavailable`).

Interface notes (beyond docs/hsm-service.md): ``OperationRequest.expires`` and
``change_policy(..., expires=…)`` carry the approvals' expiry, which is part of what
approvers sign and must therefore come back with the request (an assertion holds only
the digest of the claims).  ``KeyView`` has two trailing fields, ``activation_date``
and ``deactivation_date``.  ``approval_claims`` also takes a policy change as an
``OperationRequest`` with ``operation="policy-change"`` and the change's canonical
JSON as payload (see :func:`policy_change_request`).  ``KeyView.algorithm`` is None
(and ``public_key_der`` empty) for a key still to be generated or destroyed.
``HsmEngine.config`` is the configuration in force, key policies as changed since the
start.  ``open`` takes ``sign_heads=False`` to leave heads to explicit
``sign_audit_head`` calls.  A configured key the client is not listed for is
``client_not_allowed``; ``unknown_key`` is a label the configuration does not have.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.hsm_service.audit import ServiceLog, Spend
from agent.hsm_service.config import OPERATIONS, KeyPolicy, ServiceConfig
from agent.hsm_service.errors import (
    AuditUnavailable,
    ConfigError,
    HsmServiceError,
    InvalidRequest,
    Refused,
    TokenUnavailable,
)
from agent.hsm_service.policy import (
    apply_change,
    check_operation,
    effective_state,
    later_state,
    policy_from_spec,
    policy_spec,
    spec_digest,
)
from agent.hsm_service.quorum import MAX_NONCE, check_approvals, operation_claims
from agent.hsm_service.tokens import TokenSet, check_feasible, check_keys_present
from agent.hsm_service.verify import HEAD_TYP
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from janus_hsm.strictjson import canonical_json
from policies.approvals import Approval
from policies.jws import sign_compact

log = logging.getLogger(__name__)

__all__ = [
    "HEAD_TYP",
    "HsmEngine",
    "KeyView",
    "OperationRequest",
    "policy_change_request",
]

MAX_PAYLOAD: Final = 1 << 20
POLICY_CHANGE: Final = "policy-change"
_COUNTED: Final = frozenset({"sign", "ecdh"})  # what max-uses and rate count
_LOCK_FILE: Final = "service.lock"


@dataclass(frozen=True)
class KeyView:
    """What a client may see of a key (nothing secret: no PIN, no private material)."""

    label: str
    algorithm: Algorithm | None  # None: a key to be generated, not on the token yet
    public_key_der: bytes  # SubjectPublicKeyInfo; b"" before the key exists
    jwk: dict[str, str]
    state: str  # pre-active | active | deactivated | compromised | destroyed
    operations: frozenset[str]  # sign | ecdh | generate | destroy
    uri: str  # the PKCS#11 URI (no PIN, no module path)
    quorum: int  # M, 0 when none
    activation_date: int | None = None
    deactivation_date: int | None = None


@dataclass(frozen=True)
class OperationRequest:
    client: str  # did:key of the authenticated client
    operation: str  # "sign" | "ecdh" | "generate" | "destroy" (| "policy-change")
    key: str  # label
    payload: bytes = b""  # data to sign, or the peer public key (SPKI DER) for ecdh
    mechanism: int | None = None  # a CKM_* for raw calls; None = the key's Janus default
    approvals: Sequence[Approval] = ()
    nonce: str = ""  # the requester's nonce (quorum binding, replay)
    expires: int = 0  # the approvals' expiry (unix seconds), as given to approval_claims


def policy_change_request(
    change: Mapping[str, Any],
    *,
    requester: str,
    nonce: str,
    expires: int,
    approvals: Sequence[Approval] = (),
) -> OperationRequest:
    """The request whose claims approvers sign for ``change``."""
    if not isinstance(change, Mapping):
        raise InvalidRequest("a policy change must be an object")
    try:
        json.dumps(dict(change), allow_nan=False)  # what the audit entry will hold
        payload = canonical_json(dict(change))
    except (TypeError, ValueError):
        raise InvalidRequest("a policy change must be plain JSON") from None
    key = change.get("key")
    return OperationRequest(
        client=requester,
        operation=POLICY_CHANGE,
        key=key if isinstance(key, str) else "",
        payload=payload,
        approvals=tuple(approvals),
        nonce=nonce,
        expires=expires,
    )


class HsmEngine:
    """Policy, quorum, forced audit and the tokens, for one service process.

    Thread-safe: the fronts call it from many threads.  One engine per state directory
    (a lock file enforces it), since policy overlays are cached in memory.
    """

    def __init__(
        self, config: ServiceConfig, log: ServiceLog, tokens: TokenSet, lock: _StateLock
    ) -> None:
        self._base = config
        self._log = log
        self._tokens = tokens
        self._lock_cm = lock
        self._policy_lock = threading.RLock()
        self._keys: dict[str, KeyPolicy] = dict(config.keys)
        self._stop = threading.Event()
        self._head_thread: threading.Thread | None = None
        self._last_signed: int | None = None

    @property
    def config(self) -> ServiceConfig:
        """The configuration in force: the file's, with the key policies as changed
        since (policy changes, dated transitions, destroyed keys)."""
        with self._policy_lock:
            return self._base.with_keys(self._keys)

    # -- opening

    @classmethod
    def open(cls, config: ServiceConfig, *, sign_heads: bool = True) -> HsmEngine:
        """Open the state directory and the tokens (with their PINs); refuse to start
        when a configured key is missing.  ``sign_heads`` runs the periodic head
        signer (when the config names a key for it)."""
        state = config.service.state_dir
        try:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = _StateLock(state / _LOCK_FILE)
        except BlockingIOError:
            raise ConfigError(
                "another service process uses this state directory",
                source=config.source,
                field="service.state-dir",
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot use the state directory: {exc.strerror}",
                source=config.source,
                field="service.state-dir",
            ) from None
        log: ServiceLog | None = None
        tokens = TokenSet(config)
        try:
            log = ServiceLog(
                state, timeout=config.service.audit_timeout, sync=config.service.audit_sync
            )
            tokens.open_all()
            engine = cls(config, log, tokens, lock)
            engine._load_policies()
            check_keys_present(engine.config, tokens)
            if config.service.audit_head_key is not None:
                engine._head_handle()  # the head key must exist before the first decision
            engine._log.append("policy", "-", engine._start_entry(), at=time.time())
        except BaseException:
            tokens.close()
            if log is not None:
                log.close()
            lock.close()
            raise
        if sign_heads and config.service.audit_head_key is not None:
            engine._start_head_signer()
        return engine

    def _load_policies(self) -> None:
        """The policies as changed since (unless the file was edited since the change:
        then the file, the newer word, wins), and the states keys have reached."""
        for label, (spec, base) in self._log.policies().items():
            if base != spec_digest(self._base.keys.get(label)):
                data = {
                    "event": "override",
                    "key": label,
                    "note": "the configuration file's policy for this key was edited after "
                    "the stored policy change: the file's policy applies",
                }
                self._log.save_policy(label, data, at=time.time(), policy={})
                continue
            source = f"{self._log.path} (policy of key {label})"
            self._keys[label] = policy_from_spec(self._base, label, spec, source=source)
        for label, state in self._log.states().items():
            policy = self._keys.get(label)
            if policy is not None and later_state(state, policy.state) != policy.state:
                self._keys[label] = replace(policy, state=state)

    def _start_entry(self) -> dict[str, Any]:
        cfg = self._base
        return {
            "event": "start",
            "service": cfg.service.name,
            "pid": os.getpid(),
            "approvers": [a.to_json() for a in cfg.approvers],
            "approval_rp_id": cfg.service.approval_rp_id,
            "approval_origin": cfg.service.approval_origin,
            "keys": {label: p.to_json() for label, p in sorted(self._keys.items())},
            "policy_quorum": None if cfg.policy_quorum is None else cfg.policy_quorum.to_json(),
            "audit_head_key": cfg.service.audit_head_key,
            "audit_sync": cfg.service.audit_sync,
        }

    # -- reading

    def keys(self, client: str) -> list[KeyView]:
        """The keys ``client`` may use (others are not even named)."""
        with self._policy_lock:
            policies = [p for p in self._keys.values() if client in p.clients]
        return [self._view(p) for p in sorted(policies, key=lambda p: p.label)]

    def key(self, client: str, label: str) -> KeyView:
        policy = self._policy_for(client, label)
        return self._view(policy)

    def _policy_for(self, client: str, label: str) -> KeyPolicy:
        with self._policy_lock:
            policy = self._keys.get(label) if isinstance(label, str) else None
        if policy is None:
            raise Refused("unknown_key", f"no key {label!r} is configured")
        if client not in policy.clients:
            raise Refused("client_not_allowed", f"this client may not use key {label!r}")
        return policy

    def _view(self, policy: KeyPolicy) -> KeyView:
        state = self._state(policy)
        der, alg = b"", policy.algorithm
        jwk: dict[str, str] = {}
        if state != "destroyed":
            try:
                handle = self._tokens.recovering(policy.token, policy.uri, lambda h: h)
            except KeyNotFoundError:
                handle = None
            if handle is not None:
                der = handle.public_key().public_bytes(
                    Encoding.DER, PublicFormat.SubjectPublicKeyInfo
                )
                jwk, alg = handle.jwk(), handle.algorithm
        return KeyView(
            label=policy.label,
            algorithm=alg,
            public_key_der=der,
            jwk=dict(jwk),
            state=state,
            operations=policy.operations,
            uri=policy.uri,
            quorum=0 if policy.quorum is None else policy.quorum.m,
            activation_date=policy.activation_date,
            deactivation_date=policy.deactivation_date,
        )

    def _state(self, policy: KeyPolicy, now: float | None = None) -> str:
        """The key's state now; a dated transition seen for the first time is stored
        and audited (with the date it took effect)."""
        state, since = effective_state(policy, time.time() if now is None else now)
        if state != policy.state:
            with self._policy_lock:
                if self._keys.get(policy.label) is not policy:
                    return state  # changed meanwhile; the next look records it
                data = {
                    "event": "state",
                    "key": policy.label,
                    "from": policy.state,
                    "to": state,
                    "effective": since,
                }
                self._log.save_policy(policy.label, data, at=time.time(), state=state)
                self._keys[policy.label] = replace(policy, state=state)
        return state

    # -- approvals

    def approval_claims(self, request: OperationRequest, *, expires: int) -> dict[str, Any]:
        """What approvers see and sign for ``request`` (its digest is the challenge)."""
        self._check_shape(request)
        return operation_claims(
            service=self._base.service.name,
            operation=request.operation,
            key=request.key,
            payload=request.payload,
            requester=request.client,
            nonce=request.nonce,
            expires=expires,
            mechanism=request.mechanism,
        )

    def _check_shape(self, request: OperationRequest) -> None:
        if not isinstance(request, OperationRequest):
            raise InvalidRequest("not an operation request")
        if request.operation not in (*OPERATIONS, POLICY_CHANGE):
            raise InvalidRequest(f"unknown operation; one of {', '.join(OPERATIONS)}")
        if not isinstance(request.key, str) or len(request.key) > 256:
            raise InvalidRequest("the key must be a label")
        if not request.key.isprintable():
            raise InvalidRequest("the key label has control characters")
        if not isinstance(request.client, str) or not request.client:
            raise InvalidRequest("the request names no client")
        if len(request.client) > 1024 or not request.client.isprintable():
            raise InvalidRequest("the client must be a did:key")
        if not isinstance(request.payload, bytes) or len(request.payload) > MAX_PAYLOAD:
            raise InvalidRequest(f"the payload must be at most {MAX_PAYLOAD} bytes")
        if not isinstance(request.nonce, str) or len(request.nonce) > MAX_NONCE:
            raise InvalidRequest(f"the nonce must be at most {MAX_NONCE} characters")
        if request.nonce and not request.nonce.isprintable():
            raise InvalidRequest("the nonce must be printable text")
        if type(request.expires) is not int or not 0 <= request.expires < 2**53:
            raise InvalidRequest("expires must be a unix time in seconds")
        if request.mechanism is not None and (
            type(request.mechanism) is not int or not 0 <= request.mechanism < 2**64
        ):
            raise InvalidRequest("the mechanism must be a CKM_* number")

    # -- acting

    def perform(self, request: OperationRequest) -> bytes:
        """Decide, audit (durably, before acting), then act.

        Returns the signature (sign), the raw shared secret (ecdh), the new public key
        as SubjectPublicKeyInfo DER (generate) or b"" (destroy).
        """
        self._check_shape(request)
        if request.operation == POLICY_CHANGE:
            raise InvalidRequest("policy changes go through change_policy")
        now = time.time()
        data = self._decision_data(request)
        label = request.key or "-"
        try:
            policy = self._policy_for(request.client, request.key)
            state = self._state(policy, now)
            data["state"] = state
            check_operation(policy, state, request.client, request.operation)
            self._check_feasible(policy, request)
            challenge = None
            if policy.quorum is not None and policy.quorum.applies_to(request.operation):
                data["quorum"] = policy.quorum.to_json()
                claims = self.approval_claims(request, expires=request.expires)
                data["claims"] = claims
                counted, challenge = self._check_approvals(policy.quorum, request, claims, now)
                data["counted"] = counted
        except Refused as refusal:
            self._log.decide(data, label=label, at=now, refusal=refusal)
            raise AssertionError("unreachable") from refusal  # decide raised the refusal
        spend = None
        if request.operation in _COUNTED:
            rate = None if policy.rate is None else (policy.rate.count, policy.rate.per_seconds)
            spend = Spend(policy.label, policy.max_uses, rate)
        seq = self._log.decide(data, label=label, at=now, spend=spend, challenge=challenge)
        return self._act(policy, request, seq)

    def _check_feasible(self, policy: KeyPolicy, request: OperationRequest) -> None:
        """Refuse, before deciding, what the key cannot do (no use is counted for it)."""
        if request.operation in ("sign", "ecdh"):
            try:
                handle = self._tokens.recovering(policy.token, policy.uri, lambda h: h)
            except KeyNotFoundError:
                raise TokenUnavailable(f"key {policy.label!r} is not on its token") from None
            check_feasible(handle.algorithm, request.operation, request.payload, request.mechanism)
        elif request.mechanism is not None:
            raise InvalidRequest(f"no mechanism is taken for {request.operation}")

    def _decision_data(self, request: OperationRequest) -> dict[str, Any]:
        data: dict[str, Any] = {
            "event": "decision",
            "service": self._base.service.name,
            "client": request.client,
            "operation": request.operation,
            "key": request.key,
            "payload_sha256": hashlib.sha256(request.payload).hexdigest(),
        }
        if request.mechanism is not None:
            data["mechanism"] = request.mechanism
        if request.nonce:
            data["nonce"] = request.nonce
        if request.approvals:
            data["approvals"] = [a.to_json() for a in request.approvals]
            data["expires"] = request.expires
        return data

    def _check_approvals(
        self, quorum: Any, request: OperationRequest, claims: dict[str, Any], now: float
    ) -> tuple[list[str], bytes]:
        service = self._base.service
        return check_approvals(
            quorum,
            request.approvals,
            claims,
            self._base.approvers,
            rp_id=service.approval_rp_id,
            origin=service.approval_origin,
            now=now,
            max_ttl=service.approval_max_ttl,
        )

    def _act(self, policy: KeyPolicy, request: OperationRequest, seq: int) -> bytes:
        op = request.operation
        try:
            if op == "sign":
                result = self._tokens.sign(
                    policy.token, policy.uri, request.payload, request.mechanism
                )
            elif op == "ecdh":
                result = self._tokens.ecdh(policy.token, policy.uri, request.payload)
            elif op == "generate":
                result = self._generate(policy)
            else:
                self._tokens.destroy(policy.token, policy.uri)
                self._mark_destroyed(policy)
                result = b""
        except (TokenUnavailable, InvalidRequest, KeyNotFoundError) as exc:
            self._result(policy.label, seq, "failed", getattr(exc, "code", "error"))
            if isinstance(exc, KeyNotFoundError):
                raise TokenUnavailable(f"key {policy.label!r} is not on its token") from None
            raise
        if op in ("generate", "destroy"):
            self._result(policy.label, seq, "done", "")
        return result

    def _result(self, label: str, seq: int, outcome: str, code: str) -> None:
        """Record what became of an allowed operation that changed or failed (best
        effort: the decision itself is already durable)."""
        data = {"event": "result", "decision": seq, "outcome": outcome}
        if code:
            data["code"] = code
        with contextlib.suppress(AuditUnavailable):
            self._log.append("decision", label, data, at=time.time())

    def _generate(self, policy: KeyPolicy) -> bytes:
        if policy.algorithm is None:  # the config parser requires it with "generate"
            raise InvalidRequest(f"key {policy.label!r} names no algorithm")
        if self._tokens.exists(policy.token, policy.uri):
            raise InvalidRequest(f"key {policy.label!r} already exists on its token")
        handle = self._tokens.generate(policy.token, policy.uri, policy.algorithm)
        return handle.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    def _mark_destroyed(self, policy: KeyPolicy) -> None:
        data = {"event": "state", "key": policy.label, "from": policy.state, "to": "destroyed"}
        with self._policy_lock:
            self._log.save_policy(policy.label, data, at=time.time(), state="destroyed")
            current = self._keys.get(policy.label, policy)
            self._keys[policy.label] = replace(current, state="destroyed")

    # -- policy changes

    def change_policy(
        self,
        change: Mapping[str, Any],
        approvals: Sequence[Approval],
        *,
        requester: str,
        nonce: str,
        expires: int = 0,
    ) -> None:
        """Apply a policy change approved by the ``[policy-changes]`` quorum; stored in
        the state directory (it survives restarts) and audited with its approvals."""
        request = policy_change_request(
            change, requester=requester, nonce=nonce, expires=expires, approvals=approvals
        )
        self._check_shape(request)
        now = time.time()
        label = request.key or "-"
        data: dict[str, Any] = {
            "event": "change",
            "service": self._base.service.name,
            "requester": requester,
            "change": dict(change),
            "approvals": [a.to_json() for a in approvals],
        }
        quorum = self._base.policy_quorum
        try:
            if quorum is None:
                raise Refused(
                    "quorum_required",
                    "no [policy-changes] quorum is configured: policy changes are made "
                    "in the configuration file",
                )
            claims = self.approval_claims(request, expires=expires)
            data["claims"] = claims
            data["quorum"] = quorum.to_json()
            counted, challenge = self._check_approvals(quorum, request, claims, now)
            data["counted"] = counted
            with self._policy_lock:
                current = dict(self._keys)
            new_policy = apply_change(self._base, current, change)
        except (Refused, ConfigError) as refusal:
            reason = refusal.reason if isinstance(refusal, Refused) else refusal.code
            data.update(outcome="refused", reason=reason, message=str(refusal))
            self._log.append("policy", label, data, at=now)
            raise
        needs_key = "generate" not in new_policy.operations and new_policy.state != "destroyed"
        if needs_key and not self._tokens.exists(new_policy.token, new_policy.uri):
            raise ConfigError(
                "no such key on its token", source="policy change", field="policy.uri"
            )
        data["policy"] = new_policy.to_json()
        with self._policy_lock:
            if change.get("action") == "set-state":
                self._log.save_policy(
                    label, data, at=now, challenge=challenge, state=new_policy.state
                )
            else:
                self._log.save_policy(
                    label,
                    data,
                    at=now,
                    challenge=challenge,
                    policy=policy_spec(new_policy),
                    base=spec_digest(self._base.keys.get(label)),
                )
            self._keys[label] = new_policy

    # -- signed heads

    def _head_handle(self) -> KeyHandle:
        service = self._base.service
        assert service.audit_head_key is not None and service.audit_head_token is not None
        try:
            return self._tokens.recovering(
                service.audit_head_token, service.audit_head_key, lambda h: h
            )
        except KeyNotFoundError:
            raise ConfigError(
                "no such key on its token",
                source=self._base.source,
                field="service.audit-head-key",
            ) from None

    def sign_audit_head(self) -> dict[str, Any]:
        """Sign the log's current head with the audit-head key and append the signature
        (an entry of kind ``head``).  Returns the signed statement and its JWS."""
        service = self._base.service
        if service.audit_head_key is None or service.audit_head_token is None:
            raise InvalidRequest("no service.audit-head-key is configured")
        head_key, head_token = service.audit_head_key, service.audit_head_token
        head = self._log.head()
        seq, digest = head if head is not None else (0, "0" * 64)
        statement = {
            "iss": service.name,
            "seq": seq,
            "hash": digest,
            "iat": int(time.time()),
        }
        try:
            did, jws = self._tokens.recovering(
                head_token,
                head_key,
                lambda h: (h.did, sign_compact(h, {"typ": HEAD_TYP}, statement)),
            )
        except KeyNotFoundError:
            raise TokenUnavailable("the audit-head key is not on its token") from None
        entry = {"event": "head", **statement, "key": did, "jws": jws}
        # The head entry is itself chained: it is written only right after the entry
        # it signs (if another was appended meanwhile, the next round signs that one).
        written = self._log.append_head(entry, seq=seq, digest=digest)
        if written is not None:
            self._last_signed = written
        return {"statement": statement, "key": did, "jws": jws, "entry": written}

    def _start_head_signer(self) -> None:
        interval = self._base.service.audit_head_interval

        def loop() -> None:
            while not self._stop.wait(interval):
                self._sign_if_new()

        self._head_thread = threading.Thread(target=loop, name="audit-head-signer", daemon=True)
        self._head_thread.start()

    def _sign_if_new(self) -> None:
        """Sign the head if entries were added since the last signed head.  A failure
        is logged and retried at the next interval: the service keeps serving (each
        decision is still chained; only its signature waits)."""
        try:
            head = self._log.head()
            if head is not None and head[0] != self._last_signed:
                self.sign_audit_head()
        except HsmServiceError as exc:
            log.warning("signing the audit log's head failed (%s): %s", exc.code, exc)

    # -- closing

    def close(self) -> None:
        """Stop; with the periodic signer running, sign a last head first, so that a
        stopped service's log is covered to its end."""
        self._stop.set()
        thread = self._head_thread
        if thread is not None:
            thread.join(timeout=30)
            self._sign_if_new()
        self._tokens.close()
        self._log.close()
        self._lock_cm.close()

    def __enter__(self) -> HsmEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _StateLock:
    """An exclusive, non-blocking ``flock`` on the state directory's lock file: a
    second service on the same state would keep its own copy of the policies."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
