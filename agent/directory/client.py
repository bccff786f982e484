"""The directory's client: publish as an owner, claim and verify as a claimer, attest.

Nothing a directory answers is trusted before it verifies: a claim's package must be
signed by the root that the log binds to the name, the log entry must be included in a
tree head signed by the directory's key, neither stale nor from the future, and
consistent with every head this client saw before (treehead.SeenHeads).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx

from agent.directory import errors as dir_errors
from agent.directory import merkle
from agent.directory.errors import (
    AttestationError,
    DirectoryError,
    DirectoryUnreachableError,
    PackageError,
    ProofError,
    TreeHeadError,
)
from agent.directory.keypackage import (
    BindingLeaf,
    OneTimePrekey,
    Package,
    sign_package,
)
from agent.directory.service import (
    ATTESTATION_TYP,
    CLAIM_TYP,
    REQUEST_TYP,
    statement_digest,
)
from agent.directory.treehead import SeenHeads, TreeHead, verify_tree_head
from agent.protocol import sign_request
from agent.relationships.delivery import Address
from agent.relationships.prekeys import PrekeyBundle, PrekeyStore
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from policies.capability import Bundle
from policies.errors import PolicyError
from policies.jws import parse_compact, public_key_for, verify_signature

#: A head older than this is stale; one dated further ahead than the skew is refused.
MAX_HEAD_AGE_MS = 10 * 60 * 1000
MAX_HEAD_FUTURE_MS = 60 * 1000

_CODES: dict[str, type[DirectoryError]] = {
    cls.code: cls
    for cls in vars(dir_errors).values()
    if isinstance(cls, type) and issubclass(cls, DirectoryError)
}


def _refusal(response: httpx.Response) -> DirectoryError:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "directory_error", f"the directory answered HTTP {response.status_code}"
    cls = _CODES.get(code, DirectoryError)
    exc = cls(f"the directory refused: {message[:300]}")
    if cls is DirectoryError:
        exc.code = code if len(code) < 64 else "directory_error"
        exc.status = response.status_code
    return exc


@dataclass(frozen=True)
class VerifiedClaim:
    """A claim whose every signature and proof checked out."""

    name: str
    package: Package
    prekey: OneTimePrekey | None
    prekey_index: int | None
    last_resort: bool
    contact: Bundle
    answer: dict[str, Any]

    def bundle(self) -> PrekeyBundle:
        """The claimed package as x3dh.initiate takes it (its dict form verifies alone)."""
        if self.prekey is None or self.prekey_index is None:
            return self.package.bundle(None)
        path = [
            b64url.decode(h, "an audit path hash") for h in self.answer["one_time"]["audit_path"]
        ]
        return self.package.bundle(self.prekey, self.prekey_index, path)

    def to_dict(self) -> dict[str, Any]:
        """What ``janus dir lookup --json`` prints: the proof members and the package."""
        a = self.answer
        return {
            "name": self.name,
            "leaf": a["leaf"],
            "leaf_index": a["leaf_index"],
            "tree_size": a["tree_size"],
            "audit_path": a["audit_path"],
            "tree_head": a["tree_head"],
            "last_resort": self.last_resort,
            "package": {
                "statement": a["package"],
                "root_did": self.package.root_did,
                "suite": str(self.package.identity.suite),
                "identity_jwk": self.package.identity.identity_jwk,
                "intro": self.package.intro.to_dict(),
                "expires": self.package.expires,
                "one_time": a["one_time"],
            },
            "contact": a["contact"],
        }


def _proof_member(answer: dict[str, Any]) -> tuple[bytes, int, int, list[bytes], TreeHead]:
    try:
        leaf = merkle.unb64(answer["leaf"], "the leaf", error=ProofError)
        index, size = answer["leaf_index"], answer["tree_size"]
        path_raw = answer["audit_path"]
        head = TreeHead.from_dict(answer["tree_head"])
    except KeyError as exc:
        raise ProofError(f"the answer lacks {exc.args[0]!r}") from None
    if not isinstance(index, int) or not isinstance(size, int) or not isinstance(path_raw, list):
        raise ProofError("leaf_index and tree_size are integers, audit_path a list")
    path = [merkle.unb64(h, "an audit path hash", error=ProofError) for h in path_raw]
    return leaf, index, size, path, head


def verify_logged(
    answer: dict[str, Any],
    *,
    directory: str,
    seen: SeenHeads | None,
    fetch_consistency: Any,
    now_ms: int | None = None,
    max_age_ms: int = MAX_HEAD_AGE_MS,
    max_future_ms: int = MAX_HEAD_FUTURE_MS,
) -> BindingLeaf:
    """The answer's log entry, once its inclusion and tree head verify."""
    leaf, index, size, path, head = _proof_member(answer)
    verify_tree_head(
        head,
        expected_key=directory,
        now_ms=now_ms,
        max_age_ms=max_age_ms,
        max_future_ms=max_future_ms,
    )
    if head.tree_size != size:
        raise ProofError("the proof is against another tree size than the head's")
    merkle.verify_inclusion(leaf, index, size, path, head.root_hash)
    if seen is not None:
        seen.accept(directory, head, fetch_consistency)
    return BindingLeaf.parse(leaf)


