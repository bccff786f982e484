"""KeyPackages: what an owner publishes at a directory and what a claimer gets back.

A directory hands out *one* one-time prekey per claim, so the claimer must be able to
check that single prekey against the owner's root.  A bundle binding
(agent/relationships/prekeys.py) signs one hash over all prekeys, which a claimer
holding only one of them cannot recompute.  Here the root signs, once per batch, the
RFC 9162 Merkle root over the batch's one-time prekey pairs (an X25519 and an ML-KEM
prekey per leaf); each claimed pair travels with its audit path, so it verifies alone.

The root's signature is a *binding* JWS (``janus-rel-binding+jws``, the same issuer,
suite, agreement key and validity members), with one more member, ``dir``, naming the
directory, the name, the signed and last-resort prekeys, the batch's Merkle root and
the intro address.  So the same signature is what :func:`x3dh.initiate` verifies as the
peer's identity: a claimed package becomes a :class:`PrekeyBundle` with no second
signature (its ``binding_form`` says so).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from agent.directory import merkle
from agent.directory.errors import BadNameError, PackageError, ProofError
from agent.relationships import suite as suites
from agent.relationships.delivery import Address
from agent.relationships.errors import BadPrekeyBundleError, RelationshipError
from agent.relationships.prekeys import (
    BINDING_TYP,
    DIRECTORY_BATCH_FORM,
    MAX_ONE_TIME,
    PQ_PUBLIC_LEN,
    PeerIdentity,
    PrekeyBundle,
    check_prekey_id,
    verify_binding,
)
from agent.relationships.suite import Suite
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import PublicKeyFormatError, from_jwk
from janus_hsm.strictjson import canonical_json
from policies.jws import sign_compact

#: ``binding_form`` of a PrekeyBundle made from a verified directory claim.
DIRECTORY_FORM = DIRECTORY_BATCH_FORM
PACKAGE_TTL = 30 * 86400
MAX_PACKAGE_TTL = 365 * 86400
_LOCAL = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62})")
_DOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _DOMAIN.fullmatch(namespace):
        raise BadNameError("a namespace is a lower-case domain name such as example.org")
    return namespace


def full_name(name: object, namespace: str) -> str:
    """``alice`` or ``alice@example.org`` as ``alice@example.org``; other namespaces refused."""
    if not isinstance(name, str) or len(name) > 320:
        raise BadNameError("a name is a string such as alice or alice@example.org")
    local, at, domain = name.partition("@")
    if at and domain != namespace:
        raise BadNameError(f"this directory serves @{namespace:.120} only")
    if not _LOCAL.fullmatch(local):
        raise BadNameError(
            "a name's local part is 1-63 of a-z 0-9 . _ - (lower case), "
            "starting with a letter or digit"
        )
    return f"{local}@{namespace}"


def split_name(text: object) -> tuple[str, str]:
    """``NAME@DOMAIN`` as (name, domain), checked."""
    if not isinstance(text, str) or "@" not in text:
        raise BadNameError("give the name as NAME@DOMAIN")
    local, _, domain = text.partition("@")
    check_namespace(domain)
    return full_name(local, domain), domain


@dataclass(frozen=True)
class OneTimePrekey:
    """One leaf of a batch: an X25519 and an ML-KEM one-time prekey, consumed together."""

    opk_id: str
    opk_jwk: dict[str, str]
    pq_id: str
    pq_key: bytes

    def leaf(self) -> bytes:
        """The exact bytes hashed as the batch's Merkle leaf."""
        return canonical_json(
            {"opk": [self.opk_id, self.opk_jwk], "pqopk": [self.pq_id, b64url.encode(self.pq_key)]}
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "opk": {"id": self.opk_id, "jwk": dict(self.opk_jwk)},
            "pqopk": {"id": self.pq_id, "key": b64url.encode(self.pq_key)},
        }

    @classmethod
    def from_dict(cls, d: object, suite: Suite) -> OneTimePrekey:
        if not isinstance(d, dict) or set(d) != {"opk", "pqopk"}:
            raise PackageError("a one-time prekey is {opk: {id, jwk}, pqopk: {id, key}}")
        opk, pq = d["opk"], d["pqopk"]
        if not isinstance(opk, dict) or set(opk) != {"id", "jwk"}:
            raise PackageError("a one-time prekey's opk is {id, jwk}")
        if not isinstance(pq, dict) or set(pq) != {"id", "key"}:
            raise PackageError("a one-time prekey's pqopk is {id, key}")
        return cls(_id(opk["id"]), _dh_jwk(suite, opk["jwk"]), _id(pq["id"]), _pq_key(pq["key"]))


