"""Prekey bundles (what a peer needs to start a relationship) and the prekeys' private halves.

The token can sign and do one ECDH, nothing else, so Signal's XEdDSA signature of the
prekeys by the DH identity key is impossible.  Instead the owner's *root* (signing key,
did:key) signs a *binding*: a compact JWS naming the agreement key (the DH identity) and
the SHA-256 of the prekeys.  The same JWS, without the prekeys, is what an initiator
shows (encrypted) to prove which root its agreement key belongs to.

Prekeys are software keys in files of their own (0600, written atomically) in one
directory.  A one-time prekey's file is deleted, durably, before its secret is used, so
a crash can never let it serve twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import mlkem

from agent.relationships import suite as suites
from agent.relationships.errors import (
    BadPrekeyBundleError,
    PrekeyConsumedError,
    RelationshipError,
    UnknownPrekeyError,
)
from agent.relationships.suite import PrivateKey, Suite
from janus_hsm import b64url
from janus_hsm.atomic_file import fsync_directory, replace_file
from janus_hsm.file_lock import locked_file
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import PublicKey, PublicKeyFormatError, from_jwk, to_jwk
from janus_hsm.strictjson import canonical_json
from policies.errors import PolicyError
from policies.jws import parse_compact, public_key_for, sign_compact, verify_signature

BINDING_TYP = "janus-rel-binding+jws"
#: ``binding_form`` (and ``"form"`` in the dict form) of a bundle from a directory claim.
DIRECTORY_BATCH_FORM = "directory-batch"
PQ_PUBLIC_LEN = 1184
PQ_SEED_LEN = 64
IDENTITY_TTL = 365 * 86400
CLOCK_SKEW = 300

_ID = re.compile(r"[A-Za-z0-9_-]{16}")
_KINDS = ("spk", "pq", "opk", "pqopk")


def new_prekey_id() -> str:
    """16 random base64url characters: unique per prekey, linking nothing beyond it."""
    return secrets.token_urlsafe(12)


def check_prekey_id(value: object) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise UnknownPrekeyError("a prekey id is malformed")
    return value


@dataclass(frozen=True)
class PeerIdentity:
    """Who is on the other side: a root did:key and the agreement key it bound."""

    root_did: str
    suite: Suite
    identity_jwk: dict[str, str]
    identity_public: suites.DHPublicKey
    binding: str


def sign_binding(
    root: KeyHandle,
    agreement: KeyHandle,
    *,
    prekeys_digest: str | None = None,
    ttl: int = IDENTITY_TTL,
    now: int | None = None,
) -> str:
    """The root's compact JWS over its agreement key (and a digest of prekeys, if any)."""
    issued = int(time.time()) if now is None else now
    payload: dict[str, Any] = {
        "iss": root.did,
        "suite": str(suites.suite_for_key(agreement)),
        "idk": dict(agreement.jwk()),
        "iat": issued,
        "exp": issued + ttl,
    }
    if prekeys_digest is not None:
        payload["prekeys"] = prekeys_digest
    return sign_compact(root, {"typ": BINDING_TYP}, payload)


def verify_binding(
    binding: object, *, now: int | None = None
) -> tuple[PeerIdentity, dict[str, Any]]:
    """The identity a binding proves, and its payload; any defect is BadPrekeyBundleError."""
    if not isinstance(binding, str):
        raise BadPrekeyBundleError("the binding must be a compact JWS string")
    try:
        parsed = parse_compact(binding, typ=BINDING_TYP, what="the binding")
        payload = parsed.payload
        root_did = payload.get("iss")
        public = public_key_for(root_did, "the binding's issuer")
        if parsed.header.get("kid") != f"{root_did}#{cast(str, root_did).removeprefix('did:key:')}":
            raise BadPrekeyBundleError("the binding's kid is not its issuer's key")
        verify_signature(parsed, public, what="the binding")
    except PolicyError as exc:
        raise BadPrekeyBundleError(str(exc)) from None
    suite = _field(payload, "suite", str)
    try:
        parsed_suite = Suite(suite)
    except ValueError:
        raise BadPrekeyBundleError("the binding names an unknown suite") from None
    idk = payload.get("idk")
    if not isinstance(idk, dict) or not all(isinstance(v, str) for v in idk.values()):
        raise BadPrekeyBundleError("the binding's agreement key is not a JWK")
    identity = _dh_public(parsed_suite, idk, "the binding's agreement key")
    expires = _field(payload, "exp", int)
    issued = _field(payload, "iat", int)
    current = int(time.time()) if now is None else now
    if expires < current:
        raise BadPrekeyBundleError("the binding has expired")
    if issued > current + CLOCK_SKEW:
        raise BadPrekeyBundleError("the binding was issued in the future")
    return PeerIdentity(str(root_did), parsed_suite, dict(idk), identity, binding), payload


