"""Receiving and sending services: their wire formats and the clients an owner uses.

An *address* (service URL, address id, credential) is what a peer needs to deliver to
an owner; the owner holds a separate *pickup id* for the same address, so what senders
know never lets them collect.  A sender seals the address id and credential to the
receiving service's published HPKE key (RFC 9180, base mode), with the SHA-256 of the
ciphertext as associated data: a sending service carries that sealed blob without
learning the address, and the blob cannot be moved onto another message.

Layout of a sealed address (fixed size, so its length says nothing)::

    version (1 byte, 1) | key id (8 bytes) | HPKE enc (32 bytes) | HPKE ciphertext (64 bytes)

The HPKE plaintext is the address id (16 bytes) followed by the credential (32 bytes).
See docs/relationships-wire.md ("Services") and docs/services.md.

The owner's hardware root signs an address's creation, once per address.  That request
registers a *holder key* for the address: a software signing key (Ed25519) the edge
makes for that address alone and keeps with it in the relationship vault.  Pickups,
acknowledgements and the address's retirement are signed by the holder key, so
collecting messages never touches the token (and a holder key speaks for one address
only; the key is fresh per address, so it links no two addresses either).

This module is imported by the edge side: it depends on httpx and pyhpke only, never on
the cloud agent.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import ed25519
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

from agent.protocol import sign_request
from agent.relationships.errors import RelationshipError
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.handle import software_properties
from janus_hsm.provider import KeyHandle, KeyProperties
from janus_hsm.public_keys import PublicKey, b64url_encode
from policies.errors import PolicyError
from policies.jws import parse_compact, public_key_for, verify_signature

#: The one HPKE suite receiving services publish keys for.
HPKE_SUITE: Final = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
_SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
#: HPKE ``info``: names what is sealed, so a blob sealed for another use does not open.
HPKE_INFO: Final = b"janus/receiving/address/1"
SEALED_VERSION: Final = 1
KID_BYTES: Final = 8
ENC_BYTES: Final = 32
ADDRESS_ID_BYTES: Final = 16
CREDENTIAL_BYTES: Final = 32
SEALED_BYTES: Final = 1 + KID_BYTES + ENC_BYTES + ADDRESS_ID_BYTES + CREDENTIAL_BYTES + 16

#: ``typ`` of the receiving service's signed key document (``GET /v1/receiving/key``).
SERVICE_KEY_TYP: Final = "janus-receiving-key+jws"
#: ``typ`` of the owner's signed requests to a receiving service; the ``op`` claim says
#: which route it is for, so one cannot be replayed at another.
RECEIVING_TYP: Final = "janus-receiving+jws"
#: Resource and action an owner grants a sending service (``msg/submit`` on it).
SENDING_RESOURCE: Final = "janus:sending"
SUBMIT_ACTION: Final = "msg/submit"
#: The largest ciphertext a receiving or sending service accepts by default.
DEFAULT_MAX_MESSAGE: Final = 72 * 1024
#: Most seconds a sender may ask a sending service to hold a message before forwarding.
MAX_DELAY: Final = 7 * 86400


# --- errors -----------------------------------------------------------------------------


class ServiceError(RelationshipError):
    """A receiving or sending service refused a request, or answered nonsense."""

    code = "delivery_service_error"
    status = 400


class AddressFormatError(ServiceError):
    code = "address_invalid"


class SealedAddressError(ServiceError):
    """The sealed address is malformed or does not open under the named service key."""

    code = "sealed_address_invalid"


class UnknownServiceKeyError(ServiceError):
    """The sealed address names a key this service never had, or has retired."""

    code = "service_key_unknown"


class DeliveryRefusedError(ServiceError):
    """No live address with that id and credential (the two are not told apart)."""

    code = "delivery_refused"
    status = 403


class AddressRetiredError(ServiceError):
    code = "address_retired"
    status = 410


class AddressQuotaError(ServiceError):
    """The address holds as many messages as its quota allows until they are picked up."""

    code = "address_quota_exceeded"
    status = 429


class MessageTooLargeError(ServiceError):
    code = "message_too_large"
    status = 413


class UnknownPickupIdError(ServiceError):
    code = "pickup_id_unknown"
    status = 404


class ReceivingUrlRefusedError(ServiceError):
    """The receiving service URL is not one this sending service forwards to."""

    code = "receiving_url_refused"


class UnknownSubmissionError(ServiceError):
    code = "submission_unknown"
    status = 404


class ServiceDisabledError(ServiceError):
    """The cloud agent does not run that service (start it with --receiving/--sending)."""

    code = "service_disabled"
    status = 404


class BadServiceKeyError(ServiceError):
    """The service's key document is unsigned, badly signed, expired or malformed."""

    code = "service_key_invalid"
    status = 502