def _id(value: object) -> str:
    try:
        return check_prekey_id(value)
    except RelationshipError:
        raise PackageError("a prekey id is malformed") from None


def _dh_jwk(suite: Suite, jwk: object) -> dict[str, str]:
    if not isinstance(jwk, dict) or not all(isinstance(v, str) for v in jwk.values()):
        raise PackageError("a prekey is not a JWK")
    try:
        suites.check_public_for(suite, from_jwk(jwk))
    except (PublicKeyFormatError, RelationshipError):
        raise PackageError("a prekey is not a public key of the suite's curve") from None
    return dict(jwk)


def _pq_key(value: object) -> bytes:
    key = b64url.decode(value, "an ML-KEM prekey", error=PackageError)
    if len(key) != PQ_PUBLIC_LEN:
        raise PackageError("an ML-KEM-768 prekey has the wrong length")
    try:
        suites.decode_pq_public(key)
    except (RelationshipError, ValueError):
        raise PackageError("an ML-KEM-768 prekey is invalid") from None
    return key


def batch_root(prekeys: list[OneTimePrekey]) -> bytes:
    return merkle.root_from_leaf_hashes([merkle.leaf_hash(p.leaf()) for p in prekeys])


def sign_package(
    root: KeyHandle,
    agreement: KeyHandle,
    *,
    name: str,
    directory: str,
    signed_prekey: tuple[str, dict[str, str]],
    pq_prekey: tuple[str, bytes],
    one_time: list[OneTimePrekey],
    batch_id: str,
    intro: Address,
    ttl: int = PACKAGE_TTL,
    now: int | None = None,
) -> str:
    """The root's one signature over a batch (see the module docstring)."""
    issued = int(time.time()) if now is None else now
    payload = {
        "iss": root.did,
        "suite": str(suites.suite_for_key(agreement)),
        "idk": dict(agreement.jwk()),
        "iat": issued,
        "exp": issued + ttl,
        "dir": {
            "name": name,
            "directory": directory,
            "spk": [signed_prekey[0], signed_prekey[1]],
            "pq": [pq_prekey[0], b64url.encode(pq_prekey[1])],
            "batch": batch_id,
            "otk_root": b64url.encode(batch_root(one_time)),
            "otk_count": len(one_time),
            "intro": intro.to_dict(),
        },
    }
    return sign_compact(root, {"typ": BINDING_TYP}, payload)