def _field(payload: Mapping[str, Any], name: str, kind: type) -> Any:
    value = payload.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadPrekeyBundleError(f"the binding's {name!r} is missing or of the wrong type")
    return value


def _dh_public(suite: Suite, jwk: object, what: str) -> suites.DHPublicKey:
    if not isinstance(jwk, dict):
        raise BadPrekeyBundleError(f"{what} is not a JWK")
    try:
        return suites.check_public_for(suite, from_jwk(jwk))
    except (PublicKeyFormatError, RelationshipError):
        raise BadPrekeyBundleError(f"{what} is not a public key of the suite's curve") from None


def _pq_public(data: bytes) -> mlkem.MLKEM768PublicKey:
    if len(data) != PQ_PUBLIC_LEN:
        raise BadPrekeyBundleError("an ML-KEM-768 prekey has the wrong length")
    try:
        return mlkem.MLKEM768PublicKey.from_public_bytes(data)
    except ValueError:
        raise BadPrekeyBundleError("an ML-KEM-768 prekey is invalid") from None


def prekeys_digest(
    signed_prekey: tuple[str, dict[str, Any]],
    pq_prekey: tuple[str, bytes],
    one_time: tuple[tuple[str, dict[str, Any]], ...],
    one_time_pq: tuple[tuple[str, bytes], ...],
) -> str:
    """SHA-256 (base64url) of the prekeys' canonical JSON: what the binding signs."""
    content = {
        "spk": [signed_prekey[0], signed_prekey[1]],
        "pq": [pq_prekey[0], b64url.encode(pq_prekey[1])],
        "opk": [[i, k] for i, k in one_time],
        "pqopk": [[i, b64url.encode(k)] for i, k in one_time_pq],
    }
    return b64url.encode(hashlib.sha256(canonical_json(content)).digest())


