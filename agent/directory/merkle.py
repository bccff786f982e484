"""RFC 9162 (Certificate Transparency v2) Merkle trees, proofs, and a persistent log.

Hashing and proof formats are exactly RFC 9162 §2.1: SHA-256, leaf hash
``SHA-256(0x00 || leaf)``, node hash ``SHA-256(0x01 || left || right)``, audit paths
(§2.1.3.1) and consistency proofs (§2.1.4.1) in the RFC's order, verified with the
RFC's own algorithms (§2.1.3.2, §2.1.4.2), so any RFC 9162 verifier checks what the
directory says and this verifier checks any RFC 9162 log.

Hand-written on purpose: the maintained Python library (pymerkle) uses its own proof
format (paths include the base leaf and a rule bitmap, 1-based indices) and keeps its
tree in its own SQLite file, while the directory needs RFC 9162's wire form and a log
that appends inside the caller's database transaction on SQLite and PostgreSQL alike.
pymerkle stays a differential test peer for the roots.

The persistent log stores every *perfect* subtree hash: node ``(level, index)`` is the
hash of leaves ``[index * 2**level, (index + 1) * 2**level)``.  Those never change once
written, so the root of any past size and every proof come from O(log n) stored
nodes, and an append writes one leaf and at most log2(n) + 1 nodes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from agent.directory.errors import DirectoryError, ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
# Bounds what a verifier accepts from outside: a log of 2**63 leaves has paths of at
# most 63 hashes, so anything longer is malformed whatever the sizes claim.
MAX_TREE_SIZE = 2**63 - 1
MAX_PROOF_HASHES = 64


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 9162 §2.1.1: MTH({d0}) = SHA-256(0x00 || d0)."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: SHA-256(0x01 || MTH(left) || MTH(right))."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


# The RFC's definitions over a "subtree hash" function ``mth(start, end)``: each one is
# written once and serves both in-memory hash lists and the stored log.
_Mth = Callable[[int, int], bytes]


def _path(m: int, start: int, end: int, mth: _Mth) -> list[bytes]:
    """PATH(m, D[start:end]) of RFC 9162 §2.1.3.1, leaf first."""
    if end - start <= 1:
        return []
    k = _split(end - start)
    if m < k:
        return [*_path(m, start, start + k, mth), mth(start + k, end)]
    return [*_path(m - k, start + k, end, mth), mth(start, start + k)]


def _subproof(m: int, start: int, end: int, complete: bool, mth: _Mth) -> list[bytes]:
    """SUBPROOF(m, D[start:end], b) of RFC 9162 §2.1.4.1."""
    n = end - start
    if m == n:
        return [] if complete else [mth(start, end)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, start, start + k, complete, mth), mth(start + k, end)]
    return [*_subproof(m - k, start + k, end, False, mth), mth(start, start + k)]


def _list_mth(hashes: Sequence[bytes]) -> _Mth:
    def mth(start: int, end: int) -> bytes:
        if end - start == 1:
            return hashes[start]
        k = _split(end - start)
        return node_hash(mth(start, start + k), mth(start + k, end))

    return mth


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) from the leaf hashes; the empty tree's root is SHA-256 of nothing."""
    if not hashes:
        return EMPTY_ROOT
    return _list_mth(hashes)(0, len(hashes))


def audit_path(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) for the tree whose leaf hashes are ``hashes``."""
    if not 0 <= index < len(hashes):
        raise ProofError(f"leaf index {index} is outside a tree of size {len(hashes)}")
    return _path(index, 0, len(hashes), _list_mth(hashes))


def consistency_proof(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]); empty for m = 0 and m = n, where nothing needs proving."""
    n = len(hashes)
    if not 0 <= m <= n:
        raise ProofError(f"cannot prove size {m} consistent with a tree of size {n}")
    if m in (0, n):
        return []
    return _subproof(m, 0, n, True, _list_mth(hashes))


