"""Signed events: what instances tell each other over the bus, which carries them untrusted.

An event is a compact JWS (``typ`` ``janus-event+jws``) signed by the identity key of
the instance that published it, with payload ``{id, kind, iss, iat, body}``.  The
random ``id`` is the de-duplication key of both backends (the outbox's unique column,
NATS's ``Nats-Msg-Id``), so a publish retried after a lost answer is stored once, and a
federated copy of an event keeps its id and is stored once too.

Parsing checks the format and the publishing instance's signature only.  Whether an
event may take effect (a revocation signed by an issuer in the chain it revokes) is
for whoever applies it to decide: the signature of an instance proves who relayed the
event, not that the relaying instance had the authority it claims.

Hand-written rather than with ``policies.jws.parse_compact``: a revocation event
carries the bundle it revokes a link of, which may be larger than the size bound of a
capability, so events have their own bound (``MAX_BODY`` for the body); the rules for
the header, base64url, JSON and the signature are those of every Janus JWS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.bus.errors import EventFormatError
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from janus_hsm.strictjson import canonical_json, loads_object
from policies.errors import PolicyError
from policies.jws import ALLOWED_ALGS, ParsedJws, public_key_for, verify_signature
from policies.revocation import Revocation

EVENT_TYP: Final = "janus-event+jws"
KINDS: Final = frozenset({"revocation", "key-destroyed", "use"})
#: The largest body (canonical JSON, bytes): a revocation carries a whole bundle.
MAX_BODY: Final = 64 * 1024
#: The largest compact event: the body base64url-encoded, plus header and signature.
MAX_COMPACT: Final = MAX_BODY * 4 // 3 + 2048
_ID_BYTES: Final = 16
_ID_LENGTH: Final = 22  # base64url of 16 bytes
_MAX_TEXT: Final = 256  # reasons, actions
_MAX_NAME: Final = 1024  # capability and grant ids


@dataclass(frozen=True)
class Event:
    """One signed event, as parsed (or as just signed): the fields and the JWS text.

    ``body`` is the kind's body, checked against its shape; ``compact`` is what travels.
    """

    id: str
    kind: str
    issuer: str
    issued_at: int
    body: Mapping[str, Any]
    compact: str

    @property
    def subject(self) -> str:
        """The NATS subject the event is published on; federation sources one kind."""
        return f"janus.events.{self.kind}"

    @classmethod
    def parse(cls, compact: str | bytes) -> Event:
        """Read an event from the bus: format, then the signature by its ``iss``.

        EventFormatError for anything off (size, base64url, JSON, header, payload
        members, body shape, signature), with a message that names the problem.
        """
        if isinstance(compact, bytes):
            try:
                compact = compact.decode("ascii")
            except UnicodeDecodeError:
                raise EventFormatError("event is not ASCII text (a compact JWS)") from None
        if not isinstance(compact, str):
            raise EventFormatError("event must be a compact JWS string")
        if len(compact) > MAX_COMPACT:
            raise EventFormatError(f"event is larger than {MAX_COMPACT} bytes")
        parts = compact.split(".")
        if len(parts) != 3:
            raise EventFormatError(f"event is not a compact JWS (3 parts, got {len(parts)})")
        header = _json_part(parts[0], "event header")
        payload = _json_part(parts[1], "event payload")
        signature = b64url.decode(parts[2], "event signature", error=EventFormatError)
        if set(header) != {"alg", "typ", "kid"}:
            raise EventFormatError("event header must have exactly alg, typ and kid")
        if header["typ"] != EVENT_TYP:
            raise EventFormatError(f"event has typ {header['typ']!r}, expected {EVENT_TYP!r}")
        if header["alg"] not in ALLOWED_ALGS:
            raise EventFormatError(
                f"event uses alg {header['alg']!r}; only {', '.join(sorted(ALLOWED_ALGS))}"
            )
        if set(payload) != {"id", "kind", "iss", "iat", "body"}:
            raise EventFormatError("event payload must have exactly id, kind, iss, iat, body")
        event_id, kind, issuer, issued_at, body = (
            payload["id"],
            payload["kind"],
            payload["iss"],
            payload["iat"],
            payload["body"],
        )
        _check_id(event_id)
        if not isinstance(issuer, str) or not issuer.startswith("did:key:"):
            raise EventFormatError("event iss must be a did:key")
        if header["kid"] != _kid(issuer):
            raise EventFormatError("event kid does not name the key of its iss")
        if type(issued_at) is not int or issued_at < 0:
            raise EventFormatError("event iat must be integer epoch seconds")
        check_body(kind, body)
        parsed = ParsedJws(
            compact, header, payload, (parts[0] + "." + parts[1]).encode("ascii"), signature
        )
        try:
            verify_signature(parsed, public_key_for(issuer, "event iss"), what="event")
        except PolicyError as exc:
            raise EventFormatError(str(exc)) from None
        return cls(event_id, kind, issuer, issued_at, body, compact)


def sign_event(key: KeyHandle, kind: str, body: Mapping[str, Any], *, now: int) -> Event:
    """Sign a new event of ``kind`` with a fresh id; EventFormatError if ``body`` does not
    have the kind's shape (what ``Event.parse`` would refuse is never published)."""
    body = dict(body)
    check_body(kind, body)
    alg = key.algorithm.value
    if alg not in ALLOWED_ALGS:
        raise EventFormatError(f"{alg} keys cannot sign events")
    event_id = b64url.random_id(_ID_BYTES)
    payload = {"id": event_id, "kind": kind, "iss": key.did, "iat": now, "body": body}
    header = {"alg": alg, "typ": EVENT_TYP, "kid": _kid(key.did)}
    signing_input = (
        b64url.encode(canonical_json(header)) + "." + b64url.encode(canonical_json(payload))
    )
    signature = key.sign(signing_input.encode("ascii"))
    compact = signing_input + "." + b64url.encode(signature)
    if len(compact) > MAX_COMPACT:
        raise EventFormatError(f"the event is larger than {MAX_COMPACT} bytes")
    return Event(event_id, kind, key.did, now, body, compact)