class DirectoryClient:
    def __init__(self, url: str, *, did: str | None = None, timeout: float = 15) -> None:
        self.url = url.rstrip("/")
        self._did = did
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DirectoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise DirectoryUnreachableError(
                f"cannot reach the directory at {self.url:.200} ({type(exc).__name__})"
            ) from None
        if response.status_code >= 400:
            raise _refusal(response)
        try:
            answer = response.json()
        except ValueError:
            raise DirectoryError("the directory answered no JSON") from None
        if not isinstance(answer, dict):
            raise DirectoryError("the directory answered no JSON object")
        return answer

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/v1/dir")

    @property
    def did(self) -> str:
        if self._did is None:
            did = self.info().get("did")
            if not isinstance(did, str):
                raise DirectoryError("the directory named no did")
            self._did = did
        return self._did

    def tree_head(self) -> TreeHead:
        return TreeHead.from_dict(self._call("GET", "/v1/dir/tree-head"))

    def consistency_answer(self, first: int, second: int) -> dict[str, Any]:
        return self._call(
            "GET", "/v1/dir/log/consistency", params={"first": first, "second": second}
        )

    def consistency(self, first: int, second: int) -> list[bytes]:
        proof = self.consistency_answer(first, second).get("proof")
        if not isinstance(proof, list):
            raise ProofError("the consistency answer has no proof list")
        return [merkle.unb64(h, "a consistency proof hash", error=ProofError) for h in proof]

    # --- owner --------------------------------------------------------------------------

    def _signed(self, key: KeyHandle, typ: str, **claims: Any) -> str:
        return sign_request(key, typ=typ, audience=self.did, now=int(time.time()), **claims)

    def publish(
        self,
        root: KeyHandle,
        agreement: KeyHandle,
        store: PrekeyStore,
        *,
        name: str,
        intro: Address,
        prekeys: int = 50,
        grant: Bundle | None = None,
    ) -> dict[str, Any]:
        """New prekeys in ``store``, one root signature over the batch, published."""
        spk, pq, opks, pqopks = store.generate(one_time=prekeys)
        store.record_root(root.did)
        batch = [OneTimePrekey(o[0], o[1], p[0], p[1]) for o, p in zip(opks, pqopks, strict=True)]
        statement = sign_package(
            root,
            agreement,
            name=name,
            directory=self.did,
            signed_prekey=spk,
            pq_prekey=pq,
            one_time=batch,
            batch_id=secrets.token_urlsafe(16),
            intro=intro,
        )
        body: dict[str, Any] = {
            "request": self._signed(
                root, REQUEST_TYP, op="publish", name=name, package=statement_digest(statement)
            ),
            "package": statement,
            "prekeys": [p.to_dict() for p in batch],
        }
        if grant is not None:
            body["grant"] = grant.to_dict()
        return self._call("POST", "/v1/dir/publish", json=body)

    def status(self, root: KeyHandle, name: str) -> dict[str, Any]:
        body = {"request": self._signed(root, REQUEST_TYP, op="status", name=name)}
        return self._call("POST", "/v1/dir/status", json=body)

    def withdraw(self, root: KeyHandle, name: str) -> dict[str, Any]:
        body = {"request": self._signed(root, REQUEST_TYP, op="withdraw", name=name)}
        return self._call("POST", "/v1/dir/withdraw", json=body)

    # --- claimer ------------------------------------------------------------------------

    def claim_answer(self, claimer: KeyHandle, name: str) -> dict[str, Any]:
        body = {"request": self._signed(claimer, CLAIM_TYP, op="claim", name=name)}
        return self._call("POST", "/v1/dir/claim", json=body)

    def claim(
        self, claimer: KeyHandle, name: str, *, seen: SeenHeads | None = None
    ) -> VerifiedClaim:
        answer = self.claim_answer(claimer, name)
        return verify_claim(
            answer, name=name, directory=self.did, seen=seen, fetch_consistency=self.consistency
        )

    def attest(self, name: str) -> str:
        attestation = self._call("GET", f"/v1/dir/attest/{name}").get("attestation")
        if not isinstance(attestation, str):
            raise AttestationError("the directory answered no attestation")
        return attestation


