"""The receiving service (``janus cloud serve --receiving``): addresses that hold ciphertext.

The owner creates addresses here with requests signed by its hardware root; peers
deliver to them knowing only an address id and its credential, sealed to this service's
HPKE key (agent/relationships/delivery.py).  Nothing about a sender is taken or kept: a
delivery row is the address, the ciphertext and the second it came.  The owner picks
deliveries up with the address's pickup id (which senders never see) and acknowledges
them, which deletes them.  Those requests are signed by the address's *holder key*, a
software key the creation request registered (so collecting never needs the token);
a holder key speaks for its own address only.  The owner's root may sign them too.

The HPKE keys rotate: a new one is made every ``rotation`` seconds, signed into the key
document with the agent's identity key, and an old one still opens sealed addresses for
``overlap`` seconds more, so messages sealed just before a rotation (or held by a
sending service for a while) still arrive.  Private keys live in the agent's encrypted
keystore; pyhpke only calls ``exchange`` on them, which the key handle performs.

Defaults (docs/services.md): rotation 7 days, overlap 7 days, messages up to 72 KiB,
1,000 held messages per address (an owner may ask for up to 10,000), retention 14 days.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyhpke.kem_key_interface import KEMKeyInterface
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.cloud.service import CloudAgent
from agent.errors import BadRequestError
from agent.http_service import Endpoint, read_object
from agent.protocol import check_signed_request
from agent.relationships.delivery import (
    ADDRESS_ID_BYTES,
    CREDENTIAL_BYTES,
    DEFAULT_MAX_MESSAGE,
    HPKE_SUITE,
    RECEIVING_TYP,
    SEALED_BYTES,
    SERVICE_KEY_TYP,
    AddressQuotaError,
    AddressRetiredError,
    DeliveryRefusedError,
    MessageTooLargeError,
    SealedAddressError,
    UnknownPickupIdError,
    UnknownServiceKeyError,
    key_id,
    open_sealed,
    split_sealed,
)
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import algorithm_of, b64url_encode, raw_public_bytes
from policies.errors import PolicyError, VerificationError
from policies.jws import public_key_for, sign_compact

log = logging.getLogger(__name__)

DAY = 86400
OWNER_BODY = 16 * 1024
SWEEP_EVERY = 60.0


@dataclass(frozen=True)
class ReceivingConfig:
    rotation: int = 7 * DAY
    overlap: int = 7 * DAY
    max_message: int = DEFAULT_MAX_MESSAGE
    default_quota: int = 1000
    max_quota: int = 10_000
    retention: int = 14 * DAY


class _HandleRaw:
    """What pyhpke calls on a private key (``exchange``, ``public_key``), by the key handle."""

    def __init__(self, handle: KeyHandle) -> None:
        self._handle = handle

    def exchange(self, peer: Any) -> bytes:
        return self._handle.exchange(peer)

    def public_key(self) -> Any:
        return self._handle.public_key()


class _HandleKEMKey(KEMKeyInterface):
    def __init__(self, handle: KeyHandle) -> None:
        super().__init__(_HandleRaw(handle))


@dataclass
class _Key:
    kid: bytes
    uri: str  # in the agent's keystore
    public: bytes
    use_until: int
    accept_until: int
    kem: KEMKeyInterface | None = None  # loaded on first use


_SCHEMA = """
CREATE TABLE IF NOT EXISTS hpke_keys (
    kid BLOB PRIMARY KEY,
    key_uri TEXT NOT NULL,
    public BLOB NOT NULL,
    use_until INTEGER NOT NULL,
    accept_until INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS addresses (
    address_id BLOB PRIMARY KEY,
    pickup_id BLOB NOT NULL UNIQUE,
    credential_hash BLOB NOT NULL,
    quota INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    address_id BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_by_address ON deliveries (address_id, received_at);
CREATE TABLE IF NOT EXISTS contact_uses (
    cap_id TEXT PRIMARY KEY,
    uses INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS contact_invocations (
    nonce TEXT PRIMARY KEY,
    expires INTEGER NOT NULL
);
"""


def _hash_credential(credential: bytes) -> bytes:
    return hashlib.sha256(b"janus/receiving/credential" + credential).digest()


class ReceivingService:
    """Thread-safe; one per cloud agent process (it owns ``receiving.db``)."""

    def __init__(self, agent: CloudAgent, config: ReceivingConfig | None = None) -> None:
        self.agent = agent
        self.config = config or ReceivingConfig()
        self.path = agent.config.state_dir / "receiving.db"
        self._db = _connect(self.path)
        self._lock = threading.Lock()
        self._keys: dict[bytes, _Key] = {}
        self._document: tuple[int, str] | None = None  # (valid until, compact JWS)
        self._seen: dict[str, float] = {}
        self._last_sweep = 0.0
        for kid, uri, public, use_until, accept_until in self._db.execute(
            "SELECT kid, key_uri, public, use_until, accept_until FROM hpke_keys"
        ):
            self._keys[kid] = _Key(kid, uri, public, use_until, accept_until)

    # --- keys ---------------------------------------------------------------------------

    def key_document(self, *, now: float | None = None) -> str:
        """The signed list of keys senders may seal to (made anew after each rotation)."""
        now = time.time() if now is None else now
        with self._lock:
            self._rotate(now)
            if self._document is not None and now < self._document[0]:
                return self._document[1]
            newest = max(self._keys.values(), key=lambda k: k.use_until)
            live = sorted(
                (k for k in self._keys.values() if now < k.accept_until),
                key=lambda k: k.use_until,
                reverse=True,
            )
            payload = {
                "iss": self.agent.did,
                "iat": int(now),
                "exp": newest.use_until,
                "suite": HPKE_SUITE,
                "keys": [
                    {
                        "kid": b64url_encode(k.kid),
                        "public": b64url_encode(k.public),
                        "use_until": k.use_until,
                        "accept_until": k.accept_until,
                    }
                    for k in live
                ],
            }
            compact = sign_compact(self.agent.identity, {"typ": SERVICE_KEY_TYP}, payload)
            self._document = (newest.use_until, compact)
            return compact

    def _rotate(self, now: float) -> None:
        """Make a new key when none is in use any more; forget keys past their overlap."""
        for kid, key in list(self._keys.items()):
            if now >= key.accept_until:
                del self._keys[kid]
                self._db.execute("DELETE FROM hpke_keys WHERE kid = ?", (kid,))
                self._db.commit()
                with contextlib.suppress(KeyNotFoundError):  # already gone: same outcome
                    self.agent.keys.delete(key.uri)
                self._document = None
        if any(now < k.use_until for k in self._keys.values()):
            return
        # Named at random: the kid is known only once the key exists; the row keeps its URI.
        uri = f"soft:object=receiving-hpke-{b64url_encode(os.urandom(9))}"
        handle = self.agent.keys.generate(uri, Algorithm.X25519)
        public = raw_public_bytes(handle.public_key())
        kid = key_id(public)
        use_until = int(now) + self.config.rotation
        key = _Key(kid, uri, public, use_until, use_until + self.config.overlap, _kem(handle))
        self._db.execute(
            "INSERT INTO hpke_keys (kid, key_uri, public, use_until, accept_until)"
            " VALUES (?, ?, ?, ?, ?)",
            (kid, uri, public, key.use_until, key.accept_until),
        )
        self._db.commit()
        self._keys[kid] = key
        self._document = None
        log.info("new receiving key %s in use until %d", b64url_encode(kid), use_until)

    def _kem_for(self, kid: bytes, now: float) -> KEMKeyInterface:
        with self._lock:
            key = self._keys.get(kid)
            if key is None or now >= key.accept_until:
                raise UnknownServiceKeyError(
                    "the address is sealed to a key this service does not hold (another "
                    "service's, or one retired): fetch the service's key again"
                )
            if key.kem is None:
                key.kem = _kem(self.agent.keys.find(key.uri))
            return key.kem

    # --- owner requests --------------------------------------------------------------------

    def _signed_request(
        self, compact: Any, op: str, now: float, *, owner_only: bool
    ) -> dict[str, Any]:
        """The claims of a signed request for ``op`` once signature, addressee and times
        check; ``owner_only``: signed by the owner, else by any key (the caller then
        checks it against the address's holder key, see :meth:`_authorize`)."""
        if not isinstance(compact, str):
            raise BadRequestError("body must be {'request': <owner-signed JWS>}")
        claims = check_signed_request(
            compact,
            RECEIVING_TYP,
            owner=self.agent.config.owner if owner_only else None,
            audience=self.agent.did,
            now=now,
        )
        if claims.get("op") != op:
            raise VerificationError(f"the signed request is not for '{op}'")
        return claims

    def _remember(self, claims: dict[str, Any], now: float) -> None:
        """Refuse a replayed request; remember this one's nonce.  Under ``_lock``, and
        only for authorised requests (strangers cannot fill the set)."""
        nonce = claims["nonce"]
        if len(self._seen) > 10_000 or nonce in self._seen:
            self._seen = {n: t for n, t in self._seen.items() if t > now}
        if nonce in self._seen:
            raise VerificationError("the signed request was replayed")
        self._seen[nonce] = claims["exp"] + 60

    def _owner_request(self, compact: Any, op: str, now: float) -> dict[str, Any]:
        claims = self._signed_request(compact, op, now, owner_only=True)
        with self._lock:
            self._remember(claims, now)
        return claims

    def _holder_request(
        self, compact: Any, op: str, now: float
    ) -> tuple[dict[str, Any], bytes, int | None]:
        """A request about one address (pickup, ack, retire), signed by that address's
        holder key or by the owner: its claims, the address id, when it was retired.
        Under ``_lock``.

        A request signed by any other key is refused alike whether or not its pickup id
        exists, so a stranger cannot probe pickup ids.
        """
        claims = self._signed_request(compact, op, now, owner_only=False)
        issuer = claims.get("iss")
        if issuer == self.agent.config.owner:
            address_id, retired, _ = self._address_of(claims.get("pickup_id"))
        else:
            try:
                address_id, retired, holder = self._address_of(claims.get("pickup_id"))
            except UnknownPickupIdError:
                holder = None
            if holder is None or holder != issuer:
                raise VerificationError(
                    "the request is not signed by this address's holder key or the owner"
                )
        self._remember(claims, now)
        return claims, address_id, retired

    def create_address(self, compact: Any, *, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        claims = self._owner_request(compact, "create", now)
        contact_root = claims.get("contact_root")
        if contact_root is not None:  # first contact here needs that directory's capability
            public_key_for(contact_root, "contact_root")
        holder = claims.get("holder")
        if holder is not None:
            _check_holder(holder)
        quota = claims.get("quota", self.config.default_quota)
        if (
            not isinstance(quota, int)
            or isinstance(quota, bool)
            or not 0 < quota <= self.config.max_quota
        ):
            raise BadRequestError(f"quota must be an integer from 1 to {self.config.max_quota}")
        address_id, pickup_id = os.urandom(ADDRESS_ID_BYTES), os.urandom(ADDRESS_ID_BYTES)
        credential = os.urandom(CREDENTIAL_BYTES)
        with self._lock:
            self._db.execute(
                "INSERT INTO addresses (address_id, pickup_id, credential_hash, quota, created_at,"
                " contact_root, holder) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    address_id,
                    pickup_id,
                    _hash_credential(credential),
                    quota,
                    int(now),
                    contact_root,
                    holder,
                ),
            )
            self._db.commit()
        return {
            "address_id": b64url_encode(address_id),
            "pickup_id": b64url_encode(pickup_id),
            "credential": b64url_encode(credential),
            "quota": quota,
            "max_message": self.config.max_message,
            "retention": self.config.retention,
            "contact_root": contact_root,
            "holder": holder,
        }

    def _address_of(self, pickup: Any) -> tuple[bytes, int | None, str | None]:
        """(address id, retired at, holder key's did) of the address with that pickup id."""
        if not isinstance(pickup, str):
            raise BadRequestError("the signed request needs a 'pickup_id'")
        pickup_id = b64url.decode(pickup, "pickup_id", error=BadRequestError)
        row = self._db.execute(
            "SELECT address_id, retired_at, holder FROM addresses WHERE pickup_id = ?",
            (pickup_id,),
        ).fetchone()
        if row is None:
            raise UnknownPickupIdError("no address here has that pickup id")
        return row[0], row[1], row[2]

    def retire(self, compact: Any, *, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        with self._lock:
            _, address_id, retired = self._holder_request(compact, "retire", now)
            if retired is None:
                self._db.execute(
                    "UPDATE addresses SET retired_at = ? WHERE address_id = ?",
                    (int(now), address_id),
                )
                self._db.commit()
            held = self._count(address_id)
        return {"retired": True, "held": held}

    def pickup(self, compact: Any, *, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        self._maybe_sweep(now)
        with self._lock:
            claims, address_id, _ = self._holder_request(compact, "pickup", now)
            limit = claims.get("limit", 100)
            if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 1000:
                raise BadRequestError("limit must be an integer from 1 to 1000")
            rows = self._db.execute(
                "SELECT delivery_id, ciphertext, received_at FROM deliveries"
                " WHERE address_id = ? ORDER BY received_at, rowid LIMIT ?",
                (address_id, limit),
            ).fetchall()
            held = self._count(address_id)
        return {
            "deliveries": [
                {"id": d, "ciphertext": b64url_encode(c), "received_at": r} for d, c, r in rows
            ],
            "remaining": held - len(rows),
        }

    def ack(self, compact: Any, *, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        with self._lock:
            claims, address_id, _ = self._holder_request(compact, "ack", now)
            ids = claims.get("ids")
            if (
                not isinstance(ids, list)
                or len(ids) > 1000
                or not all(isinstance(i, str) and len(i) <= 64 for i in ids)
            ):
                raise BadRequestError("'ids' must be a list of at most 1000 delivery ids")
            removed = 0
            for delivery_id in ids:
                removed += self._db.execute(
                    "DELETE FROM deliveries WHERE delivery_id = ? AND address_id = ?",
                    (delivery_id, address_id),
                ).rowcount
            self._db.commit()
        return {"acknowledged": removed}

    def _count(self, address_id: bytes) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE address_id = ?", (address_id,)
        ).fetchone()
        return int(row[0])

    # --- deliveries -------------------------------------------------------------------------

    def deliver(
        self,
        sealed: bytes,
        ciphertext: bytes,
        *,
        contact: object = None,
        now: float | None = None,
    ) -> None:
        """Hold ``ciphertext`` for the address sealed in ``sealed``; refuse otherwise.

        An address made with ``contact_root`` (an intro address published at a
        directory) takes a delivery only with ``contact``: a capability chain rooted at
        that directory and its holder's invocation for this ciphertext, each invocation
        once, within the capability's uses (agent/directory/contact.py).

        An unknown address and a wrong credential are the same refusal, so a sender
        cannot probe which address ids exist; the credential is compared in constant
        time (as hashes, which is all the database keeps).
        """
        now = time.time() if now is None else now
        if len(ciphertext) > self.config.max_message:
            raise MessageTooLargeError(f"a message here is at most {self.config.max_message} bytes")
        if not ciphertext:
            raise BadRequestError("the ciphertext is empty")
        kid, enc, body = split_sealed(sealed)
        kem = self._kem_for(kid, now)
        address_id, credential = open_sealed(kem, enc, body, ciphertext)
        given = _hash_credential(credential)
        self._maybe_sweep(now)
        with self._lock:
            row = self._db.execute(
                "SELECT credential_hash, quota, retired_at, contact_root FROM addresses"
                " WHERE address_id = ?",
                (address_id,),
            ).fetchone()
            stored = row[0] if row is not None else _hash_credential(b"")
            if not hmac.compare_digest(stored, given) or row is None:
                raise DeliveryRefusedError("no live address with that id and credential here")
            if row[2] is not None:
                raise AddressRetiredError(
                    "this address is retired: the recipient no longer receives here"
                )
            if self._count(address_id) >= row[1]:
                raise AddressQuotaError(
                    "the address holds as many messages as its quota allows; try again later"
                )
            if row[3] is not None:
                self._spend_contact(contact, row[3], address_id, ciphertext, now)
            self._db.execute(
                "INSERT INTO deliveries (delivery_id, address_id, ciphertext, received_at)"
                " VALUES (?, ?, ?, ?)",
                (b64url_encode(os.urandom(12)), address_id, ciphertext, int(now)),
            )
            self._db.commit()

    def _spend_contact(
        self, contact: object, root: str, address_id: bytes, ciphertext: bytes, now: float
    ) -> None:
        """Check a first contact and count it (committed with the delivery); under _lock."""
        from agent.directory.contact import check_contact
        from agent.directory.errors import ContactError, ContactReplayedError

        cap_id, limit, nonce, expires = check_contact(
            contact,
            root=root,
            address_id=b64url_encode(address_id),
            ciphertext=ciphertext,
            service_did=self.agent.did,
            now=now,
        )
        seen = self._db.execute(
            "SELECT 1 FROM contact_invocations WHERE nonce = ?", (nonce,)
        ).fetchone()
        if seen is not None:
            raise ContactReplayedError("this first-contact message was delivered before")
        used = self._db.execute(
            "SELECT uses FROM contact_uses WHERE cap_id = ?", (cap_id,)
        ).fetchone()
        count = 0 if used is None else int(used[0])
        if limit is not None and count >= limit:
            raise ContactError("the contact capability is used up")
        self._db.execute(
            "INSERT INTO contact_invocations (nonce, expires) VALUES (?, ?)", (nonce, expires + 120)
        )
        self._db.execute(
            "INSERT INTO contact_uses (cap_id, uses) VALUES (?, 1)"
            " ON CONFLICT (cap_id) DO UPDATE SET uses = uses + 1",
            (cap_id,),
        )

    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_EVERY:
            return
        self._last_sweep = now
        self.sweep(now=now)

    def sweep(self, *, now: float | None = None) -> dict[str, int]:
        """Drop deliveries past retention, and retired addresses past it with nothing held."""
        now = time.time() if now is None else now
        cutoff = int(now) - self.config.retention
        with self._lock:
            expired = self._db.execute(
                "DELETE FROM deliveries WHERE received_at < ?", (cutoff,)
            ).rowcount
            forgotten = self._db.execute(
                "DELETE FROM addresses WHERE retired_at IS NOT NULL AND retired_at < ? AND "
                "NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.address_id = addresses.address_id)",
                (cutoff,),
            ).rowcount
            self._db.execute("DELETE FROM contact_invocations WHERE expires < ?", (int(now),))
            self._db.commit()
            self._rotate(now)
        return {"expired": expired, "forgotten": forgotten}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _check_holder(holder: Any) -> None:
    """A holder key is a did:key of a signing key (Ed25519 or P-256)."""
    try:
        algorithm = algorithm_of(public_key_for(holder, "holder"))
    except PolicyError as exc:
        raise BadRequestError(f"the holder key is not a did:key: {exc}") from None
    if algorithm not in (Algorithm.EdDSA, Algorithm.ES256):
        raise BadRequestError("a holder key is an Ed25519 or P-256 did:key")


def _kem(handle: KeyHandle) -> KEMKeyInterface:
    unlock = getattr(handle, "unlock", None)
    if callable(unlock):  # a software key: decrypt it once, not per delivery
        unlock()
    return _HandleKEMKey(handle)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    os.chmod(path, 0o600)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a delivery answered 202 survives a power cut
    db.executescript(_SCHEMA)
    columns = {r[1] for r in db.execute("PRAGMA table_info(addresses)")}
    if "contact_root" not in columns:  # a database from before contact capabilities
        db.execute("ALTER TABLE addresses ADD COLUMN contact_root TEXT")
        db.commit()
    if "holder" not in columns:  # a database from before holder keys
        db.execute("ALTER TABLE addresses ADD COLUMN holder TEXT")
        db.commit()
    return db


# --- HTTP -------------------------------------------------------------------------------------


def b64_member(body: dict[str, Any], name: str) -> bytes:
    value = body.get(name)
    if not isinstance(value, str):
        raise BadRequestError(f"'{name}' must be a base64url string")
    return b64url.decode(value, name, error=BadRequestError)


def delivery_body_limit(max_message: int) -> int:
    """The largest deliver body: both members in base64url, and room for the JSON around."""
    return (max_message + SEALED_BYTES) * 4 // 3 + 1024


def receiving_routes(
    service: ReceivingService,
    endpoint: Endpoint,
    threaded: Callable[..., Any],
    count: Callable[[str], None],
) -> list[Route]:
    """The service's routes, wrapped by the app's ``endpoint`` (errors, metrics)."""

    def too_large_owner() -> Exception:
        return BadRequestError(f"request body larger than {OWNER_BODY} bytes")

    def too_large_delivery() -> Exception:
        return MessageTooLargeError(f"a message here is at most {service.config.max_message} bytes")

    async def key(request: Request) -> dict[str, Any]:
        document = await threaded(service.key_document)
        return {"did": service.agent.did, "document": document}

    def owner_route(fn: Callable[..., dict[str, Any]], status: int = 200) -> Any:
        async def handler(request: Request) -> JSONResponse:
            body = await read_object(request, OWNER_BODY, too_large_owner)
            if set(body) != {"request"}:
                raise BadRequestError("body must be {'request': <owner-signed JWS>}")
            result = await threaded(fn, body["request"])
            return JSONResponse(result, status_code=status)

        return handler

    async def deliver(request: Request) -> JSONResponse:
        limit = delivery_body_limit(service.config.max_message)
        body = await read_object(request, limit, too_large_delivery)
        if not {"sealed", "ciphertext"} <= set(body) <= {"sealed", "ciphertext", "contact"}:
            raise BadRequestError(
                "body must be {'sealed': base64url, 'ciphertext': base64url} and, at an intro"
                " address that requires it, 'contact'"
            )
        sealed, ciphertext = b64_member(body, "sealed"), b64_member(body, "ciphertext")
        if len(sealed) != SEALED_BYTES:
            raise SealedAddressError(f"a sealed address is {SEALED_BYTES} bytes")
        await threaded(service.deliver, sealed, ciphertext, contact=body.get("contact"))
        count("delivered")
        return JSONResponse({"status": "accepted"}, status_code=202)

    return [
        Route("/v1/receiving/key", endpoint("receiving_key", key), methods=["GET"]),
        Route(
            "/v1/receiving/addresses",
            endpoint("receiving_create", owner_route(service.create_address, 201)),
            methods=["POST"],
        ),
        Route(
            "/v1/receiving/retire",
            endpoint("receiving_retire", owner_route(service.retire)),
            methods=["POST"],
        ),
        Route(
            "/v1/receiving/pickup",
            endpoint("receiving_pickup", owner_route(service.pickup)),
            methods=["POST"],
        ),
        Route(
            "/v1/receiving/ack",
            endpoint("receiving_ack", owner_route(service.ack)),
            methods=["POST"],
        ),
        Route(
            "/v1/receiving/deliveries",
            endpoint("receiving_deliver", deliver),
            methods=["POST"],
        ),
    ]