def check_body(kind: object, body: object) -> None:
    """Refuse a body that does not have its kind's shape (EventFormatError)."""
    if kind not in KINDS:
        raise EventFormatError(f"event kind {kind!r} is not one of {', '.join(sorted(KINDS))}")
    if not isinstance(body, dict):
        raise EventFormatError("event body must be a JSON object")
    if len(canonical_json(body)) > MAX_BODY:
        raise EventFormatError(f"event body is larger than {MAX_BODY} bytes")
    if kind == "revocation":
        _members(body, kind, {"record", "bundle"})
        if not isinstance(body["record"], str):
            raise EventFormatError("revocation event record must be a janus-rev+jws string")
        if not isinstance(body["bundle"], dict):
            raise EventFormatError("revocation event bundle must be a JSON object")
        try:  # the record's format only: whether it may revoke is the applier's check
            Revocation.parse(body["record"])
        except PolicyError as exc:
            raise EventFormatError(f"revocation event record: {exc}") from None
    elif kind == "key-destroyed":
        _members(body, kind, {"grant", "leaf", "reason"})
        _text(body, kind, "grant", _MAX_NAME)
        _text(body, kind, "leaf", _MAX_NAME)
        _text(body, kind, "reason", _MAX_TEXT)
    else:  # "use"
        _members(body, kind, {"cap", "uses", "action"})
        _text(body, kind, "cap", _MAX_NAME)
        _text(body, kind, "action", _MAX_TEXT)
        uses = body["uses"]
        if not isinstance(uses, dict) or not all(
            isinstance(cap, str) and len(cap) <= _MAX_NAME and type(n) is int and n >= 0
            for cap, n in uses.items()
        ):
            raise EventFormatError("use event uses must map capability ids to counts >= 0")


def _json_part(part: str, what: str) -> dict[str, Any]:
    return loads_object(
        b64url.decode(part, what, error=EventFormatError), what, error=EventFormatError
    )


def _check_id(event_id: object) -> None:
    if not isinstance(event_id, str) or len(event_id) != _ID_LENGTH:
        raise EventFormatError(f"event id must be {_ID_LENGTH} base64url characters")
    b64url.decode(event_id, "event id", error=EventFormatError)


def _kid(did: str) -> str:
    return f"{did}#{did.removeprefix('did:key:')}"


def _members(body: dict[str, Any], kind: str, names: set[str]) -> None:
    if set(body) != names:
        raise EventFormatError(f"{kind} event body must have exactly {', '.join(sorted(names))}")


def _text(body: dict[str, Any], kind: str, name: str, limit: int) -> None:
    value = body[name]
    if not isinstance(value, str) or len(value) > limit:
        raise EventFormatError(f"{kind} event {name} must be a string of at most {limit} chars")