def _check_hashes(proof: Sequence[bytes], what: str) -> None:
    if len(proof) > MAX_PROOF_HASHES:
        raise ProofError(f"{what} has {len(proof)} hashes, more than any tree needs")
    for value in proof:
        if not isinstance(value, bytes) or len(value) != HASH_SIZE:
            raise ProofError(f"{what} holds a value that is not a {HASH_SIZE}-byte hash")


def _check_size(size: int, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise ProofError(f"{what} is not a tree size")


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, path: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf`` is entry ``index`` of the tree of ``tree_size`` with ``root``.

    RFC 9162 §2.1.3.2 step by step; raises ProofError on any mismatch.
    """
    verify_inclusion_hash(leaf_hash(leaf), index, tree_size, path, root)


def verify_inclusion_hash(
    hash_: bytes, index: int, tree_size: int, path: Sequence[bytes], root: bytes
) -> None:
    """verify_inclusion for a caller that holds the leaf hash rather than the leaf."""
    _check_size(tree_size, "the tree size")
    _check_size(index, "the leaf index")
    _check_hashes(path, "the audit path")
    if index >= tree_size:
        raise ProofError(f"leaf index {index} is outside a tree of size {tree_size}")
    fn, sn, r = index, tree_size - 1, hash_
    for p in path:
        if sn == 0:
            raise ProofError("the audit path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the audit path is shorter than the tree is deep")
    if r != root:
        raise ProofError("the audit path does not lead to the tree head's root")


def verify_consistency(
    m: int, n: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of size ``m`` is a prefix of the tree of size ``n``.

    RFC 9162 §2.1.4.2 for 0 < m < n.  For m = n the proof must be empty and the roots
    equal; for m = 0 it must be empty (every tree extends the empty one).
    """
    _check_size(m, "the first tree size")
    _check_size(n, "the second tree size")
    _check_hashes(proof, "the consistency proof")
    if m > n:
        raise ProofError(f"tree size {m} cannot be a prefix of the smaller size {n}")
    if m == 0 or m == n:
        if proof:
            raise ProofError("a consistency proof between these sizes must be empty")
        if m == n and first_root != second_root:
            raise ProofError("two tree heads of one size have different roots")
        return
    if not proof:
        raise ProofError("the consistency proof is empty")
    path = list(proof)
    if m & (m - 1) == 0:
        path.insert(0, first_root)
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency proof is shorter than the tree is deep")
    if fr != first_root:
        raise ProofError("the consistency proof does not lead to the first root")
    if sr != second_root:
        raise ProofError("the consistency proof does not lead to the second root")


# ---------------------------------------------------------------- JSON forms


def b64(data: bytes) -> str:
    """Standard base64 with padding (RFC 4648 §4): the encoding of hashes and leaves."""
    return base64.b64encode(data).decode("ascii")


def unb64(
    value: Any, what: str, *, size: int | None = None, error: type[DirectoryError] = ProofError
) -> bytes:
    """Strict standard base64 from outside: canonical text only, optionally a fixed size."""
    if not isinstance(value, str) or len(value) > 1 << 20:
        raise error(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise error(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise error(f"{what} is not canonical base64")
    if size is not None and len(raw) != size:
        raise error(f"{what} must encode {size} bytes")
    return raw


def hashes_from_json(value: Any, what: str) -> list[bytes]:
    """A proof's JSON form (a list of base64 hashes) back to bytes, strictly."""
    if not isinstance(value, list) or len(value) > MAX_PROOF_HASHES:
        raise ProofError(f"{what} must be a list of at most {MAX_PROOF_HASHES} base64 hashes")
    return [unb64(item, f"{what}[{i}]", size=HASH_SIZE) for i, item in enumerate(value)]


def hashes_to_json(hashes: Sequence[bytes]) -> list[str]:
    return [b64(value) for value in hashes]


# ---------------------------------------------------------------- the persistent log


class NodeStore(Protocol):
    """Where a MerkleLog keeps its leaves and perfect-subtree hashes.

    Stores never commit: the log writes inside whatever transaction the caller has
    open, so a binding change and its log entry are one atomic unit.
    """

    def lock(self) -> None:
        """Serialise appends for the rest of the caller's transaction."""

    def size(self) -> int: ...

    def leaves(self, start: int, end: int) -> list[bytes]: ...

    def nodes(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]: ...

    def put(self, index: int, leaf: bytes, nodes: Sequence[tuple[int, int, bytes]]) -> None: ...


class MemoryNodeStore:
    """A NodeStore in a dict: for benchmarks and tests, never for a directory."""

    def __init__(self) -> None:
        self._leaves: list[bytes] = []
        self._nodes: dict[tuple[int, int], bytes] = {}

    def lock(self) -> None:
        return None

    def size(self) -> int:
        return len(self._leaves)

    def leaves(self, start: int, end: int) -> list[bytes]:
        return self._leaves[start:end]

    def nodes(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        return {key: self._nodes[key] for key in keys if key in self._nodes}

    def put(self, index: int, leaf: bytes, nodes: Sequence[tuple[int, int, bytes]]) -> None:
        if index != len(self._leaves):
            raise DirectoryError("the log changed under this append")
        self._leaves.append(leaf)
        for level, idx, value in nodes:
            self._nodes[(level, idx)] = value


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dir_log_leaves ( idx BIGINT PRIMARY KEY, leaf {blob} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dir_log_nodes ("
    " level INTEGER NOT NULL, idx BIGINT NOT NULL, hash {blob} NOT NULL,"
    " PRIMARY KEY (level, idx))",
)
# Any constant both directory instances agree on: serialises appends across them.
_PG_LOCK_KEY = 0x4A414E55534C4F47  # "JANUSLOG"


def ensure_schema(conn: Any) -> None:
    """Create the log's tables on a sqlite3 or psycopg connection (caller commits)."""
    blob = "BLOB" if isinstance(conn, sqlite3.Connection) else "BYTEA"
    for statement in _SCHEMA:
        conn.execute(statement.format(blob=blob))


class _SqlNodeStore:
    _param = "?"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def lock(self) -> None:
        return None

    def size(self) -> int:
        row = self._conn.execute("SELECT max(idx) FROM dir_log_leaves").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def leaves(self, start: int, end: int) -> list[bytes]:
        p = self._param
        rows = self._conn.execute(
            f"SELECT idx, leaf FROM dir_log_leaves WHERE idx >= {p} AND idx < {p} ORDER BY idx",  # noqa: S608
            (start, end),
        ).fetchall()
        return [bytes(row[1]) for row in rows]

    def nodes(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        wanted = sorted(set(keys))
        found: dict[tuple[int, int], bytes] = {}
        p = self._param
        # Batches keep the statement small; a proof needs at most ~2 log2(n) nodes.
        for first in range(0, len(wanted), 64):
            batch = wanted[first : first + 64]
            clause = " OR ".join([f"(level = {p} AND idx = {p})"] * len(batch))
            params = [value for key in batch for value in key]
            for level, idx, value in self._conn.execute(
                f"SELECT level, idx, hash FROM dir_log_nodes WHERE {clause}",  # noqa: S608
                params,
            ).fetchall():
                found[(int(level), int(idx))] = bytes(value)
        return found

    def put(self, index: int, leaf: bytes, nodes: Sequence[tuple[int, int, bytes]]) -> None:
        p = self._param
        self._conn.execute(
            f"INSERT INTO dir_log_leaves (idx, leaf) VALUES ({p}, {p})",  # noqa: S608
            (index, leaf),
        )
        for level, idx, value in nodes:
            self._conn.execute(
                f"INSERT INTO dir_log_nodes (level, idx, hash) VALUES ({p}, {p}, {p})",  # noqa: S608
                (level, idx, value),
            )


class SqliteNodeStore(_SqlNodeStore):
    """The log in a sqlite3 database; the caller's write transaction serialises appends."""

    _param = "?"


class PostgresNodeStore(_SqlNodeStore):
    """The log in PostgreSQL (psycopg 3), shared by every directory instance."""

    _param = "%s"

    def lock(self) -> None:
        # Two instances reading the same size would both try index n; the advisory lock,
        # released at the caller's commit or rollback, lets them take turns instead.
        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))


def _perfect_keys(start: int, end: int) -> list[tuple[int, int]]:
    """The perfect subtrees that RFC 9162's split makes of D[start:end], left to right."""
    keys: list[tuple[int, int]] = []
    while end - start > 0:
        n = end - start
        width = n if n & (n - 1) == 0 else _split(n)
        level = width.bit_length() - 1
        keys.append((level, start >> level))
        start += width
    return keys


class MerkleLog:
    """An append-only RFC 9162 log over a NodeStore, O(log n) per append and per proof."""

    def __init__(self, store: NodeStore) -> None:
        self._store = store

    def size(self) -> int:
        return self._store.size()

    def append(self, leaf: bytes) -> int:
        """Add ``leaf`` and return its index; call inside the caller's transaction."""
        self._store.lock()
        index = self._store.size()
        value = leaf_hash(leaf)
        new: list[tuple[int, int, bytes]] = [(0, index, value)]
        # Completing a perfect subtree of width 2**(level+1) at each odd index.
        level, idx = 0, index
        wanted = []
        while idx & 1:
            wanted.append((level, idx - 1))
            level, idx = level + 1, idx >> 1
        siblings = self._store.nodes(wanted)
        level, idx = 0, index
        while idx & 1:
            left = siblings.get((level, idx - 1))
            if left is None:
                raise DirectoryError("the log's stored subtree hashes are incomplete")
            value = node_hash(left, value)
            level, idx = level + 1, idx >> 1
            new.append((level, idx, value))
        self._store.put(index, leaf, new)
        return index

    def leaf(self, index: int) -> bytes:
        found = self._store.leaves(index, index + 1) if index >= 0 else []
        if not found:
            raise DirectoryError(f"the log has no entry {index}")
        return found[0]

    def leaves(self, start: int, end: int) -> list[bytes]:
        """Entries ``start`` to ``end`` (exclusive) as appended."""
        return self._store.leaves(start, end)

    def _check(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProofError("a tree size must be a non-negative integer")
        if size > self.size():
            raise ProofError(f"the log has no tree of size {size} yet")

    def _run(self, compute: Callable[[_Mth], list[bytes]]) -> list[bytes]:
        """Run an RFC definition twice: once to learn which stored nodes it reads (one
        batched query, not a round trip per node), then with them."""
        keys: list[tuple[int, int]] = []

        def record(start: int, end: int) -> bytes:
            keys.extend(_perfect_keys(start, end))
            return b""

        compute(record)
        found = self._store.nodes(keys)
        if len(found) != len(set(keys)):
            raise DirectoryError("the log's stored subtree hashes are incomplete")

        def mth(start: int, end: int) -> bytes:
            parts = [found[key] for key in _perfect_keys(start, end)]
            value = parts[-1]
            for part in reversed(parts[:-1]):
                value = node_hash(part, value)
            return value

        return compute(mth)

    def root(self, size: int | None = None) -> bytes:
        size = self.size() if size is None else size
        self._check(size)
        if size == 0:
            return EMPTY_ROOT
        return self._run(lambda mth: [mth(0, size)])[0]

    def inclusion(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[size])."""
        self._check(size)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise ProofError(f"leaf index {index} is outside a tree of size {size}")
        return self._run(lambda mth: _path(index, 0, size, mth))

    def consistency(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[n]); empty for m = 0 and m = n."""
        self._check(n)
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= n:
            raise ProofError(f"cannot prove size {m} consistent with size {n}")
        if m in (0, n):
            return []
        return self._run(lambda mth: _subproof(m, 0, n, True, mth))