def verify_claim(
    answer: dict[str, Any],
    *,
    name: str,
    directory: str,
    seen: SeenHeads | None,
    fetch_consistency: Any,
    now: int | None = None,
    max_age_ms: int = MAX_HEAD_AGE_MS,
    max_future_ms: int = MAX_HEAD_FUTURE_MS,
) -> VerifiedClaim:
    """Every check of a claim (see the module docstring); typed errors."""
    moment = int(time.time()) if now is None else now
    expected = {
        "name",
        "package",
        "last_resort",
        "one_time",
        "contact",
        "leaf",
        "leaf_index",
        "tree_size",
        "audit_path",
        "tree_head",
    }
    if not isinstance(answer, dict) or set(answer) != expected:
        raise PackageError("the claim answer has missing or unknown members")
    if answer["name"] != name:
        raise PackageError("the directory answered for another name")
    entry = verify_logged(
        answer,
        directory=directory,
        seen=seen,
        fetch_consistency=fetch_consistency,
        now_ms=moment * 1000,
        max_age_ms=max_age_ms,
        max_future_ms=max_future_ms,
    )
    if entry.op != "publish" or entry.name != name:
        raise PackageError("the logged entry does not bind this name")
    package = Package.verify(answer["package"], now=moment)
    if package.root_did != entry.root:
        raise PackageError("the package is not signed by the root the log binds to the name")
    if package.identity.identity_jwk != entry.idk or str(package.identity.suite) != entry.suite:
        raise PackageError("the package's agreement key is not the one the log binds")
    if package.name != name or package.directory != directory:
        raise PackageError("the package names another name or directory")
    prekey, index = None, None
    last_resort = answer["last_resort"]
    if not isinstance(last_resort, bool):
        raise PackageError("'last_resort' must be true or false")
    one_time = answer["one_time"]
    if last_resort:
        if one_time is not None:
            raise PackageError("a last-resort answer carries no one-time prekey")
    else:
        if not isinstance(one_time, dict) or set(one_time) != {"index", "prekey", "audit_path"}:
            raise PackageError("'one_time' must be {index, prekey, audit_path}")
        index = one_time["index"]
        path = one_time["audit_path"]
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(path, list):
            raise PackageError("the one-time prekey's index or audit path is malformed")
        prekey = OneTimePrekey.from_dict(one_time["prekey"], package.identity.suite)
        hashes = [b64url.decode(h, "an audit path hash", error=PackageError) for h in path]
        package.check_prekey(prekey, index, hashes)
    try:
        contact = Bundle.from_dict(answer["contact"])
    except PolicyError as exc:
        raise PackageError(f"the contact capability is malformed: {exc}") from None
    if contact.root.issuer != directory:
        raise PackageError("the contact capability is not rooted at this directory")
    return VerifiedClaim(name, package, prekey, index, last_resort, contact, answer)


def verify_attestation(
    compact: object,
    *,
    directory: str | None = None,
    now: int | None = None,
) -> dict[str, Any]:
    """An attestation checked offline: its signature, validity, tree head and inclusion."""
    if not isinstance(compact, str):
        raise AttestationError("an attestation is a compact JWS")
    moment = int(time.time()) if now is None else now
    try:
        parsed = parse_compact(compact, typ=ATTESTATION_TYP, what="the attestation")
        issuer = parsed.payload.get("iss")
        verify_signature(
            parsed, public_key_for(issuer, "the attestation's issuer"), what="the attestation"
        )
    except PolicyError as exc:
        raise AttestationError(str(exc)) from None
    payload = parsed.payload
    if directory is not None and issuer != directory:
        raise AttestationError("the attestation is by another directory")
    members = {"iss", "sub", "root", "suite", "idk", "iat", "exp", "proof"}
    if set(payload) != members or not isinstance(payload["proof"], dict):
        raise AttestationError("the attestation has missing or unknown members")
    iat, exp = payload["iat"], payload["exp"]
    if not isinstance(iat, int) or not isinstance(exp, int) or not iat - 300 <= moment < exp:
        raise AttestationError("the attestation is expired or not yet valid")
    try:
        # The head's age is judged against the attestation's own time: offline, later.
        entry = verify_logged(
            payload["proof"],
            directory=str(issuer),
            seen=None,
            fetch_consistency=None,
            now_ms=iat * 1000,
        )
    except (ProofError, TreeHeadError, PackageError) as exc:
        raise AttestationError(f"the attestation's proof does not hold: {exc}") from None
    if (entry.op, entry.name, entry.root, entry.suite, entry.idk) != (
        "publish",
        payload["sub"],
        payload["root"],
        payload["suite"],
        payload["idk"],
    ):
        raise AttestationError("the attestation says another binding than its log entry")
    return {
        "valid": True,
        "directory": issuer,
        "name": payload["sub"],
        "root": payload["root"],
        "suite": payload["suite"],
        "idk": payload["idk"],
        "issued": iat,
        "expires": exp,
        "leaf_index": payload["proof"]["leaf_index"],
        "tree_size": payload["proof"]["tree_size"],
    }


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