@dataclass(frozen=True)
class PrekeyBundle:
    """What an invitation or a directory hands out so a peer can start a relationship."""

    root_did: str
    suite: Suite
    identity_jwk: dict[str, str]
    signed_prekey_id: str
    signed_prekey_jwk: dict[str, str]
    pq_prekey_id: str
    pq_prekey: bytes
    one_time_prekeys: tuple[tuple[str, dict[str, str]], ...]
    one_time_pq_prekeys: tuple[tuple[str, bytes], ...]
    expires: int
    binding: str
    #: Which signature form proved the prekeys: "bundle" (the binding signs a digest of
    #: all of them) or "directory-batch" (a directory claim: the root signed a Merkle
    #: root over a batch, agent/directory/keypackage.py).  :meth:`to_dict` writes the
    #: form (``"form"``) when it is not "bundle", and :meth:`from_dict` verifies either.
    binding_form: str = "bundle"
    #: A directory-batch bundle's proof for its one-time prekey pair: the pair's index
    #: in the signed batch and its RFC 9162 audit path.
    batch_proof: tuple[int, tuple[bytes, ...]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self._common_dict()
        if self.binding_form != "bundle":
            d["form"] = self.binding_form
            if self.batch_proof is not None:
                index, path = self.batch_proof
                d["one_time_proof"] = {
                    "index": index,
                    "audit_path": [b64url.encode(h) for h in path],
                }
        return d

    def _common_dict(self) -> dict[str, Any]:
        return {
            "root_did": self.root_did,
            "suite": str(self.suite),
            "identity_jwk": dict(self.identity_jwk),
            "signed_prekey": {"id": self.signed_prekey_id, "jwk": dict(self.signed_prekey_jwk)},
            "pq_prekey": {"id": self.pq_prekey_id, "key": b64url.encode(self.pq_prekey)},
            "one_time_prekeys": [{"id": i, "jwk": dict(k)} for i, k in self.one_time_prekeys],
            "one_time_pq_prekeys": [
                {"id": i, "key": b64url.encode(k)} for i, k in self.one_time_pq_prekeys
            ],
            "expires": self.expires,
            "binding": self.binding,
        }

    @classmethod
    def from_dict(cls, d: object, *, now: int | None = None) -> PrekeyBundle:
        """A bundle from outside, its binding verified against its root; typed errors."""
        if not isinstance(d, dict):
            raise BadPrekeyBundleError("a prekey bundle must be a JSON object")
        form = d.get("form", "bundle")
        if form == DIRECTORY_BATCH_FORM:
            # The batch form is defined (and verified) where directories sign it; the
            # import is here, not at the top, because that module builds on this one.
            from agent.directory.keypackage import bundle_from_dict

            return bundle_from_dict(d, now=now)
        if form != "bundle":
            raise BadPrekeyBundleError("a prekey bundle of an unknown form")
        expected = {
            "root_did", "suite", "identity_jwk", "signed_prekey", "pq_prekey",
            "one_time_prekeys", "one_time_pq_prekeys", "expires", "binding",
        }  # fmt: skip
        if set(d) != expected:
            raise BadPrekeyBundleError("a prekey bundle has missing or unknown members")
        identity, payload = verify_binding(d["binding"], now=now)
        if d["root_did"] != identity.root_did or d["suite"] != str(identity.suite):
            raise BadPrekeyBundleError("the bundle's root or suite differs from its binding")
        if d["identity_jwk"] != identity.identity_jwk or d["expires"] != payload["exp"]:
            raise BadPrekeyBundleError(
                "the bundle's agreement key or expiry differs from its binding"
            )
        spk_id, spk_jwk = _jwk_entry(identity.suite, d["signed_prekey"])
        pq_id, pq_key = _pq_entry(d["pq_prekey"])
        one_time = _list(d["one_time_prekeys"], lambda e: _jwk_entry(identity.suite, e))
        one_time_pq = _list(d["one_time_pq_prekeys"], _pq_entry)
        digest = prekeys_digest((spk_id, spk_jwk), (pq_id, pq_key), one_time, one_time_pq)
        if payload.get("prekeys") != digest:
            raise BadPrekeyBundleError("the bundle's prekeys are not the ones its root signed")
        return cls(
            identity.root_did, identity.suite, identity.identity_jwk, spk_id, spk_jwk,
            pq_id, pq_key, one_time, one_time_pq, payload["exp"], identity.binding,
        )  # fmt: skip

    def identity(self, *, now: int | None = None) -> PeerIdentity:
        """The owner the bundle belongs to (its binding verified, expiry included)."""
        return verify_binding(self.binding, now=now)[0]


def _jwk_entry(suite: Suite, entry: object) -> tuple[str, dict[str, str]]:
    if not isinstance(entry, dict) or set(entry) != {"id", "jwk"}:
        raise BadPrekeyBundleError("a prekey entry must be {id, jwk}")
    prekey_id = _bundle_id(entry["id"])
    _dh_public(suite, entry["jwk"], "a prekey")
    return prekey_id, dict(entry["jwk"])


def _pq_entry(entry: object) -> tuple[str, bytes]:
    if not isinstance(entry, dict) or set(entry) != {"id", "key"}:
        raise BadPrekeyBundleError("an ML-KEM prekey entry must be {id, key}")
    prekey_id = _bundle_id(entry["id"])
    raw = entry["key"]
    if not isinstance(raw, str):
        raise BadPrekeyBundleError("an ML-KEM prekey must be base64url")
    key = b64url.decode(raw, "an ML-KEM prekey", error=BadPrekeyBundleError)
    _pq_public(key)
    return prekey_id, key


def _bundle_id(value: object) -> str:
    try:
        return check_prekey_id(value)
    except UnknownPrekeyError:
        raise BadPrekeyBundleError("a prekey id is malformed") from None


MAX_ONE_TIME = 200


def _list(value: object, parse: Any) -> tuple[Any, ...]:
    if not isinstance(value, list) or len(value) > MAX_ONE_TIME:
        raise BadPrekeyBundleError(f"one-time prekeys must be a list of at most {MAX_ONE_TIME}")
    items = tuple(parse(e) for e in value)
    if len({i for i, _ in items}) != len(items):
        raise BadPrekeyBundleError("one-time prekey ids repeat")
    return items


class PrekeyStore:
    """The private halves of published prekeys: one 0600 file each in ``directory``.

    ``spk-<id>`` and ``pq-<id>`` (signed, reusable until dropped) and ``opk-<id>``,
    ``pqopk-<id>`` (one-time).  Ids are checked against a strict pattern before they
    become file names, so an id from a message cannot name another file.
    """

    def __init__(self, directory: Path, suite: Suite) -> None:
        self.directory = Path(directory)
        self.suite = suite
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, kind: str, prekey_id: str) -> Path:
        assert kind in _KINDS
        return self.directory / f"{kind}-{check_prekey_id(prekey_id)}"

    def _write(self, kind: str, prekey_id: str, data: bytes) -> None:
        replace_file(self._path(kind, prekey_id), data)

    def _read(self, kind: str, prekey_id: str) -> bytes:
        try:
            return self._path(kind, prekey_id).read_bytes()
        except FileNotFoundError:
            raise UnknownPrekeyError("an initial message names an unknown prekey") from None

    def publish(
        self,
        root: KeyHandle,
        agreement: KeyHandle,
        *,
        one_time: int = 20,
        ttl: int = 30 * 86400,
        one_time_pq: int | None = None,
    ) -> PrekeyBundle:
        """New prekeys (a signed one, an ML-KEM one, ``one_time`` of each kind), bound by
        the root (one signature on the token).  ``one_time_pq`` defaults to ``one_time``."""
        if suites.suite_for_key(agreement) is not self.suite:
            raise BadPrekeyBundleError("the agreement key is not of this store's suite")
        if not 0 <= one_time <= MAX_ONE_TIME:
            raise BadPrekeyBundleError(f"at most {MAX_ONE_TIME} one-time prekeys per bundle")
        pq_count = one_time if one_time_pq is None else one_time_pq
        if not 0 <= pq_count <= MAX_ONE_TIME:
            raise BadPrekeyBundleError(f"at most {MAX_ONE_TIME} one-time prekeys per bundle")
        spk = (new_prekey_id(), self._new_dh("spk"))
        pq = (new_prekey_id(), self._new_pq("pq"))
        opks = tuple((new_prekey_id(), self._new_dh("opk")) for _ in range(one_time))
        pqopks = tuple((new_prekey_id(), self._new_pq("pqopk")) for _ in range(pq_count))
        for prekey_id, key in (spk, *opks):
            self._write(
                "spk" if prekey_id == spk[0] else "opk", prekey_id, suites.private_bytes(key)
            )
        for prekey_id, pqkey in (pq, *pqopks):
            self._write(
                "pq" if prekey_id == pq[0] else "pqopk", prekey_id, pqkey.private_bytes_raw()
            )
        replace_file(self.directory / "root", root.did.encode())
        fsync_directory(self.directory)
        spk_pub = (spk[0], _jwk(spk[1]))
        pq_pub = (pq[0], pq[1].public_key().public_bytes_raw())
        opk_pub = tuple((i, _jwk(k)) for i, k in opks)
        pqopk_pub = tuple((i, k.public_key().public_bytes_raw()) for i, k in pqopks)
        digest = prekeys_digest(spk_pub, pq_pub, opk_pub, pqopk_pub)
        now = int(time.time())
        binding = sign_binding(root, agreement, prekeys_digest=digest, ttl=ttl, now=now)
        return PrekeyBundle(
            root.did, self.suite, dict(agreement.jwk()), spk_pub[0], spk_pub[1], pq_pub[0],
            pq_pub[1], opk_pub, pqopk_pub, now + ttl, binding,
        )  # fmt: skip

    def generate(
        self, *, one_time: int, one_time_pq: int | None = None
    ) -> tuple[
        tuple[str, dict[str, str]],
        tuple[str, bytes],
        tuple[tuple[str, dict[str, str]], ...],
        tuple[tuple[str, bytes], ...],
    ]:
        """New prekeys stored here, their public halves returned, nothing signed: for
        callers that bind them in another form (a directory batch signs a Merkle root)."""
        pq_count = one_time if one_time_pq is None else one_time_pq
        if not (0 <= one_time <= MAX_ONE_TIME and 0 <= pq_count <= MAX_ONE_TIME):
            raise BadPrekeyBundleError(f"at most {MAX_ONE_TIME} one-time prekeys per bundle")
        spk = (new_prekey_id(), self._new_dh("spk"))
        pq = (new_prekey_id(), self._new_pq("pq"))
        opks = tuple((new_prekey_id(), self._new_dh("opk")) for _ in range(one_time))
        pqopks = tuple((new_prekey_id(), self._new_pq("pqopk")) for _ in range(pq_count))
        self._write("spk", spk[0], suites.private_bytes(spk[1]))
        for prekey_id, key in opks:
            self._write("opk", prekey_id, suites.private_bytes(key))
        self._write("pq", pq[0], pq[1].private_bytes_raw())
        for prekey_id, pqkey in pqopks:
            self._write("pqopk", prekey_id, pqkey.private_bytes_raw())
        fsync_directory(self.directory)
        return (
            (spk[0], _jwk(spk[1])),
            (pq[0], pq[1].public_key().public_bytes_raw()),
            tuple((i, _jwk(k)) for i, k in opks),
            tuple((i, k.public_key().public_bytes_raw()) for i, k in pqopks),
        )

    def record_root(self, root_did: str) -> None:
        """Remember the root that binds this store's prekeys (``publish`` does it too)."""
        replace_file(self.directory / "root", root_did.encode())

    def _new_dh(self, kind: str) -> PrivateKey:
        del kind
        return suites.generate(self.suite)

    def _new_pq(self, kind: str) -> mlkem.MLKEM768PrivateKey:
        del kind
        return mlkem.MLKEM768PrivateKey.generate()

    def root_did(self) -> str:
        """The root that bound this store's prekeys (recorded by ``publish``)."""
        try:
            return (self.directory / "root").read_text()
        except FileNotFoundError:
            raise UnknownPrekeyError("no prekeys were published from this store") from None

    def signed_prekey_ids(self) -> list[str]:
        """Ids of the signed prekeys still held (an initial message may use any)."""
        return sorted(p.name[4:] for p in self.directory.glob("spk-*") if _ID.fullmatch(p.name[4:]))

    def signed_prekey(self, prekey_id: str) -> PrivateKey:
        return self._dh_private(self._read("spk", prekey_id))

    def pq_prekey(self, prekey_id: str) -> mlkem.MLKEM768PrivateKey:
        return self._pq_private(self._read("pq", prekey_id))

    def take_one_time(self, prekey_id: str) -> PrivateKey:
        """The one-time prekey, its file deleted durably first; a second take is refused."""
        return self._dh_private(self._take("opk", prekey_id))

    def take_one_time_pq(self, prekey_id: str) -> mlkem.MLKEM768PrivateKey:
        return self._pq_private(self._take("pqopk", prekey_id))

    def peek_one_time(self, prekey_id: str) -> PrivateKey:
        """The one-time prekey, left in place: the caller records its use with the state
        it creates, then calls :meth:`discard_one_time` (so a crash in between loses
        neither the prekey nor the message that used it)."""
        return self._dh_private(self._peek("opk", prekey_id))

    def peek_one_time_pq(self, prekey_id: str) -> mlkem.MLKEM768PrivateKey:
        return self._pq_private(self._peek("pqopk", prekey_id))

    def discard_one_time(self, prekey_id: str, *, pq: bool = False) -> None:
        """Delete a one-time prekey durably; one already gone is not an error (this runs
        again after a crash, for every use recorded but not yet carried out)."""
        with locked_file(self.directory / ".lock"):
            self._path("pqopk" if pq else "opk", prekey_id).unlink(missing_ok=True)
            fsync_directory(self.directory)

    def has_one_time(self, prekey_id: str, *, pq: bool = False) -> bool:
        return self._path("pqopk" if pq else "opk", prekey_id).exists()

    def drop_signed_prekeys(self, prekey_id: str, pq_prekey_id: str) -> None:
        """Forget a bundle's signed prekeys (once it expired): messages to them then fail."""
        self._path("spk", prekey_id).unlink(missing_ok=True)
        self._path("pq", pq_prekey_id).unlink(missing_ok=True)
        fsync_directory(self.directory)

    def _take(self, kind: str, prekey_id: str) -> bytes:
        path = self._path(kind, prekey_id)
        with locked_file(self.directory / ".lock"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise PrekeyConsumedError(
                    "the one-time prekey was already used (or never published here)"
                ) from None
            os.unlink(path)
            fsync_directory(self.directory)
        return data

    def _peek(self, kind: str, prekey_id: str) -> bytes:
        try:
            return self._path(kind, prekey_id).read_bytes()
        except FileNotFoundError:
            raise PrekeyConsumedError(
                "the one-time prekey was already used (or never published here)"
            ) from None

    def _dh_private(self, data: bytes) -> PrivateKey:
        try:
            return suites.private_from_bytes(self.suite, data)
        except ValueError:
            raise UnknownPrekeyError("a stored prekey is damaged") from None

    def _pq_private(self, data: bytes) -> mlkem.MLKEM768PrivateKey:
        if len(data) != PQ_SEED_LEN:
            raise UnknownPrekeyError("a stored ML-KEM prekey is damaged")
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(data)


def _jwk(private: PrivateKey) -> dict[str, str]:
    public = private.public_key()
    return to_jwk(cast(PublicKey, public))
