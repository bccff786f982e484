"""The cloud agent, without HTTP: grants, actions under capabilities, mailbox, revocation.

The cloud agent runs on hardware the owner does not control, so it holds nothing that
matters: one fresh key per grant (a leaked key is worth one grant), destroyed as soon
as the grant expires, is used up or is revoked.  Every action is a capability use:
the agent signs an invocation with the grant key (or receives one from a holder of a
capability it delegated), ``authorize`` verifies it and counts it in the ledger, and
only then is the action performed.  What it returns for a signature is evidence that
verifies offline back to the owner's hardware root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cloud.bus_errors import HomeLedgerUnreachableError
from agent.cloud.store import ACTIVE, PENDING, CloudStore, GrantRecord
from agent.errors import BadRequestError, ConflictError, GrantInactiveError, NotFoundError
from agent.protocol import KEYREQ_TYP, PICKUP_TYP, check_signed_request
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software import SoftwareKeyHandle, SoftwareProvider
from janus_hsm.database_url import sqlite_url
from janus_hsm.errors import KeyExistsError, KeyNotFoundError
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies.abilities import Ability
from policies.authorize import Grant, authorize, authorize_async
from policies.capability import Bundle
from policies.durations import parse_duration
from policies.errors import FormatError, PolicyError, RevokedError, VerificationError
from policies.invocation import Invocation, invoke_local
from policies.issue import grant
from policies.jws import canonical_json
from policies.ledger import open_ledger
from policies.ledger.aio import AsyncSpender
from policies.ledger.base import SpendReceipt
from policies.policy import IssuancePolicy
from policies.revocation import Revocation
from policies.verify import Authorization, Verifier

log = logging.getLogger(__name__)

PENDING_TTL = 3600
MAX_PENDING = 1000

#: Checks a use may go ahead given the agent's view of the bus (``limited``: the chain
#: has a use limit or a home); raises the refusal.  Set by agent.cloud.bus_link.
UseGate = Callable[[bool], None]
#: Spends a verified use in the ledger of the instance named (its home ledger).
HomeSpend = Callable[[str, Authorization, float], Awaitable[SpendReceipt]]
HomeSpendSync = Callable[[str, Authorization, float], SpendReceipt]
#: Hands an event (kind, body) to the bus; never blocks, callable from any thread.
EventSink = Callable[[str, dict[str, Any]], None]


def home_of(bundle: Bundle) -> str | None:
    """The instance whose ledger counts this chain's uses: the highest link's home (a
    child keeps its parent's, so every link below names the same one)."""
    for cap in bundle.chain:
        if cap.limits.home is not None:
            return cap.limits.home
    return None


def needs_fresh_state(bundle: Bundle) -> bool:
    """Whether a use of the chain must be refused when revocation state may be stale:
    a use limit, a home ledger or ``lim.fresh`` anywhere in it."""
    return any(
        c.limits.uses is not None or c.limits.home is not None or c.limits.fresh
        for c in bundle.chain
    )


@dataclass
class CloudConfig:
    state_dir: Path
    passphrase_source: Callable[[], str]
    ledger_url: str | None = None
    owner: str | None = None  # only grants rooted at this did:key are accepted
    key_algorithm: Algorithm = Algorithm.EdDSA
    delegation_policy: IssuancePolicy = field(default_factory=IssuancePolicy.permissive)
    # When set, /v1/grants/{id}/actions/… requires "Authorization: Bearer <token>": the
    # capability limits what the agent may do, the token limits who may ask it to.
    api_token: str | None = None

    @property
    def database_url(self) -> str:
        return self.ledger_url or sqlite_url(self.state_dir.resolve() / "cloud.db")


# As Starlette's JSONResponse renders a body (one encoder, not one per json.dumps call).
_json_text = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


@dataclass(frozen=True)
class ServiceAction:
    """An action a service of this agent performs under a grant (e.g. ``msg/submit``).

    ``check`` refuses a malformed request before a use is counted; ``perform`` runs once
    the use is counted and returns the action's result.
    """

    check: Callable[[Mapping[str, Any]], None]
    perform: Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ActionResult:
    action: str
    grant_id: str
    result: dict[str, Any]
    # The evidence's bundle as JSON text, when it is the grant's own: most of a
    # signature's response, the same for every use, so rendered once per grant.
    bundle_text: str | None = None

    def to_json(self) -> bytes:
        """The HTTP response body: ``{action, grant_id, **result}`` as UTF-8 JSON."""
        body = {"action": self.action, "grant_id": self.grant_id, **self.result}
        evidence = body.get("evidence")
        if self.bundle_text is None or not isinstance(evidence, dict) or "bundle" not in evidence:
            return _json_text(body).encode()
        # Both objects are non-empty, so each rendering ends "...}" and can be extended.
        outer = _json_text({k: v for k, v in body.items() if k != "evidence"})
        inner = _json_text({k: v for k, v in evidence.items() if k != "bundle"})
        return (f'{outer[:-1]},"evidence":{inner[:-1]},"bundle":{self.bundle_text}}}}}').encode()


@dataclass(frozen=True)
class _Unlocked:
    """What an active grant needs per request, read and decrypted once."""

    record: GrantRecord
    bundle: Bundle
    handle: KeyHandle
    bundle_json: Any  # the bundle as evidence carries it (read-only, shared)
    bundle_text: str  # bundle_json rendered (ActionResult.to_json)
    home: str | None = None  # home_of(bundle)
    limited: bool = True  # needs_fresh_state(bundle)


@dataclass(frozen=True)
class CheckedRevocation:
    """A revocation verified against ``bundle`` (an installed grant's), not yet stored."""

    record: Revocation
    bundle: Bundle
    affected: list[tuple[GrantRecord, Bundle]]


@dataclass
class _Users:
    """Requests of this process on one grant, and whether one of them may have spent it."""

    count: int = 0
    check: bool = False


@dataclass
class _Flight:
    users: _Users  # the grant's requests in flight, this one included
    settled: bool = False  # the request's own receipt showed uses left on every link


class CloudAgent:
    """Thread-safe; one per process (several processes may share a PostgreSQL store)."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ledger = open_ledger(config.database_url)
        self.store = CloudStore(config.database_url)
        self.keys = SoftwareProvider.open(
            f"soft:dir={(config.state_dir / 'keys').resolve()}",
            passphrase_source=config.passphrase_source,
            allow_extractable=True,
        )
        self.identity = self._own_key("agent-identity", Algorithm.EdDSA)
        # Senders encrypt forward messages to this key (Ed25519 keys cannot do ECDH).
        self.routing_key = self._own_key("agent-routing", Algorithm.X25519)
        # No revocation source here: a use is only ever counted by the ledger's spend,
        # which refuses a revoked link in the same transaction, so a second read of the
        # revocations before it would only cost time (install checks them itself).
        self.verifier = Verifier()
        self._seen_requests: dict[str, float] = {}
        self._unlocked: dict[str, _Unlocked] = {}
        self._users: dict[str, _Users] = {}
        self._lock = threading.Lock()
        #: Actions of the services this agent runs (--sending), by action name.
        self.actions: dict[str, ServiceAction] = {}
        # On an event bus (agent.cloud.bus_link sets these); None: a single instance.
        self.use_gate: UseGate | None = None
        self.home_spend: HomeSpend | None = None
        self.home_spend_sync: HomeSpendSync | None = None
        self.event_sink: EventSink | None = None

    @property
    def did(self) -> str:
        return self.identity.did

    def _own_key(self, name: str, algorithm: Algorithm) -> KeyHandle:
        uri = f"soft:object={name}"
        try:
            return self.keys.find(uri)
        except KeyNotFoundError:
            try:
                return self.keys.generate(uri, algorithm)
            except KeyExistsError:  # another instance created it meanwhile
                return self.keys.find(uri)

    # --- grants -------------------------------------------------------------------

    def create_grant(self, key_request: str | None, *, now: float | None = None) -> GrantRecord:
        """A fresh key for one grant; with an owner configured, only on the owner's request."""
        now = time.time() if now is None else now
        if self.config.owner is not None:
            self._check_signed_request(key_request, KEYREQ_TYP, now=now)
        if len(self.store.grants(PENDING)) >= MAX_PENDING:
            raise ConflictError("too many grants are waiting for their capability")
        grant_id = b64url.random_id(12)
        handle = self.keys.generate(f"soft:object=grant-{grant_id}", self.config.key_algorithm)
        log.info("created key %s for grant %s", handle.did, grant_id)
        return self.store.add_grant(grant_id, handle.uri, handle.did)

    def install(self, grant_id: str, bundle_text: str, *, now: float | None = None) -> GrantRecord:
        """Accept the capability the owner signed for this grant's key."""
        now = time.time() if now is None else now
        record = self._live(grant_id)
        bundle = Bundle.parse(bundle_text)
        if record.status == ACTIVE:
            # A retried install of the same capability is answered; another one is not
            # taken: anyone holding a delegable capability from the owner could otherwise
            # swap a narrower chain in under the owner's grant (or end it early).
            # The leaf's id is a hash of its text, which names its parent's id: one
            # leaf id, one chain.
            if record.leaf_id == bundle.leaf.id:
                return record
            raise ConflictError(f"grant {grant_id} already has its capability installed")
        chain = self.verifier.verify_chain(bundle, now=now, root=self.config.owner)
        if chain.leaf.audience != record.did:
            raise BadRequestError(
                f"the bundle is granted to {chain.leaf.audience}, not to this grant's key "
                f"{record.did}"
            )
        revoked = self.ledger.revoked(list(chain.ids))
        if revoked is not None:
            raise RevokedError(
                f"capability {revoked} is revoked", link=list(chain.ids).index(revoked)
            )
        if not self.store.activate(grant_id, bundle.to_json(), chain.leaf.id, chain.leaf.expires):
            raise ConflictError(f"grant {grant_id} is no longer waiting for its capability")
        self.ledger.record_grant(
            chain.leaf.id,
            {
                "grant": grant_id,
                "holder": record.did,
                "principal": chain.principal,
                "expires": chain.leaf.expires,
            },
        )
        return self.store.grant(grant_id)

    def _live(self, grant_id: str) -> GrantRecord:
        record = self.store.grant(grant_id)
        if record.status not in (PENDING, ACTIVE):
            raise GrantInactiveError(
                f"grant {grant_id} is {record.status} ({record.reason}); its key is gone"
            )
        return record

    def _active(self, grant_id: str) -> _Unlocked:
        """The grant's key and capability, from this process's cache once unlocked.

        A cached grant is not read back from the store on every request: whatever
        ends a grant (expiry, use-up, revocation, here or in another instance) also
        makes the verifier or the ledger refuse the use, and a refused use re-reads
        the store (_refused). The periodic sweep forgets keys destroyed elsewhere.
        """
        cached = self._cached(grant_id)
        if cached is not None:
            return cached
        try:
            record = self._live(grant_id)
        except GrantInactiveError:
            self._forget(grant_id)
            raise
        if record.status != ACTIVE or record.bundle is None:
            raise ConflictError(f"grant {grant_id} has no capability installed yet")
        try:
            found: SoftwareKeyHandle = self.keys.find(record.key_uri)
            # Unlocking costs a scrypt derivation (~0.2 s by design): do it once per
            # grant, here, and not in the first signature (which may run on the loop).
            found.unlock()
        except KeyNotFoundError:  # another instance destroyed it a moment ago
            raise GrantInactiveError(f"grant {grant_id}'s key is gone") from None
        bundle = Bundle.parse(record.bundle)
        bundle_json = bundle.to_dict()
        unlocked = _Unlocked(
            record,
            bundle,
            found,
            bundle_json,
            _json_text(bundle_json),
            home_of(bundle),
            needs_fresh_state(bundle),
        )
        with self._lock:
            return self._unlocked.setdefault(grant_id, unlocked)

    def _cached(self, grant_id: str) -> _Unlocked | None:
        """The unlocked grant if this process has it (no I/O: fit for the event loop)."""
        with self._lock:
            return self._unlocked.get(grant_id)

    def _forget(self, grant_id: str) -> None:
        with self._lock:
            self._unlocked.pop(grant_id, None)

    def _refused(self, grant_id: str) -> None:
        """After a refusal: if the grant was ended meanwhile, say that instead."""
        try:
            self._live(grant_id)
        except GrantInactiveError:
            self._forget(grant_id)
            raise

    # --- actions ------------------------------------------------------------------

    def act(
        self,
        grant_id: str,
        action: str,
        resource: str,
        request: Mapping[str, Any],
        *,
        now: float | None = None,
    ) -> ActionResult:
        """Use a grant on the agent's own initiative: sign an invocation with its key."""
        now = time.time() if now is None else now
        self._check_service_request(action, request)
        with self._in_flight(grant_id) as flight:
            grant_ = self._active(grant_id)
            self._check_unexpired(grant_, now=now)
            invocation, checked = self._own_invocation(grant_, action, resource, request, now=now)
            return self._perform(grant_, grant_.bundle, invocation, checked, flight, now=now)

    async def act_async(
        self,
        spender: AsyncSpender,
        grant_id: str,
        action: str,
        resource: str,
        request: Mapping[str, Any],
    ) -> ActionResult:
        """``act`` for an event loop (the HTTP server), with the same guarantees.

        Signing, verification and evidence are CPU only (~0.1 ms each; the chain is
        verified once per grant), so for ``sign/`` actions they run on the loop, and
        only the ledger write leaves it: ``spender`` batches concurrent uses into one
        durable commit on its writer thread.  Whatever may block (unlocking a grant,
        store reads after a refusal, retiring a spent grant, the other actions) runs in
        a thread: under load, thread hand-offs and GIL contention cost more than the
        use itself.
        """
        if not action.startswith("sign/"):
            return await asyncio.to_thread(self.act, grant_id, action, resource, request)
        now = time.time()
        flight = self._enter(grant_id)
        try:
            grant_ = self._cached(grant_id)
            if grant_ is None:
                grant_ = await asyncio.to_thread(self._active, grant_id)
            self._check_unexpired(grant_, now=now)
            if self.use_gate is not None:
                self.use_gate(grant_.limited)
            invocation, checked = self._own_invocation(grant_, action, resource, request, now=now)
            try:
                if grant_.home is not None and grant_.home != self.did:
                    used = await self._forwarded(
                        grant_.home, grant_.bundle, invocation, checked, now
                    )
                else:
                    used = await authorize_async(
                        self.verifier,
                        spender,
                        grant_.bundle,
                        invocation,
                        checked,
                        now=now,
                        root=self.config.owner,
                        audience=self.did,
                    )
            except PolicyError:
                await asyncio.to_thread(self._refused, grant_id)
                raise
            return self._performed(grant_, grant_.bundle, used, flight, now=now)
        finally:
            if self._leave(grant_id, flight):
                await asyncio.to_thread(self._retire_if_spent, grant_id, now=time.time())

    async def _forwarded(
        self,
        home: str,
        bundle: Bundle,
        invocation: Invocation,
        request: Mapping[str, Any],
        now: float,
    ) -> Grant:
        """Verify here, then have the home ledger (another instance) count the use.

        The home verifies the invocation again before it spends: the bus between the
        two is an untrusted carrier.
        """
        authorization = self.verifier.verify(
            bundle, invocation, request, now=now, root=self.config.owner, audience=self.did
        )
        if self.home_spend is None:
            raise _no_route_home(home)
        return Grant(authorization, await self.home_spend(home, authorization, now))

    def spend_as_home(
        self, bundle: Bundle, invocation: str, request: Mapping[str, Any], *, now: float
    ) -> SpendReceipt:
        """Count a use forwarded by another instance, as the chain's home ledger.

        The invocation is addressed to the instance that forwarded it, not to this one:
        its nonce is recorded here, so it counts once whichever instance forwards it.
        """
        if home_of(bundle) != self.did:
            raise BadRequestError("this agent is not the home ledger of that capability")
        return authorize(
            self.verifier, self.ledger, bundle, invocation, request, now=now, root=self.config.owner
        ).receipt

    @staticmethod
    def _check_unexpired(grant_: _Unlocked, *, now: float) -> None:
        """Refuse a use of an expired grant at once, by this agent's own clock.

        The verifier allows other parties' clocks some skew past a capability's expiry;
        the agent acting on its own grant has no such excuse, and another instance may
        already have destroyed the key (which a cached copy here would not notice).  The
        request leaves unsettled, so the last one out retires the grant.
        """
        expires = grant_.record.expires_at
        if expires is not None and now >= expires:
            raise GrantInactiveError(f"grant {grant_.record.grant_id} has expired")

    def _own_invocation(
        self,
        grant_: _Unlocked,
        action: str,
        resource: str,
        request: Mapping[str, Any],
        *,
        now: float,
    ) -> tuple[Invocation, Mapping[str, Any]]:
        """An invocation signed here with the grant's key, addressed to this agent,
        and the request as it was checked for it (what the action must then use).

        Made by invoke_local, so the verifier skips re-checking the signature just
        made and the request just checked; invocations from outside
        (invoke_external) are text and fully checked.
        """
        try:
            invocation = invoke_local(
                grant_.handle,
                capability_id=grant_.bundle.leaf.id,
                action=action,
                resource=resource,
                request=request,
                now=int(now),
                audience=self.did,
            )
        except KeyNotFoundError:
            # Retired a moment ago (by the last request of a spent grant, or the sweep)
            # after this request found it in the cache: nothing was spent, so say so.
            self._forget(grant_.record.grant_id)
            raise GrantInactiveError(f"grant {grant_.record.grant_id}'s key is gone") from None
        assert invocation.signed_request is not None  # invoke_local always sets it
        return invocation, invocation.signed_request.value

    def invoke_external(
        self,
        bundle: str | Mapping[str, Any],
        invocation: str,
        request: Mapping[str, Any],
        *,
        now: float | None = None,
    ) -> ActionResult:
        """A holder of a capability this agent delegated invokes it with its own key.

        ``bundle`` is its text or its JSON object (as an HTTP body carries it), parsed
        here once.
        """
        now = time.time() if now is None else now
        if self.actions:
            self._check_service_request(Invocation.parse(invocation).action, request)
        parsed = Bundle.parse(bundle) if isinstance(bundle, str) else Bundle.from_dict(bundle)
        active = {g.did: g for g in self.store.grants(ACTIVE)}
        anchor = next((active[c.audience] for c in parsed.chain if c.audience in active), None)
        if anchor is None:
            raise NotFoundError("the chain passes through none of this agent's active grants")
        with self._in_flight(anchor.grant_id) as flight:
            grant_ = self._active(anchor.grant_id)
            self._check_unexpired(grant_, now=now)
            return self._perform(grant_, parsed, invocation, request, flight, now=now)

    def _perform(
        self,
        grant_: _Unlocked,
        bundle: Bundle,
        invocation: Invocation | str,
        request: Mapping[str, Any],
        flight: _Flight,
        *,
        now: float,
    ) -> ActionResult:
        # Invocations must name this agent: one made for another verifier (which keeps
        # its own nonces) cannot be replayed here.
        if self.use_gate is not None:
            self.use_gate(needs_fresh_state(bundle))
        home = home_of(bundle)
        try:
            if home is not None and home != self.did:
                authorization = self.verifier.verify(
                    bundle, invocation, request, now=now, root=self.config.owner, audience=self.did
                )
                if self.home_spend_sync is None:
                    raise _no_route_home(home)
                used = Grant(authorization, self.home_spend_sync(home, authorization, now))
            else:
                used = authorize(
                    self.verifier,
                    self.ledger,
                    bundle,
                    invocation,
                    request,
                    now=now,
                    root=self.config.owner,
                    audience=self.did,
                )
        except PolicyError:
            self._refused(grant_.record.grant_id)
            raise
        return self._performed(grant_, bundle, used, flight, now=now)

    def _performed(
        self, grant_: _Unlocked, bundle: Bundle, used: Grant, flight: _Flight, *, now: float
    ) -> ActionResult:
        """The action of a use that is verified and durably counted."""
        flight.settled = not self._exhausted(grant_, used.receipt, now=now)
        try:
            return self._act_on(grant_, bundle, used, now=now)
        except KeyNotFoundError:
            # Revoked or swept while this request was between its counted use and its
            # action: the key is gone, so the grant is over (the use stays counted).
            self._forget(grant_.record.grant_id)
            raise GrantInactiveError(
                f"grant {grant_.record.grant_id} ended while this request was in flight; "
                "its key is gone"
            ) from None

    def _act_on(
        self, grant_: _Unlocked, bundle: Bundle, used: Grant, *, now: float
    ) -> ActionResult:
        handle = grant_.handle
        inv = used.authorization.invocation
        action = inv.action
        if action.startswith("sign/"):
            bundle_json = grant_.bundle_json if bundle is grant_.bundle else None
            result = self._sign(handle, bundle, bundle_json, inv, used.authorization.request)
        elif action == "msg/receive":
            result = self._hold(used.authorization.chain.principal, used.authorization.request)
        elif action == "msg/send":
            result = self._send(handle, used.authorization.request)
        elif action == "cap/delegate":
            result = self._delegate(handle, bundle, used.authorization.request, now=now)
        elif action in self.actions:
            result = self.actions[action].perform(used.authorization.request)
        else:
            raise BadRequestError(f"this agent performs no action {action!r}")
        result["uses"] = used.receipt.uses
        own = bundle is grant_.bundle
        return ActionResult(
            action, grant_.record.grant_id, result, grant_.bundle_text if own else None
        )

    @staticmethod
    def _exhausted(grant_: _Unlocked, receipt: SpendReceipt, *, now: float) -> bool:
        """Whether this use may have been the grant's last (then it is checked at once)."""
        expires = grant_.record.expires_at
        if expires is not None and now >= expires:
            return True
        for cap in grant_.bundle.chain:
            limit = cap.limits.uses
            if limit is not None and receipt.uses.get(cap.id, limit) >= limit:
                return True
        return False

    def _sign(
        self,
        handle: KeyHandle,
        bundle: Bundle,
        bundle_json: Any,
        invocation: Invocation,
        payload: Mapping[str, Any],
    ) -> dict[str, Any]:
        signed = invocation.signed_request
        if signed is not None and payload is signed.value:  # serialised once, when signed
            signature = handle.sign(signed.canonical)
        else:
            signature = handle.sign(canonical_json(dict(payload)))
        return {
            "evidence": {
                "typ": "janus-evidence/1",
                "payload": dict(payload),
                "signer": handle.did,
                "alg": handle.algorithm.value,
                "signature": b64url_encode(signature),
                "invocation": invocation.compact,
                "bundle": bundle_json if bundle_json is not None else bundle.to_dict(),
            }
        }

    def _hold(self, owner: str, request: Mapping[str, Any]) -> dict[str, Any]:
        message = request.get("message")
        if not isinstance(message, dict):
            raise BadRequestError("msg/receive needs {'message': <DIDComm envelope>}")
        msg_id = b64url.random_id(12)
        self.store.hold(msg_id, owner, json.dumps(message, separators=(",", ":")))
        return {"held": msg_id}

    def _send(self, handle: KeyHandle, request: Mapping[str, Any]) -> dict[str, Any]:
        from agent.cloud.outbound import send_message

        return send_message(handle, request)

    def _delegate(
        self, handle: KeyHandle, bundle: Bundle, request: Mapping[str, Any], *, now: float
    ) -> dict[str, Any]:
        try:
            to, can, with_ = request["to"], request["can"], request["with"]
            ttl = parse_duration(str(request["ttl"]))
            uses = request["uses"]
            caveats = tuple(request.get("caveats", ()))
            depth = int(request.get("depth", 0))
        except (KeyError, TypeError, ValueError, FormatError) as exc:
            raise BadRequestError(
                "cap/delegate needs to, can, with, ttl and uses (caveats and depth optional): "
                f"{exc}"
            ) from None
        child = grant(
            handle,
            audience=to,
            abilities=[Ability(with_, can, caveats)],
            ttl_seconds=ttl,
            uses=uses,
            depth=depth,
            proof=bundle,
            policy=self.config.delegation_policy,
            now=int(now),
        )
        return {"bundle": child.to_dict()}

    # --- mailbox --------------------------------------------------------------------

    def pickup(
        self, signed_request: str, *, now: float | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """The owner collects held messages; only acknowledged ones are deleted."""
        now = time.time() if now is None else now
        claims = self._check_signed_request(signed_request, PICKUP_TYP, now=now)
        owner = claims["iss"]
        ack = claims.get("ack", [])
        if not isinstance(ack, list) or not all(isinstance(a, str) for a in ack):
            raise BadRequestError("pickup 'ack' must be a list of message ids")
        removed = self.store.acknowledge(owner, ack)
        messages = self.store.held(owner, limit)
        return {
            "acknowledged": removed,
            "messages": [{"id": m.msg_id, "envelope": json.loads(m.envelope)} for m in messages],
            "remaining": self.store.count_held(owner),
        }

    # --- revocation and clean-up ------------------------------------------------------

    def revoke(self, record_text: str, *, now: float | None = None) -> dict[str, Any]:
        """Store a signed revocation and destroy, at once, every key it disables."""
        return self.apply_checked_revocation(self.check_revocation(record_text))

    def check_revocation(self, record_text: str) -> CheckedRevocation:
        """Verify a posted revocation against a grant here that holds the revoked link;
        nothing is stored yet (``apply_checked_revocation`` does)."""
        record = Revocation.parse(record_text)
        affected = self._affected(record.revoked_id)
        if not affected:
            raise NotFoundError("no active grant here contains the revoked capability")
        record.verify(affected[0][1])
        return CheckedRevocation(record, affected[0][1], affected)

    def apply_checked_revocation(self, checked: CheckedRevocation) -> dict[str, Any]:
        return self._apply_revocation(checked.record, checked.affected)

    def apply_revocation(self, record_text: str, bundle_json: Any) -> dict[str, Any]:
        """A revocation from elsewhere (the bus), verified against the bundle it came
        with: the chain must hold (up to this agent's owner, when it has one) and the
        record's signer must have issued the revoked link or one above it.

        Stored even when no grant here holds the revoked link: a bundle installed later
        is then refused.  Time plays no part in that authority, so the chain is checked
        at a moment all its links were valid.
        """
        record = Revocation.parse(record_text)
        bundle = Bundle.from_dict(bundle_json)
        valid_from = max(c.not_before for c in bundle.chain)
        valid_to = min(c.expires for c in bundle.chain) - 1
        at = min(max(record.issued_at, valid_from), valid_to)
        self.verifier.verify_chain(bundle, now=at, skew=0, root=self.config.owner)
        record.verify(bundle)
        return self._apply_revocation(record, self._affected(record.revoked_id))

    def _affected(self, revoked_id: str) -> list[tuple[GrantRecord, Bundle]]:
        return [
            (g, bundle)
            for g, bundle in self._active_bundles()
            if revoked_id in [c.id for c in bundle.chain]
        ]

    def _apply_revocation(
        self, record: Revocation, affected: list[tuple[GrantRecord, Bundle]]
    ) -> dict[str, Any]:
        newly = self.ledger.revoke(
            record.revoked_id,
            record=record.compact,
            data={"issuer": record.issuer, "reason": record.reason},
        )
        for g, _ in affected:
            self._destroy(g, "revoked")
        return {
            "revoked": record.revoked_id,
            "newly_revoked": newly,
            "destroyed": [g.grant_id for g, _ in affected],
        }

    def _active_bundles(self) -> Iterator[tuple[GrantRecord, Bundle]]:
        """Each active grant with its capability, parsed once (or taken from the cache)."""
        for g in self.store.grants(ACTIVE):
            if g.bundle is not None:
                yield g, self._bundle_of(g)

    def _bundle_of(self, record: GrantRecord) -> Bundle:
        """The grant's installed bundle: this process's parsed copy if it has one.

        An installed capability is never replaced, so the cached copy of an unlocked
        grant is the stored one.
        """
        cached = self._cached(record.grant_id)
        if cached is not None and cached.record.bundle == record.bundle:
            return cached.bundle
        return Bundle.parse(record.bundle or "")

    def sweep(self, *, now: float | None = None) -> list[str]:
        """Destroy the keys of grants that expired, were used up or were revoked.

        Runs periodically (and checks every grant); after each action only the grant
        that acted is checked, by _retire_if_spent.
        """
        now = time.time() if now is None else now
        self.ledger.prune_nonces(now)  # expired invocations can no longer be replayed
        destroyed = []
        for g in self.store.grants():
            if g.status != ACTIVE:  # perhaps destroyed by another instance: drop our copy
                self._forget(g.grant_id)
            reason = None
            if g.status == PENDING and now - g.created_at > PENDING_TTL:
                reason = "never received a capability"
            elif g.status == ACTIVE and g.bundle is not None:
                reason = self._spent_reason(g, self._bundle_of(g), now=now)
            if reason is not None:
                self._destroy(g, reason)
                destroyed.append(g.grant_id)
        return destroyed

    @contextlib.contextmanager
    def _in_flight(self, grant_id: str) -> Iterator[_Flight]:
        """Count requests using a grant; the last one out retires a spent grant.

        Destroying the key while another request of this process is between its
        counted use and its signature would lose that paid-for action, so retirement
        waits for the grant's requests here to finish (the periodic sweep is the
        backstop). A request whose receipt showed uses left everywhere cannot have
        spent the grant, so only the others make the last one out look.
        """
        flight = self._enter(grant_id)
        try:
            yield flight
        finally:
            if self._leave(grant_id, flight):
                self._retire_if_spent(grant_id, now=time.time())

    def _enter(self, grant_id: str) -> _Flight:
        """A request starts using the grant (see _in_flight)."""
        with self._lock:
            users = self._users.setdefault(grant_id, _Users())
            users.count += 1
        return _Flight(users)

    def _leave(self, grant_id: str, flight: _Flight) -> bool:
        """A request is done with the grant: whether the caller must _retire_if_spent."""
        users = flight.users
        with self._lock:
            users.check = users.check or not flight.settled
            users.count -= 1
            last = users.count == 0
            if last:
                del self._users[grant_id]
        return last and users.check

    def _retire_if_spent(self, grant_id: str, *, now: float) -> None:
        try:
            record = self.store.grant(grant_id)
        except NotFoundError:
            return
        if record.status != ACTIVE or record.bundle is None:
            if record.status != ACTIVE:
                self._forget(grant_id)
            return
        reason = self._spent_reason(record, self._bundle_of(record), now=now)
        if reason is not None:
            self._destroy(record, reason)

    def _spent_reason(self, record: GrantRecord, bundle: Bundle, *, now: float) -> str | None:
        if record.expires_at is not None and now >= record.expires_at:
            return "expired"
        if self.ledger.revoked([c.id for c in bundle.chain]) is not None:
            return "revoked"
        if any(
            c.limits.uses is not None and self.ledger.uses(c.id) >= c.limits.uses
            for c in bundle.chain
        ):
            return "used up"
        return None

    def _destroy(self, record: GrantRecord, reason: str) -> None:
        with self._lock:
            self._unlocked.pop(record.grant_id, None)
            with contextlib.suppress(KeyNotFoundError):  # already gone: same outcome
                self.keys.delete(record.key_uri)
            self.store.destroy(record.grant_id, reason)
        log.info("destroyed the key of grant %s (%s)", record.grant_id, reason)
        if self.event_sink is not None:
            self.event_sink(
                "key-destroyed",
                {"grant": record.grant_id, "leaf": record.leaf_id or "", "reason": reason},
            )

    def leaf_of(self, grant_id: str) -> str | None:
        """The leaf capability id of a grant this process has unlocked (no I/O)."""
        cached = self._cached(grant_id)
        return cached.bundle.leaf.id if cached is not None else None

    # --- helpers ------------------------------------------------------------------------

    def _check_service_request(self, action: str | None, request: Mapping[str, Any]) -> None:
        """A service's action refuses a malformed request before any use is counted."""
        service = self.actions.get(action) if action is not None else None
        if service is not None:
            service.check(request)

    def _check_signed_request(self, compact: str | None, typ: str, *, now: float) -> dict[str, Any]:
        """A short-lived request signed by the owner's key (key requests, pickups)."""
        claims = check_signed_request(
            compact, typ, owner=self.config.owner, audience=self.did, now=now
        )
        nonce = claims["nonce"]
        with self._lock:
            self._seen_requests = {n: t for n, t in self._seen_requests.items() if t > now}
            if nonce in self._seen_requests:
                raise VerificationError("the signed request was replayed")
            self._seen_requests[nonce] = claims["exp"] + 60
        return claims

    def close(self) -> None:
        self.store.close()
        self.ledger.close()
        self.keys.close()


def _no_route_home(home: str) -> HomeLedgerUnreachableError:
    return HomeLedgerUnreachableError(
        f"the capability is counted by its home ledger {home}, and this agent is on no "
        "event bus that leads there (start it with --event-bus)"
    )
