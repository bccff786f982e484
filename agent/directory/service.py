"""The directory service: publish, claim, attest, and the transparency log behind them.

Every binding change (a name's first publication, a change of its root or agreement
key, a withdrawal) is appended to the RFC 9162 log in the same transaction as the
change itself, so no binding exists that the log does not show.  A claim consumes one
one-time prekey with a single ``DELETE … RETURNING`` of one row in one transaction
(PostgreSQL picks the row ``FOR UPDATE SKIP LOCKED``, so concurrent claimers on any
instance never wait for, nor receive, the same prekey).

The methods are synchronous and thread-safe; the HTTP layer (http.py) runs them in
threads.  Input from outside is checked here with the directory's typed errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from agent.directory import merkle
from agent.directory.contact import contact_bundle, sign_contact
from agent.directory.errors import (
    ClaimerBlockedError,
    DirectoryError,
    NameTakenError,
    NotEnrolledError,
    PackageError,
    RateLimitedError,
    RequestRefusedError,
    UnknownNameError,
)
from agent.directory.keypackage import (
    OneTimePrekey,
    Package,
    binding_leaf,
    check_namespace,
    full_name,
)
from agent.directory.rules import ENROL_ACTION, GRANT, Rules
from agent.directory.store import DirectoryStore, Tx
from agent.directory.treehead import TreeHead, sign_tree_head
from agent.protocol import check_signed_request
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from policies.abilities import pattern_matches
from policies.capability import Bundle
from policies.errors import PolicyError
from policies.jws import sign_compact
from policies.verify import Verifier

log = logging.getLogger(__name__)

#: ``typ`` of an owner's request (publish, withdraw, status) and of a claim.
REQUEST_TYP = "janus-dir-request+jws"
CLAIM_TYP = "janus-dir-claim+jws"
ATTESTATION_TYP = "janus-dir-attestation+jws"
ATTESTATION_TTL = 86400
#: A signed head is reused for this long while the log does not grow.
HEAD_REFRESH_MS = 60_000
MAX_LOG_RANGE = 1000

_NAME_ROW = "SELECT root, suite, idk, withdrawn, leaf_index FROM dir_names WHERE name = ?"
# The one statement that consumes a one-time prekey: the row goes and comes back at once
# (on PostgreSQL inside _CLAIM_PG, where SKIP LOCKED lets concurrent claimers each take a
# different row instead of waiting for one another's row and then finding it gone).
_TAKE_SQLITE = (
    "DELETE FROM dir_prekeys WHERE id = (SELECT id FROM dir_prekeys WHERE name = ?"
    " ORDER BY id LIMIT 1) RETURNING batch, idx, prekey, path"
)
# The counts stop at the limit they are compared with: a claim reads at most that many
# index entries, not every claim the window holds.
_CLAIM_ROW = (
    "SELECT statement, leaf_index,"
    " (SELECT count(*) FROM (SELECT 1 FROM dir_claims WHERE name = ? AND at >= ? LIMIT ?)),"
    " (SELECT count(*) FROM (SELECT 1 FROM dir_claims WHERE claimer = ? AND at >= ? LIMIT ?))"
    " FROM dir_names WHERE name = ? AND withdrawn = 0"
)
# PostgreSQL's data-modifying CTEs do the whole claim in one statement (the DELETE runs
# only if the claim was recorded); SQLite has none, and runs the three in turn.
_CLAIM_PG = """
WITH n AS (
    SELECT statement, leaf_index,
        (SELECT count(*) FROM (SELECT 1 FROM dir_claims WHERE name = %(name)s
            AND at >= %(since)s LIMIT %(per_name)s) c) AS per_name,
        (SELECT count(*) FROM (SELECT 1 FROM dir_claims WHERE claimer = %(claimer)s
            AND at >= %(since)s LIMIT %(per_claimer)s) c) AS per_claimer
    FROM dir_names WHERE name = %(name)s AND withdrawn = 0
), ins AS (
    INSERT INTO dir_claims (nonce, name, claimer, at)
    SELECT %(nonce)s, %(name)s, %(claimer)s, %(at)s FROM n
    WHERE n.per_name < %(per_name)s AND n.per_claimer < %(per_claimer)s
    ON CONFLICT DO NOTHING
    RETURNING 1 AS recorded
), del AS (
    DELETE FROM dir_prekeys
    WHERE id = (SELECT id FROM dir_prekeys WHERE name = %(name)s
                ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
      AND EXISTS (SELECT 1 FROM ins)
    RETURNING batch, idx, prekey, path
)
SELECT n.statement, n.leaf_index, n.per_name, n.per_claimer,
       EXISTS (SELECT 1 FROM ins), del.batch, del.idx, del.prekey, del.path
FROM n LEFT JOIN del ON true
"""


def statement_digest(statement: str) -> str:
    return b64url.encode(hashlib.sha256(statement.encode()).digest())


@dataclass(frozen=True)
class Proof:
    """A leaf, its inclusion proof and the signed head it is proved against."""

    leaf: bytes
    leaf_index: int
    tree_size: int
    audit_path: list[bytes]
    tree_head: TreeHead

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaf": merkle.b64(self.leaf),
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "audit_path": [merkle.b64(h) for h in self.audit_path],
            "tree_head": self.tree_head.to_dict(),
        }


class DirectoryService:
    def __init__(
        self, key: KeyHandle, namespace: str, store: DirectoryStore, rules: Rules | None = None
    ) -> None:
        self.key = key
        self.did = key.did
        self.namespace = check_namespace(namespace)
        self.store = store
        self.rules = rules or Rules.open_mode()
        self._head: TreeHead | None = None
        self._head_lock = threading.Lock()
        self._verifier = Verifier()
        self._claims = 0
        self._statements: dict[str, str] = {}
        self._packages: dict[str, Package] = {}
        self._proofs: dict[tuple[int, int], tuple[bytes, list[bytes]]] = {}

    # --- signed requests ------------------------------------------------------------------

    def _request(self, tx: Tx, compact: object, typ: str, now: float) -> dict[str, Any]:
        claims = self._checked(compact, typ, now)
        inserted = tx.execute(
            "INSERT INTO dir_nonces (nonce, expires) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (claims["nonce"], int(claims["exp"]) + 120),
        ).rowcount
        if inserted != 1:
            raise RequestRefusedError("the signed request was replayed")
        return claims

    def _checked(self, compact: object, typ: str, now: float) -> dict[str, Any]:
        if not isinstance(compact, str) or len(compact) > 16 * 1024:
            raise RequestRefusedError("'request' must be a signed request (compact JWS)")
        try:
            return check_signed_request(compact, typ, owner=None, audience=self.did, now=now)
        except PolicyError as exc:
            raise RequestRefusedError(f"the signed request does not hold: {exc}") from None

    def _owner_op(self, claims: dict[str, Any], op: str) -> str:
        if claims.get("op") != op:
            raise RequestRefusedError(f"the signed request is not for '{op}'")
        return full_name(claims.get("name"), self.namespace)

    # --- publishing -------------------------------------------------------------------------

    def publish(self, body: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
        """Publish or refill: a root-signed package and its batch of one-time prekeys."""
        moment = time.time() if now is None else now
        allowed = {"request", "package", "prekeys", "grant"}
        if not {"request", "package", "prekeys"} <= set(body) <= allowed:
            raise DirectoryError(
                "body must be {'request', 'package', 'prekeys'} and, "
                "when enrolment needs it, 'grant'"
            )
        package = Package.verify(body["package"], now=int(moment))
        prekeys = body["prekeys"]
        if not isinstance(prekeys, list) or len(prekeys) != package.otk_count:
            raise PackageError("'prekeys' must list exactly the batch's one-time prekeys")
        parsed = [OneTimePrekey.from_dict(p, package.identity.suite) for p in prekeys]
        hashes = [merkle.leaf_hash(p.leaf()) for p in parsed]
        if merkle.root_from_leaf_hashes(hashes) != package.otk_root:
            raise PackageError("the prekeys are not the batch the root signed")
        ids = [p.opk_id for p in parsed] + [p.pq_id for p in parsed]
        if len(set(ids)) != len(ids):
            raise PackageError("one-time prekey ids repeat")
        paths = [merkle.audit_path(i, hashes) for i in range(len(hashes))]
        with self.store.transaction() as tx:
            claims = self._request(tx, body["request"], REQUEST_TYP, moment)
            name = self._owner_op(claims, "publish")
            if claims["iss"] != package.root_did:
                raise PackageError("the package is signed by another root than the request")
            if package.name != name or package.directory != self.did:
                raise PackageError("the package names another name or directory")
            if claims.get("package") != statement_digest(package.statement):
                raise RequestRefusedError("the signed request is for another package")
            self._check_enrolment(body.get("grant"), name, package.root_did, moment)
            row = tx.execute(_NAME_ROW + (" FOR UPDATE" if tx.postgres else ""), (name,)).fetchone()
            if row is not None and not row[3] and row[0] != package.root_did:
                raise NameTakenError(f"{name} is held by another owner")
            seen = tx.execute(
                "SELECT 1 FROM dir_batches WHERE batch = ?", (package.batch_id,)
            ).fetchone()
            if seen is not None:
                raise PackageError("this batch was published before: sign a new one")
            idk = json.dumps(package.identity.identity_jwk, sort_keys=True)
            suite = str(package.identity.suite)
            changed = (
                row is None
                or bool(row[3])
                or (row[0], row[1], row[2])
                != (
                    package.root_did,
                    suite,
                    idk,
                )
            )
            ms = int(moment * 1000)
            if changed:
                leaf = binding_leaf(
                    op="publish",
                    name=name,
                    root=package.root_did,
                    suite=suite,
                    idk=dict(package.identity.identity_jwk),
                    ts_ms=ms,
                )
                index = tx.log().append(leaf)
                # Prekeys of a key no longer bound must not be handed out any more.
                tx.execute("DELETE FROM dir_prekeys WHERE name = ?", (name,))
            else:
                assert row is not None
                index = int(row[4])
                leaf = tx.log().leaf(index)
            if row is None:
                tx.execute(
                    "INSERT INTO dir_names (name, root, suite, idk, statement, leaf_index,"
                    " withdrawn, updated) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                    (name, package.root_did, suite, idk, package.statement, index, ms),
                )
            else:
                tx.execute(
                    "UPDATE dir_names SET root = ?, suite = ?, idk = ?, statement = ?,"
                    " leaf_index = ?, withdrawn = 0, updated = ? WHERE name = ?",
                    (package.root_did, suite, idk, package.statement, index, ms, name),
                )
            tx.execute(
                "INSERT INTO dir_batches (batch, name, statement, created) VALUES (?, ?, ?, ?)",
                (package.batch_id, name, package.statement, ms),
            )
            for i, (prekey, path) in enumerate(zip(parsed, paths, strict=True)):
                tx.execute(
                    "INSERT INTO dir_prekeys (name, batch, idx, prekey, path)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        name,
                        package.batch_id,
                        i,
                        json.dumps(prekey.to_dict()),
                        json.dumps([b64url.encode(h) for h in path]),
                    ),
                )
            remaining = self._remaining(tx, name)
        return {
            "name": name,
            "leaf": merkle.b64(leaf),
            "leaf_index": index,
            "logged": changed,
            "remaining": remaining,
        }

    def _check_enrolment(self, grant: object, name: str, root: str, now: float) -> None:
        if self.rules.mode != GRANT:
            return
        if grant is None:
            raise NotEnrolledError(
                f"@{self.namespace} gives names by the authority's grant: present one for {name}"
            )
        resource = f"janus:dir/{name}"
        try:
            chain = self._verifier.verify_chain(
                Bundle.from_dict(grant), now=now, root=self.rules.authority
            )
        except PolicyError as exc:
            raise NotEnrolledError(f"the enrolment grant does not hold: {exc}") from None
        leaf = chain.leaf
        if leaf.audience != root:
            raise NotEnrolledError("the enrolment grant is for another owner")
        if not any(
            pattern_matches(a.resource, resource) and pattern_matches(a.action, ENROL_ACTION)
            for a in leaf.abilities
        ):
            raise NotEnrolledError(f"the enrolment grant does not cover {name}")

    def withdraw(self, body: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
        moment = time.time() if now is None else now
        if set(body) != {"request"}:
            raise DirectoryError("body must be {'request': <owner-signed JWS>}")
        with self.store.transaction() as tx:
            claims = self._request(tx, body["request"], REQUEST_TYP, moment)
            name = self._owner_op(claims, "withdraw")
            row = self._owned(tx, name, claims["iss"])
            leaf = binding_leaf(
                op="withdraw",
                name=name,
                root=row[0],
                suite=None,
                idk=None,
                ts_ms=int(moment * 1000),
            )
            index = tx.log().append(leaf)
            tx.execute("DELETE FROM dir_prekeys WHERE name = ?", (name,))
            tx.execute(
                "UPDATE dir_names SET withdrawn = 1, leaf_index = ?, updated = ? WHERE name = ?",
                (index, int(moment * 1000), name),
            )
        return {"name": name, "withdrawn": True, "leaf": merkle.b64(leaf), "leaf_index": index}

    def status(self, body: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
        moment = time.time() if now is None else now
        if set(body) != {"request"}:
            raise DirectoryError("body must be {'request': <owner-signed JWS>}")
        with self.store.transaction() as tx:
            claims = self._request(tx, body["request"], REQUEST_TYP, moment)
            name = self._owner_op(claims, "status")
            row = self._owned(tx, name, claims["iss"])
            remaining = self._remaining(tx, name)
            since = int(moment) - self.rules.window
            recent = tx.execute(
                "SELECT count(*) FROM dir_claims WHERE name = ? AND at >= ?", (name, since)
            ).fetchone()[0]
        return {
            "name": name,
            "remaining": remaining,
            "leaf_index": int(row[1]),
            "claims_in_window": int(recent),
            "window": self.rules.window,
        }

    def _owned(self, tx: Tx, name: str, root: str) -> tuple[Any, ...]:
        row = tx.execute(
            "SELECT root, leaf_index FROM dir_names WHERE name = ? AND withdrawn = 0", (name,)
        ).fetchone()
        if row is None:
            raise UnknownNameError(f"{name} is not published here")
        if row[0] != root:
            raise RequestRefusedError(f"{name} is held by another owner")
        return tuple(row)

    def _remaining(self, tx: Tx, name: str) -> int:
        return int(
            tx.execute("SELECT count(*) FROM dir_prekeys WHERE name = ?", (name,)).fetchone()[0]
        )

    # --- claims ----------------------------------------------------------------------------

    def claim(self, body: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
        """One package with one one-time prekey (exactly once), or the last-resort one."""
        moment = time.time() if now is None else now
        if set(body) != {"request"}:
            raise DirectoryError("body must be {'request': <claimer-signed JWS>}")
        # Checked before the transaction: a signature check holds no lock.
        claims = self._checked(body["request"], CLAIM_TYP, moment)
        if claims.get("op") != "claim":
            raise RequestRefusedError("the signed request is not a claim")
        name = full_name(claims.get("name"), self.namespace)
        claimer = str(claims["iss"])
        if claimer in self.rules.blocked:
            raise ClaimerBlockedError("this directory does not serve that claimer")
        since = int(moment) - self.rules.window
        with self.store.transaction() as tx:
            head = self._fresh_head(tx)
            if tx.postgres:
                row, taken = self._take_postgres(tx, name, claimer, claims["nonce"], since, moment)
            else:
                row, taken = self._take_sqlite(tx, name, claimer, claims["nonce"], since, moment)
            statement = row[0] if taken is None else self._batch_statement(tx, taken[0])
            leaf_index = int(row[1])
            # Everything that can fail happens before the commit: a prekey taken from the
            # table is a prekey in the answer, or still in the table.
            package = self._package(statement, int(moment))
            contact = sign_contact(
                self.key,
                audience=claimer,
                address_id=package.intro.address_id,
                uses=self.rules.contact_uses,
                ttl=self.rules.contact_ttl,
            )
            proof = None
            if leaf_index < head.tree_size:
                proof = self._proof_in(tx, leaf_index, head)
            self._claims += 1
            if self._claims % 1000 == 0:  # a claim's row is its nonce: kept past its expiry
                tx.execute("DELETE FROM dir_claims WHERE at < ?", (min(since, int(moment) - 900),))
                tx.execute("DELETE FROM dir_nonces WHERE expires < ?", (int(moment),))
        if proof is None:  # the name was bound after the head was signed: a newer head
            proof = self.proof(leaf_index)
        result: dict[str, Any] = {
            "name": name,
            "package": statement,
            "last_resort": taken is None,
            "one_time": None,
            "contact": contact_bundle(contact),
            **proof.to_dict(),
        }
        if taken is not None:
            result["one_time"] = {
                "index": int(taken[1]),
                "prekey": json.loads(taken[2]),
                "audit_path": json.loads(taken[3]),
            }
        return result

    # --- attestations ------------------------------------------------------------------------

    def attest(self, name: object, *, now: float | None = None) -> dict[str, Any]:
        """A statement anyone verifies offline: name -> root and agreement key, with proof."""
        moment = int(time.time() if now is None else now)
        full = full_name(name, self.namespace)
        with self.store.transaction() as tx:
            row = tx.execute(
                "SELECT root, suite, idk, leaf_index FROM dir_names"
                " WHERE name = ? AND withdrawn = 0",
                (full,),
            ).fetchone()
        if row is None:
            raise UnknownNameError(f"{full} is not published here")
        proof = self.proof(int(row[3]))
        payload = {
            "iss": self.did,
            "sub": full,
            "root": row[0],
            "suite": row[1],
            "idk": json.loads(row[2]),
            "iat": moment,
            "exp": moment + ATTESTATION_TTL,
            "proof": proof.to_dict(),
        }
        return {"attestation": sign_compact(self.key, {"typ": ATTESTATION_TYP}, payload)}

    # --- the log -----------------------------------------------------------------------------

    def _refuse(self, name: str, row: Any) -> NoReturn:
        """Why a claim recorded nothing: no such name, a rate limit, or a replay."""
        if row is None:
            raise UnknownNameError(f"{name} is not published here")
        if row[2] >= self.rules.claims_per_name:
            raise RateLimitedError(f"{name} was claimed as often as the rules allow; later")
        if row[3] >= self.rules.claims_per_claimer:
            raise RateLimitedError("this claimer made as many claims as the rules allow; later")
        raise RequestRefusedError("the signed request was replayed")

    def _take_sqlite(
        self, tx: Tx, name: str, claimer: str, nonce: str, since: int, moment: float
    ) -> tuple[Any, Any]:
        row = tx.execute(
            _CLAIM_ROW,
            (
                name,
                since,
                self.rules.claims_per_name,
                claimer,
                since,
                self.rules.claims_per_claimer,
                name,
            ),
        ).fetchone()
        if (
            row is None
            or row[2] >= self.rules.claims_per_name
            or row[3] >= self.rules.claims_per_claimer
        ):
            self._refuse(name, row)
        recorded = tx.execute(
            "INSERT INTO dir_claims (nonce, name, claimer, at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (nonce, name, claimer, int(moment)),
        ).rowcount
        if recorded != 1:
            self._refuse(name, row)
        return row, tx.execute(_TAKE_SQLITE, (name,)).fetchone()

    def _take_postgres(
        self, tx: Tx, name: str, claimer: str, nonce: str, since: int, moment: float
    ) -> tuple[Any, Any]:
        # One statement (one round trip): read the name and the counts, record the claim
        # if the limits allow, and only then consume a prekey.
        found = tx.conn.execute(
            _CLAIM_PG,
            {
                "name": name,
                "claimer": claimer,
                "nonce": nonce,
                "since": since,
                "at": int(moment),
                "per_name": self.rules.claims_per_name,
                "per_claimer": self.rules.claims_per_claimer,
            },
        ).fetchone()
        row = None if found is None else found[:4]
        if found is None or not found[4]:
            self._refuse(name, row)
        taken = None if found[5] is None else found[5:9]
        return row, taken

    # Caches of what never changes once written: a batch's statement, a verified package,
    # a leaf's inclusion proof for a given tree size.  They spare a claim the queries and
    # signature checks that would give the same answer every time.
    def _batch_statement(self, tx: Tx, batch: str) -> str:
        statement = self._statements.get(batch)
        if statement is None:
            statement = str(
                tx.execute(
                    "SELECT statement FROM dir_batches WHERE batch = ?", (batch,)
                ).fetchone()[0]
            )
            if len(self._statements) > 10_000:
                self._statements.clear()
            self._statements[batch] = statement
        return statement

    def _package(self, statement: str, now: int) -> Package:
        package = self._packages.get(statement)
        if package is None or package.expires < now:
            package = Package.verify(statement, now=now)
            if len(self._packages) > 10_000:
                self._packages.clear()
            self._packages[statement] = package
        return package

    def _proof_in(self, tx: Tx, leaf_index: int, head: TreeHead) -> Proof:
        key = (leaf_index, head.tree_size)
        found = self._proofs.get(key)
        if found is None:
            log_ = tx.log()
            found = (log_.leaf(leaf_index), log_.inclusion(leaf_index, head.tree_size))
            if len(self._proofs) > 10_000:
                self._proofs.clear()
            self._proofs[key] = found
        return Proof(found[0], leaf_index, head.tree_size, found[1], head)

    def _fresh_head(self, tx: Tx) -> TreeHead:
        """The cached head while it is fresh (a claim's proof is against it), else a new
        one of the log as this transaction sees it."""
        now_ms = int(time.time() * 1000)
        with self._head_lock:
            head = self._head
            if head is not None and now_ms - head.timestamp <= HEAD_REFRESH_MS:
                return head
        log_ = tx.log()
        size = log_.size()
        root = log_.root(size)
        with self._head_lock:
            head = self._head = sign_tree_head(self.key, size, root, now_ms)
            return head

    def tree_head(self) -> TreeHead:
        """A signed head of the log as it is now (re-signed when it grows or ages)."""
        with self.store.transaction() as tx:
            log_ = tx.log()
            size = log_.size()
            root = log_.root(size)
        now_ms = int(time.time() * 1000)
        with self._head_lock:
            head = self._head
            if head is None or head.tree_size != size or now_ms - head.timestamp > HEAD_REFRESH_MS:
                head = self._head = sign_tree_head(self.key, size, root, now_ms)
            return head

    def proof(self, leaf_index: int) -> Proof:
        head = self.tree_head()
        with self.store.transaction() as tx:
            log_ = tx.log()
            leaf = log_.leaf(leaf_index)
            path = log_.inclusion(leaf_index, head.tree_size)
        return Proof(leaf, leaf_index, head.tree_size, path, head)

    def consistency(self, first: int, second: int) -> dict[str, Any]:
        with self.store.transaction() as tx:
            log_ = tx.log()
            size = log_.size()
            if not 0 <= first <= second <= size:
                raise DirectoryError(f"give 0 <= first <= second <= {size} (the log's size)")
            return {
                "first": first,
                "second": second,
                "first_root": merkle.b64(log_.root(first)),
                "second_root": merkle.b64(log_.root(second)),
                "proof": [merkle.b64(h) for h in log_.consistency(first, second)],
            }

    def inclusion(self, index: int, size: int) -> dict[str, Any]:
        with self.store.transaction() as tx:
            log_ = tx.log()
            if not 0 <= index < size <= log_.size():
                raise DirectoryError("give 0 <= index < size <= the log's size")
            return {
                "leaf_index": index,
                "tree_size": size,
                "leaf": merkle.b64(log_.leaf(index)),
                "audit_path": [merkle.b64(h) for h in log_.inclusion(index, size)],
            }

    def entries(self, start: int, end: int) -> dict[str, Any]:
        with self.store.transaction() as tx:
            log_ = tx.log()
            size = log_.size()
            if not 0 <= start <= end or end - start > MAX_LOG_RANGE:
                raise DirectoryError(
                    f"give 0 <= start <= end, at most {MAX_LOG_RANGE} entries at a time"
                )
            leaves = log_.leaves(start, end=min(end, size)) if start < min(end, size) else []
        return {"start": start, "tree_size": size, "entries": [merkle.b64(v) for v in leaves]}
