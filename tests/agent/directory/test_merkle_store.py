"""The persistent log on SQLite and PostgreSQL equals the in-memory oracle, appends
inside the caller's transaction, and a crash in the middle of an append (a process
killed before it commits) leaves the log as it was."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.directory.merkle import (
    MerkleLog,
    PostgresNodeStore,
    SqliteNodeStore,
    audit_path,
    consistency_proof,
    ensure_schema,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)


class Backend:
    """One database with the log's tables: connections, and a transaction helper."""

    def __init__(self, kind: str, connect: Callable[[], Any], script_connect: str) -> None:
        self.kind = kind
        self.connect = connect
        self.script_connect = script_connect  # Python source that sets `conn`

    def log(self, conn: Any) -> MerkleLog:
        store = SqliteNodeStore(conn) if self.kind == "sqlite" else PostgresNodeStore(conn)
        return MerkleLog(store)

    def transaction(self, conn: Any) -> AbstractContextManager[Any]:
        if self.kind == "sqlite":
            return _sqlite_transaction(conn)
        return conn.transaction()  # type: ignore[no-any-return]


@contextmanager
def _sqlite_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "log.db"

        def connect_sqlite() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            return conn

        conn = connect_sqlite()
        ensure_schema(conn)
        conn.close()
        yield Backend(
            "sqlite",
            connect_sqlite,
            f"import sqlite3; conn = sqlite3.connect({str(path)!r}, isolation_level=None)",
        )
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    schema = f"log_{secrets.token_hex(4)}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    options = f"-c search_path={schema}"

    def connect_pg() -> psycopg.Connection[Any]:
        return psycopg.connect(dsn, autocommit=True, options=options)

    with connect_pg() as pg_conn:
        ensure_schema(pg_conn)
    yield Backend(
        "postgres",
        connect_pg,
        f"import psycopg; conn = psycopg.connect({dsn!r}, autocommit=True, options={options!r})",
    )


def _leaves(n: int, tag: str = "e") -> list[bytes]:
    return [f"{tag} {i}".encode() for i in range(n)]


def _check_against_oracle(log: MerkleLog, leaves: list[bytes]) -> None:
    hashes = [leaf_hash(x) for x in leaves]
    assert log.size() == len(leaves)
    assert log.leaves(0, len(leaves)) == leaves
    for n in range(1, len(leaves) + 1):
        root = root_from_leaf_hashes(hashes[:n])
        assert log.root(n) == root
        for m in range(n):
            p = log.inclusion(m, n)
            assert p == audit_path(m, hashes[:n])
            verify_inclusion(leaves[m], m, n, p, root)
        for m in range(1, n):
            p = log.consistency(m, n)
            assert p == consistency_proof(m, hashes[:n])
            verify_consistency(m, n, log.root(m), root, p)


def test_persistent_log_equals_the_oracle(backend: Backend) -> None:
    leaves = _leaves(33)
    conn = backend.connect()
    log = backend.log(conn)
    for leaf in leaves:
        with backend.transaction(conn):
            assert log.append(leaf) == leaves.index(leaf)
    conn.close()
    # A new connection sees what was committed.
    reopened = backend.connect()
    _check_against_oracle(backend.log(reopened), leaves)
    reopened.close()


def test_rolled_back_appends_leave_nothing(backend: Backend) -> None:
    conn = backend.connect()
    log = backend.log(conn)
    with backend.transaction(conn):
        for leaf in _leaves(5):
            log.append(leaf)
    with pytest.raises(RuntimeError), backend.transaction(conn):
        for leaf in _leaves(6, "rolled back"):
            log.append(leaf)
        raise RuntimeError("the binding change failed after its log entry")
    _check_against_oracle(log, _leaves(5))
    with backend.transaction(conn):
        log.append(b"after")
    _check_against_oracle(log, [*_leaves(5), b"after"])
    conn.close()


def test_a_process_killed_in_the_middle_of_an_append_leaves_the_log_consistent(
    backend: Backend,
) -> None:
    conn = backend.connect()
    log = backend.log(conn)
    with backend.transaction(conn):
        for leaf in _leaves(7):
            log.append(leaf)
    # The child appends leaf 7 (completing subtrees of width 2, 4 and 8), then dies
    # between writing the leaf and its subtree hashes: the store's put is cut short.
    store_class = "SqliteNodeStore" if backend.kind == "sqlite" else "PostgresNodeStore"
    script = textwrap.dedent(
        f"""
        import os
        {backend.script_connect}
        from agent.directory import merkle
        store = merkle.{store_class}(conn)
        real = store.put
        def put(index, leaf, nodes):
            real(index, leaf, nodes[:1])
            os._exit(9)
        store.put = put
        conn.execute("BEGIN")
        merkle.MerkleLog(store).append(b"half written")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 9, result.stderr.decode()
    conn.close()
    conn = backend.connect()
    log = backend.log(conn)
    _check_against_oracle(log, _leaves(7))
    with backend.transaction(conn):
        log.append(b"e 7")
    _check_against_oracle(log, _leaves(8))
    conn.close()


def test_concurrent_appenders_take_turns(backend: Backend) -> None:
    per_thread, threads = 15, 3
    errors: list[BaseException] = []

    def run(tag: str) -> None:
        try:
            conn = backend.connect()
            log = backend.log(conn)
            for leaf in _leaves(per_thread, tag):
                with backend.transaction(conn):
                    log.append(leaf)
            conn.close()
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    conn = backend.connect()
    log = backend.log(conn)
    stored = log.leaves(0, per_thread * threads)
    assert sorted(stored) == sorted(x for i in range(threads) for x in _leaves(per_thread, f"t{i}"))
    hashes = [leaf_hash(x) for x in stored]
    assert log.root() == root_from_leaf_hashes(hashes)
    for m in (1, 7, 20, 44):
        verify_consistency(m, len(stored), log.root(m), log.root(), log.consistency(m, len(stored)))
    conn.close()