class ServiceUnreachableError(ServiceError):
    code = "service_unreachable"
    status = 503


_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        AddressFormatError,
        SealedAddressError,
        UnknownServiceKeyError,
        DeliveryRefusedError,
        AddressRetiredError,
        AddressQuotaError,
        MessageTooLargeError,
        UnknownPickupIdError,
        ReceivingUrlRefusedError,
        UnknownSubmissionError,
        ServiceDisabledError,
    )
}


# --- values -------------------------------------------------------------------------------


def _b64(value: Any, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise AddressFormatError(f"{what} must be a base64url string")
    raw = b64url.decode(value, what, error=AddressFormatError)
    if size is not None and len(raw) != size:
        raise AddressFormatError(f"{what} must encode {size} bytes")
    return raw


def check_service_url(url: Any) -> str:
    """A service base URL: http(s), a host, no credentials, query or fragment."""
    if not isinstance(url, str) or len(url) > 2048:
        raise AddressFormatError("a service URL must be a string of at most 2048 characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise AddressFormatError("the service URL is not a URL") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
    ):
        raise AddressFormatError(
            "a service URL must be http(s)://host[:port][/path], without credentials, "
            "query or fragment"
        )
    return url.rstrip("/")


@dataclass(frozen=True)
class Address:
    """What a peer stores to reach an owner: a receiving service and a live address there."""

    service: str
    address_id: str
    credential: str

    def __post_init__(self) -> None:
        check_service_url(self.service)
        _b64(self.address_id, "address_id", ADDRESS_ID_BYTES)
        _b64(self.credential, "credential", CREDENTIAL_BYTES)

    def to_dict(self) -> dict[str, str]:
        return {
            "service": self.service,
            "address_id": self.address_id,
            "credential": self.credential,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Address:
        if not isinstance(d, dict) or set(d) != {"service", "address_id", "credential"}:
            raise AddressFormatError(
                "an address is an object with exactly service, address_id and credential"
            )
        return cls(
            check_service_url(d["service"]),
            d["address_id"] if isinstance(d["address_id"], str) else "",
            d["credential"] if isinstance(d["credential"], str) else "",
        )

    def __repr__(self) -> str:  # the credential is a secret: keep it out of logs
        return f"Address(service={self.service!r}, address_id={self.address_id!r})"


HOLDER_BYTES: Final = 32


class HolderKey(KeyHandle):
    """An address's holder key: a software Ed25519 key whose private bytes live in the
    held address (inside the relationship vault), not in a keystore file.

    Hand-written as a small :class:`KeyHandle` (rather than a keystore entry) because
    its home is the vault record of the address it serves: it is made, stored, used and
    forgotten with that record, and ``sign_request`` takes any key handle.
    """

    allow_extractable = True  # a software key by design: it is not the owner's identity

    def __init__(self, private: ed25519.Ed25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> HolderKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> HolderKey:
        if len(raw) != HOLDER_BYTES:
            raise AddressFormatError(f"a holder key is {HOLDER_BYTES} bytes")
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes_raw()

    @property
    def uri(self) -> str:
        return "holder:address"

    @property
    def properties(self) -> KeyProperties:
        return software_properties(Algorithm.EdDSA)

    def public_key(self) -> PublicKey:
        return self._private.public_key()

    def _sign_eddsa(self, data: bytes) -> bytes:
        return self._private.sign(data)


@dataclass(frozen=True)
class HeldAddress:
    """The holder's own view of an address: it also knows the pickup id, and (for an
    address made with one) the private holder key that signs its pickups."""

    address: Address
    pickup_id: str
    holder: str | None = None  # b64url of the holder key's 32 private bytes

    def __post_init__(self) -> None:
        if self.holder is not None:
            _b64(self.holder, "holder key", HOLDER_BYTES)

    def holder_key(self) -> HolderKey | None:
        return None if self.holder is None else HolderKey.from_bytes(b64url.decode(self.holder))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address.to_dict(), "pickup_id": self.pickup_id}
        if self.holder is not None:
            out["holder"] = self.holder
        return out

    @classmethod
    def from_dict(cls, d: Any) -> HeldAddress:
        if not isinstance(d, dict) or not {"address", "pickup_id"} <= set(d) <= {
            "address",
            "pickup_id",
            "holder",
        }:
            raise AddressFormatError(
                "a held address is {'address': …, 'pickup_id': …} and optionally 'holder'"
            )
        _b64(d["pickup_id"], "pickup_id", ADDRESS_ID_BYTES)
        holder = d.get("holder")
        if holder is not None and not isinstance(holder, str):
            raise AddressFormatError("a held address's holder key is a base64url string")
        return cls(Address.from_dict(d["address"]), d["pickup_id"], holder)

    def __repr__(self) -> str:  # the holder key and credential are secrets
        return f"HeldAddress(address={self.address!r}, holder={self.holder is not None})"


@dataclass(frozen=True)
class Delivery:
    """A message held for an address: its id (for ack), the ciphertext, when it came."""

    id: str
    ciphertext: bytes
    received_at: int


@dataclass(frozen=True)
class ServiceKey:
    """A receiving service's HPKE public key, as its signed key document lists it.

    ``use_until``: senders seal to it until then (a newer key is published before);
    ``accept_until``: the service opens addresses sealed to it until then.
    """

    service_did: str
    kid: str
    public: bytes
    use_until: int
    accept_until: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "public": b64url_encode(self.public),
            "use_until": self.use_until,
            "accept_until": self.accept_until,
        }


def key_id(public: bytes) -> bytes:
    """A key's id on the wire: a hash of the public key, so it names nothing else."""
    return hashlib.sha256(b"janus/receiving/kid" + public).digest()[:KID_BYTES]


def parse_key_document(
    compact: Any, *, did: str | None = None, now: float | None = None
) -> list[ServiceKey]:
    """The keys of a signed key document, newest first, once signature and times check.

    ``did`` pins the service's identity; without it the document must only be signed
    by the did:key it names (trust then rests on the URL, i.e. on TLS).
    """
    now = time.time() if now is None else now
    if not isinstance(compact, str):
        raise BadServiceKeyError("the service key document is not a JWS")
    try:
        parsed = parse_compact(compact, typ=SERVICE_KEY_TYP, what="service key document")
        claims = parsed.payload
        issuer = claims.get("iss")
        if did is not None and issuer != did:
            raise BadServiceKeyError("the service key is signed by another agent than expected")
        verify_signature(parsed, public_key_for(issuer, "key iss"), what="service key document")
    except PolicyError as exc:
        raise BadServiceKeyError(f"the service key document does not verify: {exc}") from None
    exp, keys = claims.get("exp"), claims.get("keys")
    if claims.get("suite") != HPKE_SUITE or not isinstance(exp, int) or not isinstance(keys, list):
        raise BadServiceKeyError("the service key document names another suite or no keys")
    if now >= exp:
        raise BadServiceKeyError("the service key document is expired")
    found = []
    for entry in keys:
        if not isinstance(entry, dict):
            raise BadServiceKeyError("a service key entry is not an object")
        try:
            public = _b64(entry.get("public"), "public key", 32)
        except AddressFormatError:
            raise BadServiceKeyError("a service key is not a 32-byte X25519 key") from None
        use_until, accept_until = entry.get("use_until"), entry.get("accept_until")
        if not isinstance(use_until, int) or not isinstance(accept_until, int):
            raise BadServiceKeyError("a service key entry needs integer use_until, accept_until")
        if entry.get("kid") != b64url_encode(key_id(public)):
            raise BadServiceKeyError("a service key's kid is not the hash of its key")
        found.append(ServiceKey(str(issuer), entry["kid"], public, use_until, accept_until))
    return sorted(found, key=lambda k: k.use_until, reverse=True)


def seal_address(service_key: ServiceKey, address: Address, ciphertext: bytes) -> bytes:
    """The address sealed to the receiving service, bound to this ciphertext."""
    recipient = KEMKey.from_pyca_cryptography_key(_x25519_public(service_key.public))
    enc, context = _SUITE.create_sender_context(recipient, info=HPKE_INFO)
    plaintext = b64url.decode(address.address_id) + b64url.decode(address.credential)
    sealed = context.seal(plaintext, aad=hashlib.sha256(ciphertext).digest())
    out = bytes([SEALED_VERSION]) + b64url.decode(service_key.kid) + enc + sealed
    assert len(out) == SEALED_BYTES
    return out


def split_sealed(sealed: bytes) -> tuple[bytes, bytes, bytes]:
    """(key id, enc, HPKE ciphertext) of a sealed address; a typed error if malformed."""
    if len(sealed) != SEALED_BYTES or sealed[0] != SEALED_VERSION:
        raise SealedAddressError(f"a sealed address is {SEALED_BYTES} bytes of version 1")
    kid = sealed[1 : 1 + KID_BYTES]
    enc = sealed[1 + KID_BYTES : 1 + KID_BYTES + ENC_BYTES]
    return kid, enc, sealed[1 + KID_BYTES + ENC_BYTES :]


def open_sealed(private: Any, enc: bytes, body: bytes, ciphertext: bytes) -> tuple[bytes, bytes]:
    """(address id, credential) from a sealed address, with the recipient's KEM key.

    ``private`` is a pyhpke KEM key; its DH may run elsewhere (see agent/cloud/receiving.py).
    """
    try:
        context = _SUITE.create_recipient_context(enc, private, info=HPKE_INFO)
        plain = context.open(body, aad=hashlib.sha256(ciphertext).digest())
    except Exception:  # pyhpke raises its own OpenError, ValueError for a bad point, …
        raise SealedAddressError(
            "the sealed address does not open under this service's key for this ciphertext"
        ) from None
    return plain[:ADDRESS_ID_BYTES], plain[ADDRESS_ID_BYTES:]


def _x25519_public(raw: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(raw)


# --- clients --------------------------------------------------------------------------------


def _answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON object a service answered, or its refusal as the matching typed error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServiceUnreachableError(
            f"the service answered {response.status_code} without a JSON object"
        )
    if response.status_code >= 300:
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        assert isinstance(error, dict)
        code, message = str(error.get("code", "error")), str(error.get("message", ""))[:300]
        cls = _BY_CODE.get(code)
        if cls is not None:
            raise cls(message)
        err = ServiceError(f"the service refused: {code}: {message}")
        err.code, err.status = code, response.status_code
        raise err
    return body


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every service client of this process.

    Building one loads the CA bundle (tens of milliseconds); httpx would build one per
    client, and a client is made per delivery.  The context is read-only once made.
    """
    return httpx.create_ssl_context()


class _Client:
    def __init__(self, url: str, *, timeout: float = 10) -> None:
        self.url = check_service_url(url)
        self._http = httpx.Client(timeout=timeout, follow_redirects=False, verify=_tls_context())

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, f"{self.url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnreachableError(
                f"{self.url} could not be reached: {type(exc).__name__}"
            ) from None
        return _answer(response)

    def close(self) -> None:
        self._http.close()


class ReceivingClient(_Client):
    """Talks to one receiving service: as the owner of addresses, or as a sender."""

    def __init__(self, url: str, *, timeout: float = 10, did: str | None = None) -> None:
        super().__init__(url, timeout=timeout)
        self.did = did  # the service's did:key when known: pins its key document
        self._keys: list[ServiceKey] = []

    def service_keys(self) -> list[ServiceKey]:
        """Every key the service accepts, newest first (verified)."""
        answer = self._call("GET", "/v1/receiving/key")
        self._keys = parse_key_document(answer.get("document"), did=self.did)
        if self.did is None and self._keys:
            # The document verified under its issuer's did:key: that is the service's
            # identity from now on, so later documents and requests are pinned to it.
            self.did = self._keys[0].service_did
        return self._keys

    def service_key(self) -> ServiceKey:
        """The key to seal to now: the newest one still in use (fetched when needed)."""
        now = time.time()
        usable = [k for k in self._keys if now < k.use_until]
        if not usable:
            usable = [k for k in self.service_keys() if now < k.use_until]
        if not usable:
            raise BadServiceKeyError("the receiving service publishes no key in use")
        return usable[0]

    def _signed(self, owner: KeyHandle, op: str, **claims: Any) -> dict[str, Any]:
        did = self.did or str(self._call("GET", "/v1/did")["did"])
        self.did = did
        return {
            "request": sign_request(
                owner, typ=RECEIVING_TYP, audience=did, now=int(time.time()), op=op, **claims
            )
        }

    def create_address(
        self,
        owner: KeyHandle,
        *,
        quota: int | None = None,
        holder: HolderKey | None = None,
        holder_did: str | None = None,
    ) -> HeldAddress:
        """A new address, created by a request of the owner's root (once per address).

        The request registers ``holder`` (a fresh one when not given): pickups, acks and
        retirement of this address are then signed by it, never by the root.  With
        ``holder_did`` the holder is a key held elsewhere (another device's token key):
        the address is then returned without a holder key.
        """
        holder = HolderKey.generate() if holder is None else holder
        claims: dict[str, Any] = {"holder": holder.did if holder_did is None else holder_did}
        if quota is not None:
            claims["quota"] = quota
        answer = self._call(
            "POST", "/v1/receiving/addresses", json=self._signed(owner, "create", **claims)
        )
        try:
            address = Address(self.url, answer["address_id"], answer["credential"])
            _b64(answer["pickup_id"], "pickup_id", ADDRESS_ID_BYTES)
        except (KeyError, TypeError):
            raise AddressFormatError("the service answered no address") from None
        if answer.get("holder") != claims["holder"]:
            # Without it every pickup would need the root: refuse rather than fall back.
            raise AddressFormatError("the service did not register the address's holder key")
        if holder_did is not None:
            return HeldAddress(address, answer["pickup_id"])
        return HeldAddress(address, answer["pickup_id"], b64url_encode(holder.private_bytes()))

    def _holder(self, signer: KeyHandle | None, held: HeldAddress) -> KeyHandle:
        """The key for a request about ``held``: ``signer``, else its holder key."""
        if signer is not None:
            return signer
        key = held.holder_key()
        if key is None:
            raise AddressFormatError(
                "this address was made without a holder key: sign with the owner's root"
            )
        return key

    def retire_address(self, signer: KeyHandle | None, held: HeldAddress) -> None:
        """Retire ``held``: signed by its holder key (``signer`` None) or the owner."""
        self._call(
            "POST",
            "/v1/receiving/retire",
            json=self._signed(self._holder(signer, held), "retire", pickup_id=held.pickup_id),
        )

    def pickup(
        self, signer: KeyHandle | None, held: HeldAddress, *, limit: int = 100
    ) -> list[Delivery]:
        """What ``held`` holds (oldest first), by a request of its holder key (``signer``
        None) or, for an address made without one, of the owner."""
        answer = self._call(
            "POST",
            "/v1/receiving/pickup",
            json=self._signed(
                self._holder(signer, held), "pickup", pickup_id=held.pickup_id, limit=limit
            ),
        )
        deliveries = answer.get("deliveries")
        if not isinstance(deliveries, list):
            raise AddressFormatError("the service answered no deliveries")
        out = []
        for d in deliveries:
            if not isinstance(d, dict) or not isinstance(d.get("id"), str):
                raise AddressFormatError("the service answered a malformed delivery")
            received = d.get("received_at")
            out.append(
                Delivery(
                    d["id"],
                    _b64(d.get("ciphertext"), "ciphertext"),
                    received if isinstance(received, int) else 0,
                )
            )
        return out

    def ack(self, signer: KeyHandle | None, held: HeldAddress, delivery_ids: list[str]) -> None:
        """Drop picked-up deliveries (signed as :meth:`pickup` is)."""
        self._call(
            "POST",
            "/v1/receiving/ack",
            json=self._signed(
                self._holder(signer, held), "ack", pickup_id=held.pickup_id, ids=list(delivery_ids)
            ),
        )

    def deliver(self, address: Address, ciphertext: bytes) -> None:
        """Deliver straight to the service (no sending service between)."""
        sealed = seal_address(self.service_key(), address, ciphertext)
        self._call("POST", "/v1/receiving/deliveries", json=delivery_body(sealed, ciphertext))


def delivery_body(sealed: bytes, ciphertext: bytes) -> dict[str, str]:
    """The body of ``POST /v1/receiving/deliveries`` (a sending service sends the same)."""
    return {"sealed": b64url_encode(sealed), "ciphertext": b64url_encode(ciphertext)}


@dataclass(frozen=True)
class SendingGrant:
    """What an owner holds to use a sending service: the grant the service acts under.

    ``api_token`` when the service requires one (``--api-token-file``).
    """

    grant_id: str
    api_token: str | None = None


class SendingClient(_Client):
    """Submits messages to one sending service under the owner's ``msg/submit`` grant."""

    def __init__(self, url: str, grant: SendingGrant | str, *, timeout: float = 10) -> None:
        super().__init__(url, timeout=timeout)
        self.grant = SendingGrant(grant) if isinstance(grant, str) else grant

    def submit(
        self, receiving_url: str, sealed_address: bytes, ciphertext: bytes, *, delay: float = 0
    ) -> str:
        """Hand a message over; returns the submission id once it is stored durably."""
        headers = (
            {"authorization": f"Bearer {self.grant.api_token}"} if self.grant.api_token else {}
        )
        answer = self._call(
            "POST",
            "/v1/sending/submissions",
            json={
                "grant_id": self.grant.grant_id,
                "request": submit_request(receiving_url, sealed_address, ciphertext, delay=delay),
            },
            headers=headers,
        )
        submission = answer.get("submission")
        if not isinstance(submission, str):
            raise ServiceUnreachableError("the sending service answered no submission id")
        return submission

    def status(self, submission_id: str) -> dict[str, Any]:
        if not isinstance(submission_id, str) or not submission_id.isascii():
            raise UnknownSubmissionError("not a submission id")
        return self._call("GET", f"/v1/sending/submissions/{submission_id}")


def submit_request(
    receiving_url: str, sealed_address: bytes, ciphertext: bytes, *, delay: float = 0
) -> dict[str, Any]:
    """The ``msg/submit`` request a sending service's capability invocation carries."""
    request: dict[str, Any] = {
        "receiving": check_service_url(receiving_url),
        "sealed": b64url_encode(sealed_address),
        "ciphertext": b64url_encode(ciphertext),
    }
    if delay:
        request["delay"] = int(delay)
    return request