@dataclass(frozen=True)
class Package:
    """A verified package statement: who (root, agreement key) and the batch it signs."""

    statement: str
    identity: PeerIdentity
    name: str
    directory: str
    signed_prekey: tuple[str, dict[str, str]]
    pq_prekey: tuple[str, bytes]
    batch_id: str
    otk_root: bytes
    otk_count: int
    intro: Address
    issued: int
    expires: int

    @property
    def root_did(self) -> str:
        return self.identity.root_did

    @classmethod
    def verify(cls, statement: object, *, now: int | None = None) -> Package:
        """The statement's signature, expiry and members; PackageError for any defect."""
        try:
            identity, payload = verify_binding(statement, now=now)
        except RelationshipError as exc:
            raise PackageError(f"the package's signature does not hold: {exc}") from None
        spec = payload.get("dir")
        expected = {"name", "directory", "spk", "pq", "batch", "otk_root", "otk_count", "intro"}
        if not isinstance(spec, dict) or set(spec) != expected:
            raise PackageError("the statement is no directory package (its 'dir' member)")
        if "prekeys" in payload:
            raise PackageError("a directory package signs no bundle digest")
        name, directory, batch = spec["name"], spec["directory"], spec["batch"]
        if not all(isinstance(v, str) for v in (name, directory, batch)):
            raise PackageError("the package's name, directory and batch must be strings")
        spk, pq = spec["spk"], spec["pq"]
        if not (isinstance(spk, list) and len(spk) == 2 and isinstance(pq, list) and len(pq) == 2):
            raise PackageError("the package's spk and pq are [id, key] pairs")
        count = spec["otk_count"]
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_ONE_TIME:
            raise PackageError(f"a batch holds 0 to {MAX_ONE_TIME} one-time prekeys")
        root = b64url.decode(spec["otk_root"], "the batch's Merkle root", error=PackageError)
        if len(root) != merkle.HASH_SIZE:
            raise PackageError("the batch's Merkle root is not a SHA-256 hash")
        try:
            intro = Address.from_dict(spec["intro"])
        except RelationshipError as exc:
            raise PackageError(f"the package's intro address: {exc}") from None
        exp, iat = payload["exp"], payload["iat"]
        if exp - iat > MAX_PACKAGE_TTL:
            raise PackageError("a package is valid for at most a year")
        return cls(
            statement=str(statement),
            identity=identity,
            name=name,
            directory=directory,
            signed_prekey=(_id(spk[0]), _dh_jwk(identity.suite, spk[1])),
            pq_prekey=(_id(pq[0]), _pq_key(pq[1])),
            batch_id=_batch_id(batch),
            otk_root=root,
            otk_count=count,
            intro=intro,
            issued=iat,
            expires=exp,
        )

    def check_prekey(self, prekey: OneTimePrekey, index: int, path: list[bytes]) -> None:
        """The claimed prekey is leaf ``index`` of this batch; PackageError otherwise."""
        try:
            merkle.verify_inclusion(prekey.leaf(), index, self.otk_count, path, self.otk_root)
        except ProofError as exc:
            raise PackageError(f"the one-time prekey is not in the signed batch: {exc}") from None

    def bundle(
        self,
        prekey: OneTimePrekey | None,
        index: int | None = None,
        path: list[bytes] | None = None,
    ) -> PrekeyBundle:
        """What x3dh.initiate takes: this package, with the claimed one-time prekey (or
        none: the last-resort signed prekeys).  With the prekey's ``index`` and audit
        ``path`` (already checked), the bundle's dict form verifies on its own."""
        one_time = () if prekey is None else ((prekey.opk_id, dict(prekey.opk_jwk)),)
        one_time_pq = () if prekey is None else ((prekey.pq_id, prekey.pq_key),)
        proof = None
        if prekey is not None and index is not None and path is not None:
            proof = (index, tuple(path))
        return PrekeyBundle(
            root_did=self.root_did,
            suite=self.identity.suite,
            identity_jwk=dict(self.identity.identity_jwk),
            signed_prekey_id=self.signed_prekey[0],
            signed_prekey_jwk=dict(self.signed_prekey[1]),
            pq_prekey_id=self.pq_prekey[0],
            pq_prekey=self.pq_prekey[1],
            one_time_prekeys=one_time,
            one_time_pq_prekeys=one_time_pq,
            expires=self.expires,
            binding=self.statement,
            binding_form=DIRECTORY_FORM,
            batch_proof=proof,
        )


def bundle_from_dict(d: dict[str, Any], *, now: int | None = None) -> PrekeyBundle:
    """A directory-batch bundle's dict form (``PrekeyBundle.to_dict``), verified as a
    claim is: the package statement's signature and expiry, and the one-time prekey
    pair's audit path to the signed batch root.  Any defect is BadPrekeyBundleError."""
    base = {
        "root_did", "suite", "identity_jwk", "signed_prekey", "pq_prekey",
        "one_time_prekeys", "one_time_pq_prekeys", "expires", "binding", "form",
    }  # fmt: skip
    if set(d) not in (base, base | {"one_time_proof"}):
        raise BadPrekeyBundleError("a directory prekey bundle has missing or unknown members")
    try:
        package = Package.verify(d["binding"], now=now)
        prekey, index, path = None, None, None
        opks, pqopks = d["one_time_prekeys"], d["one_time_pq_prekeys"]
        if not isinstance(opks, list) or not isinstance(pqopks, list):
            raise PackageError("one-time prekeys must be lists")
        if opks or pqopks or "one_time_proof" in d:
            proof = d.get("one_time_proof")
            if len(opks) != 1 or len(pqopks) != 1 or not isinstance(proof, dict):
                raise PackageError("a directory bundle holds one proven one-time prekey pair")
            if set(proof) != {"index", "audit_path"}:
                raise PackageError("'one_time_proof' must be {index, audit_path}")
            index, raw_path = proof["index"], proof["audit_path"]
            if not isinstance(index, int) or isinstance(index, bool):
                raise PackageError("the one-time prekey's index must be an integer")
            if not isinstance(raw_path, list):
                raise PackageError("the one-time prekey's audit path must be a list")
            path = [b64url.decode(h, "an audit path hash", error=PackageError) for h in raw_path]
            prekey = OneTimePrekey.from_dict(
                {"opk": opks[0], "pqopk": pqopks[0]}, package.identity.suite
            )
            package.check_prekey(prekey, index, path)
        bundle = package.bundle(prekey, index, path)
    except PackageError as exc:
        raise BadPrekeyBundleError(str(exc)) from None
    if bundle.to_dict() != d:
        # Every other member (root, suite, keys, expiry) must be the statement's own.
        raise BadPrekeyBundleError("the bundle differs from the package its root signed")
    return bundle


_BATCH = re.compile(r"[A-Za-z0-9_-]{16,43}")


def _batch_id(value: str) -> str:
    if not _BATCH.fullmatch(value):
        raise PackageError("a batch id is 16-43 base64url characters")
    return value


def check_batch_id(value: object) -> str:
    if not isinstance(value, str):
        raise PackageError("a batch id is a string")
    return _batch_id(value)


# --- log leaves ------------------------------------------------------------------------

LEAF_VERSION = 1


def binding_leaf(
    *, op: str, name: str, root: str, suite: str | None, idk: dict[str, str] | None, ts_ms: int
) -> bytes:
    """The exact bytes a binding change appends to the log (canonical JSON)."""
    return canonical_json(
        {
            "v": LEAF_VERSION,
            "op": op,
            "name": name,
            "root": root,
            "suite": suite,
            "idk": idk,
            "ts": ts_ms,
        }
    )


@dataclass(frozen=True)
class BindingLeaf:
    op: str
    name: str
    root: str
    suite: str | None
    idk: dict[str, str] | None
    ts: int

    @classmethod
    def parse(cls, leaf: bytes) -> BindingLeaf:
        from janus_hsm.strictjson import StrictJSONError, loads_object

        try:
            d = loads_object(leaf, "a log entry")
        except (StrictJSONError, ValueError):
            raise PackageError("a log entry is not a JSON object") from None
        if set(d) != {"v", "op", "name", "root", "suite", "idk", "ts"} or d["v"] != LEAF_VERSION:
            raise PackageError("a log entry has missing or unknown members")
        if d["op"] not in ("publish", "withdraw") or not isinstance(d["name"], str):
            raise PackageError("a log entry's op or name is malformed")
        if not isinstance(d["root"], str) or not isinstance(d["ts"], int):
            raise PackageError("a log entry's root or ts is malformed")
        if canonical_json(d) != leaf:
            raise PackageError("a log entry is not in canonical form")
        return cls(d["op"], d["name"], d["root"], d["suite"], d["idk"], d["ts"])
